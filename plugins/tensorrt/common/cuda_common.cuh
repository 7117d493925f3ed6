// Device helpers shared by the CUDA kernels: fp32/fp16 loads, warp and block reductions, mask
// compaction, workspace carving. Every kernel accumulates in fp32 whatever the storage type.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>

namespace shadowllm {
namespace cuda {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// a . b over n elements by the 32 lanes of one warp; every lane gets the sum.
template <typename A, typename B>
__device__ __forceinline__ float WarpDot(const A* a, const B* b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x % 32; i < n; i += 32) acc += ToFloat(a[i]) * ToFloat(b[i]);
  return WarpSum(acc);
}

// Sum (or max) over a whole block of at most 1024 threads; every thread gets the result.
template <bool kMax>
__device__ float BlockReduce(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = kMax ? WarpMax(v) : WarpSum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float r = lane < warps ? partial[lane] : (kMax ? -FLT_MAX : 0.f);
  return kMax ? WarpMax(r) : WarpSum(r);
}

// One block per batch row b: rows[b*n + k] = the k-th index i with mask[b*n + i] (ascending),
// counts[b] = how many. Launch with 256 threads. This is the "compact the active row list once per
// call" step; every later kernel reads only those rows.
__global__ void CompactMaskKernel(const bool* mask, int64_t n, int32_t* rows, int32_t* counts);

// Workspace carving: the same sequence of Take calls on a null base gives the size to request.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename U>
  U* Take(size_t count) {
    offset_ = (offset_ + 255) & ~static_cast<size_t>(255);
    U* p = base_ ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(U);
    return p;
  }
  size_t Bytes() const { return offset_ + 255; }

 private:
  char* base_;
  size_t offset_ = 0;
};

inline unsigned Blocks(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

}  // namespace cuda
}  // namespace shadowllm
