#include "kernel.h"

#include "../common/cuda_common.cuh"
#include "../common/gather_project.cuh"

namespace shadowllm {
namespace cuda {
namespace {

__device__ __forceinline__ float Activate(Activation a, float t) {
  switch (a) {
    case Activation::kRelu: return t > 0.f ? t : 0.f;
    case Activation::kGelu: return 0.5f * t * (1.f + erff(t * 0.70710678118654752f));
    case Activation::kGeluTanh: return 0.5f * t * (1.f + tanhf(0.79788456080286536f * (t + 0.044715f * t * t * t)));
    case Activation::kSilu: return t / (1.f + expf(-t));
  }
  return t;
}

struct Scratch {
  int32_t* rows;    // [B, F]
  int32_t* counts;  // [B]
  float* h;         // [B, F, S], kept neurons first
  static Scratch Carve(void* base, int64_t B, int64_t S, int64_t F, size_t* bytes) {
    Carver c(base);
    Scratch s{c.Take<int32_t>(B * F), c.Take<int32_t>(B), c.Take<float>(B * F * S)};
    if (bytes) *bytes = c.Bytes();
    return s;
  }
};

// Grid (ceil(F/8), B*S), 8 warps per block: warp k computes h for the k-th kept neuron of row b.
template <typename T>
__global__ void HiddenKernel(const T* x, const T* w_in, const T* b_in, const T* w_gate, Scratch sc, int64_t S,
                             int64_t D, int64_t F, Activation act) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int64_t bs = blockIdx.y, b = bs / S, s = bs % S;
  if (k >= sc.counts[b]) return;
  const int64_t n = sc.rows[b * F + k];
  const T* xs = x + bs * D;
  float up = WarpDot(xs, w_in + n * D, D) + (b_in ? ToFloat(b_in[n]) : 0.f);
  const float h = w_gate ? Activate(act, WarpDot(xs, w_gate + n * D, D)) * up : Activate(act, up);
  if (threadIdx.x % 32 == 0) sc.h[(b * F + k) * S + s] = h;
}

template <typename T>
cudaError_t Launch(const MLPLaunch& a, void* workspace, cudaStream_t stream) {
  const Scratch sc = Scratch::Carve(workspace, a.B, a.S, a.F, nullptr);
  CompactMaskKernel<<<static_cast<unsigned>(a.B), 256, 0, stream>>>(a.mask, a.F, sc.rows, sc.counts);
  const dim3 hidden_grid(Blocks(a.F, 8), static_cast<unsigned>(a.B * a.S));
  HiddenKernel<T><<<hidden_grid, 256, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.w_in), static_cast<const T*>(a.b_in),
      static_cast<const T*>(a.w_gate), sc, a.S, a.D, a.F, a.activation);
  const dim3 out_grid(Blocks(a.D, 256), static_cast<unsigned>(a.B * a.S));
  GatherProjectKernel<T><<<out_grid, 256, 0, stream>>>(sc.rows, sc.counts, a.F, sc.h, static_cast<const T*>(a.w_out_t),
                                                       static_cast<const T*>(a.b_out), static_cast<T*>(a.y), a.S, a.D);
  return cudaGetLastError();
}

}  // namespace

size_t MLPWorkspaceBytes(int64_t B, int64_t S, int64_t F) {
  size_t bytes = 0;
  Scratch::Carve(nullptr, B, S, F, &bytes);
  return bytes;
}

cudaError_t LaunchSparseNeuronMLP(const MLPLaunch& a, void* workspace, cudaStream_t stream) {
  if (a.B == 0 || a.S == 0) return cudaSuccess;
  return a.dtype == DType::kFloat16 ? Launch<__half>(a, workspace, stream) : Launch<float>(a, workspace, stream);
}

}  // namespace cuda
}  // namespace shadowllm
