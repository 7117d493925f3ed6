#include "cuda_common.cuh"

namespace shadowllm {
namespace cuda {

__global__ void CompactMaskKernel(const bool* mask, int64_t n, int32_t* rows, int32_t* counts) {
  __shared__ int32_t warp_base[8];
  __shared__ int32_t chunk_base;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) chunk_base = 0;
  __syncthreads();
  for (int64_t start = 0; start < n; start += 256) {
    const int64_t i = start + threadIdx.x;
    const bool on = i < n && mask[b * n + i];
    const unsigned ballot = __ballot_sync(0xffffffffu, on);
    if (lane == 0) warp_base[warp] = __popc(ballot);
    __syncthreads();
    int32_t before = chunk_base;
    for (int w = 0; w < warp; ++w) before += warp_base[w];
    if (on) rows[b * n + before + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(i);
    __syncthreads();
    if (threadIdx.x == 0)
      for (int w = 0; w < 8; ++w) chunk_base += warp_base[w];
    __syncthreads();
  }
  if (threadIdx.x == 0) counts[b] = chunk_base;
}

}  // namespace cuda
}  // namespace shadowllm
