#include "kernel.h"

#include "../common/cuda_common.cuh"
#include "../common/sparse_projections.cuh"

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

// What a neuron contributes for one token: h = act(gate) * up (or act(up)), zero when row b's
// mask drops the neuron or |h| < t_h. Shared by both input-projection paths.
template <typename T>
struct Hidden {
  const T* b_in;
  MaskView mask;
  const float* t_h;
  float* coeff;  // [M, F]: h of every (token, neuron), zero where dropped
  int64_t S, F;
  Activation act;
  bool gated;
  __device__ void Write(int64_t m, int64_t n, float up, float gate, bool computed) const {
    float h = 0.f;
    if (computed && mask[(m / S) * F + n]) {
      up += b_in ? ToFloat(b_in[n]) : 0.f;
      h = gated ? Activate(act, gate) * up : Activate(act, up);
      if (!KeepLarge(h, t_h)) h = 0.f;
    }
    coeff[m * F + n] = h;
  }
};

// Row-major gate/up: the rows of neurons some token of the group keeps (up = matrix 0, gate = 1).
template <typename T>
struct RowInputOp {
  Hidden<T> hidden;
  const T *w_in, *w_gate;
  int64_t D;
  __device__ bool Wanted(int64_t n, int64_t m0, int mt) const {
    for (int m = 0; m < mt; ++m)
      if (hidden.mask[((m0 + m) / hidden.S) * hidden.F + n]) return true;
    return false;
  }
  __device__ const T* Row(int k, int64_t n) const { return (k == 0 ? w_in : w_gate) + n * D; }
  template <int NMAT, int MT>
  __device__ void Emit(int64_t n, int64_t m0, int mt, const float (&dots)[NMAT][MT], bool computed) const {
    if (threadIdx.x % 32 != 0) return;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < mt) hidden.Write(m0 + m, n, dots[0][m], NMAT == 2 ? dots[NMAT - 1][m] : 0.f, computed);
  }
};

// Channel-major gate/up ([D, F]): the rows of the x channels some token keeps (|x| >= t_x).
template <typename T>
struct ChannelInputOp {
  Hidden<T> hidden;
  const T *x, *w_in, *w_gate;
  const float* t_x;
  int64_t D;
  __device__ float Coef(int64_t m, int64_t d) const {
    const float v = ToFloat(x[m * D + d]);
    return KeepLarge(v, t_x) ? v : 0.f;
  }
  __device__ bool Keep(int64_t d, int64_t m0, int mt) const {
    for (int m = 0; m < mt; ++m)
      if (Coef(m0 + m, d) != 0.f) return true;
    return false;
  }
  __device__ const T* Matrix(int k) const { return k == 0 ? w_in : w_gate; }
  template <int NMAT, int VEC>
  __device__ void Finish(int64_t m, int64_t col0, const float (&vals)[NMAT][VEC]) const {
#pragma unroll
    for (int v = 0; v < VEC; ++v) hidden.Write(m, col0 + v, vals[0][v], vals[NMAT - 1][v], true);
  }
};

struct Scratch {
  float* out_acc;          // [M, D]      } zero between launches
  float* in_acc;           // [2, M, F]   } (channel-major only)
  unsigned* out_counters;  //             }
  unsigned* in_counters;   //             }
  size_t zero_bytes;
  float* coeff;  // [M, F]
  static Scratch Carve(void* base, int64_t M, int64_t D, int64_t F, bool channel_major, size_t* bytes) {
    Carver c(base);
    Scratch s{};
    s.out_acc = c.Take<float>(M * D);
    s.in_acc = c.Take<float>(channel_major ? 2 * M * F : 0);
    s.out_counters = c.Take<unsigned>(GatherCounters(M, D));
    s.in_counters = c.Take<unsigned>(channel_major ? GatherCounters(M, F) : 0);
    s.zero_bytes = c.Bytes();
    s.coeff = c.Take<float>(M * F);
    if (bytes) *bytes = c.Bytes();
    return s;
  }
};

template <typename T>
cudaError_t Launch(const MLPLaunch& a, void* workspace, cudaStream_t stream) {
  const int64_t M = a.B * a.S;
  const Scratch sc = Scratch::Carve(workspace, M, a.D, a.F, a.channel_major, nullptr);
  if (!a.workspace_clean) {
    const cudaError_t err = cudaMemsetAsync(workspace, 0, sc.zero_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  const T* x = static_cast<const T*>(a.x);
  const T* w_in = static_cast<const T*>(a.w_in);
  const T* w_gate = static_cast<const T*>(a.w_gate);
  const bool gated = w_gate != nullptr;
  const Hidden<T> hidden{static_cast<const T*>(a.b_in), MaskView{a.mask, a.mask_int32}, a.t_h, sc.coeff, a.S, a.F, a.activation, gated};
  const int mt_size = TokenGroup(M);
  WithTokenGroup(mt_size, [&](auto mt_c) {
    constexpr int MT = decltype(mt_c)::value;
    WithFlag(gated, [&](auto gated_c) {
      constexpr int NMAT = decltype(gated_c)::value ? 2 : 1;
      if (a.channel_major) {
        const bool vec = Aligned16<T>(w_in, a.F) && Aligned16<T>(w_gate, a.F);
        WithVector<T>(vec, [&](auto vec_c) {
          constexpr int VEC = decltype(vec_c)::value;
          const ChannelInputOp<T> op{hidden, x, w_in, w_gate, a.t_x, a.D};
          auto kernel = GatherRowsKernel<T, MT, NMAT, VEC, ChannelInputOp<T>>;
          const GatherShape shape = GatherGrid(reinterpret_cast<const void*>(kernel), M, a.D, a.F, VEC, MT);
          kernel<<<shape.grid, kGatherThreads, 0, stream>>>(op, M, a.D, a.F, sc.in_acc, sc.in_counters);
        });
      } else {
        const bool vec = Aligned16<T>(x, a.D) && Aligned16<T>(w_in, a.D) && Aligned16<T>(w_gate, a.D);
        WithVector<T>(vec, [&](auto vec_c) {
          constexpr int VEC = decltype(vec_c)::value;
          const RowInputOp<T> op{hidden, w_in, w_gate, a.D};
          LaunchRowDot<T, MT, NMAT, VEC>(op, x, a.t_x, M, a.D, a.F, stream);
        });
      }
    });
    const OutputProjectionOp<T> out{sc.coeff, nullptr, static_cast<const T*>(a.w_out_t),
                                    static_cast<const T*>(a.b_out), static_cast<T*>(a.y), a.F, a.D};
    LaunchOutputProjection<T, MT>(out, M, sc.out_acc, sc.out_counters, stream);
  });
  return cudaGetLastError();
}

}  // namespace

size_t MLPWorkspaceBytes(int64_t B, int64_t S, int64_t D, int64_t F, bool channel_major) {
  size_t bytes = 0;
  Scratch::Carve(nullptr, B * S, D, F, channel_major, &bytes);
  return bytes;
}

cudaError_t LaunchSparseNeuronMLP(const MLPLaunch& a, void* workspace, cudaStream_t stream) {
  if (a.B == 0 || a.S == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat16: return Launch<__half>(a, workspace, stream);
    case DType::kBFloat16: return Launch<__nv_bfloat16>(a, workspace, stream);
    default: return Launch<float>(a, workspace, stream);
  }
}

}  // namespace cuda
}  // namespace shadowllm
