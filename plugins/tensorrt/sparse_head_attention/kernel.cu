#include "kernel.h"

#include "../common/cuda_common.cuh"
#include "../common/gather_project.cuh"

namespace shadowllm {
namespace cuda {
namespace {

struct Scratch {
  int32_t* heads;        // [B, H] kept heads, ascending
  int32_t* head_counts;  // [B]
  int32_t* o_rows;       // [B, H*E] w_o_t rows of the kept heads
  int32_t* o_counts;     // [B]
  int32_t* group_on;     // [B, G] 1 when the kv head's K/V are computed
  float* q;              // [B, S, H*E]
  float* scores;         // [B, S, H, T]
  float* context;        // [B, H*E, S], kept heads first (the output projection's coefficients)
  static Scratch Carve(void* base, int64_t B, int64_t S, int64_t T, int64_t H, int64_t G, int64_t E, size_t* bytes) {
    Carver c(base);
    Scratch s{c.Take<int32_t>(B * H), c.Take<int32_t>(B),         c.Take<int32_t>(B * H * E),
              c.Take<int32_t>(B),     c.Take<int32_t>(B * G),     c.Take<float>(B * S * H * E),
              c.Take<float>(B * S * H * T), c.Take<float>(B * H * E * S)};
    if (bytes) *bytes = c.Bytes();
    return s;
  }
};

// One block per batch row: the kept heads' w_o_t rows and which kv heads are needed.
__global__ void ExpandHeadsKernel(const bool* head_mask, Scratch sc, int64_t H, int64_t G, int64_t E, bool kv_active) {
  const int64_t b = blockIdx.x, count = sc.head_counts[b];
  for (int64_t i = threadIdx.x; i < count * E; i += blockDim.x)
    sc.o_rows[b * H * E + i] = sc.heads[b * H + i / E] * static_cast<int32_t>(E) + static_cast<int32_t>(i % E);
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    int32_t on = kv_active ? 0 : 1;
    for (int64_t h = g * (H / G); h < (g + 1) * (H / G); ++h) on |= head_mask[b * H + h] ? 1 : 0;
    sc.group_on[b * G + g] = on;
  }
  if (threadIdx.x == 0) sc.o_counts[b] = static_cast<int32_t>(count * E);
}

template <typename T>
__global__ void CopyPastKernel(const T* past, T* present, int64_t BG, int64_t P, int64_t T_, int64_t E) {
  const int64_t total = BG * P * E;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bg = i / (P * E), rest = i % (P * E);
    present[bg * T_ * E + rest] = past[i];
  }
}

// Grid (ceil((H + 2G)*E / 8), B*S), a warp per output row: q rows of kept heads into scratch,
// new k/v rows of needed kv heads straight into the present cache after the past (zeros otherwise).
template <typename T>
__global__ void ProjectKernel(AttentionLaunch a, Scratch sc) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int64_t bs = blockIdx.y, b = bs / a.S, s = bs % a.S, T_ = a.P + a.S;
  const int64_t HE = a.H * a.E, GE = a.G * a.E;
  if (j >= HE + 2 * GE) return;
  const T* xs = static_cast<const T*>(a.x) + bs * a.D;
  const bool lead = threadIdx.x % 32 == 0;
  if (j < HE) {
    if (!a.head_mask[b * a.H + j / a.E]) return;
    const T* bias = static_cast<const T*>(a.b_q);
    const float v = WarpDot(xs, static_cast<const T*>(a.w_q) + j * a.D, a.D) + (bias ? ToFloat(bias[j]) : 0.f);
    if (lead) sc.q[bs * HE + j] = v;
    return;
  }
  const bool is_v = j - HE >= GE;
  const int64_t r = (j - HE) % GE, g = r / a.E, e = r % a.E;
  T* dst = static_cast<T*>(is_v ? a.present_value : a.present_key) + ((b * a.G + g) * T_ + a.P + s) * a.E + e;
  if (!sc.group_on[b * a.G + g]) {
    if (lead) *dst = FromFloat<T>(0.f);
    return;
  }
  const T* w = static_cast<const T*>(is_v ? a.w_v : a.w_k) + r * a.D;
  const T* bias = static_cast<const T*>(is_v ? a.b_v : a.b_k);
  const float v = WarpDot(xs, w, a.D) + (bias ? ToFloat(bias[r]) : 0.f);
  if (lead) *dst = FromFloat<T>(v);
}

// Rotate-half RoPE: grid (H + G, B*S), threads over E/2: q of kept heads, new k of needed kv heads.
template <typename T>
__global__ void RopeKernel(AttentionLaunch a, Scratch sc) {
  const int64_t unit = blockIdx.x, bs = blockIdx.y, b = bs / a.S, s = bs % a.S, half = a.E / 2;
  const int64_t pos = a.position_ids[bs];
  const T* cos = static_cast<const T*>(a.cos) + pos * half;
  const T* sin = static_cast<const T*>(a.sin) + pos * half;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float c = ToFloat(cos[i]), sn = ToFloat(sin[i]);
    if (unit < a.H) {
      if (!a.head_mask[b * a.H + unit]) return;
      float* t = sc.q + bs * a.H * a.E + unit * a.E;
      const float t1 = t[i], t2 = t[i + half];
      t[i] = t1 * c - t2 * sn;
      t[i + half] = t2 * c + t1 * sn;
    } else {
      const int64_t g = unit - a.H;
      if (!sc.group_on[b * a.G + g]) return;
      T* t = static_cast<T*>(a.present_key) + ((b * a.G + g) * (a.P + a.S) + a.P + s) * a.E;
      const float t1 = ToFloat(t[i]), t2 = ToFloat(t[i + half]);
      t[i] = FromFloat<T>(t1 * c - t2 * sn);
      t[i + half] = FromFloat<T>(t2 * c + t1 * sn);
    }
  }
}

// Grid (H, B*S), 128 threads: scores over visible keys (hidden keys score the float minimum, so a
// row that sees nothing attends uniformly, as the reference does), softmax, context.
template <typename T>
__global__ void AttendKernel(AttentionLaunch a, Scratch sc) {
  const int64_t h = blockIdx.x, bs = blockIdx.y, b = bs / a.S, s = bs % a.S, T_ = a.P + a.S;
  if (!a.head_mask[b * a.H + h]) return;
  const int64_t g = h / (a.H / a.G);
  const float* q = sc.q + bs * a.H * a.E + h * a.E;
  const T* keys = static_cast<const T*>(a.present_key) + (b * a.G + g) * T_ * a.E;
  const T* values = static_cast<const T*>(a.present_value) + (b * a.G + g) * T_ * a.E;
  float* p = sc.scores + (bs * a.H + h) * T_;
  float top = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < T_; j += blockDim.x) {
    float v = -FLT_MAX;
    if (j <= a.P + s && a.attention_mask[b * T_ + j]) {
      v = 0.f;
      for (int64_t e = 0; e < a.E; ++e) v += q[e] * ToFloat(keys[j * a.E + e]);
      v *= a.scale;
    }
    p[j] = v;
    top = fmaxf(top, v);
  }
  top = BlockReduce<true>(top);
  float total = 0.f;
  for (int64_t j = threadIdx.x; j < T_; j += blockDim.x) total += (p[j] = expf(p[j] - top));
  total = BlockReduce<false>(total);  // its barriers also make every p[j] visible to the block
  int64_t k = 0;  // this head's place among the kept heads of row b
  for (int64_t i = 0; i < h; ++i) k += a.head_mask[b * a.H + i] ? 1 : 0;
  for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j < T_; ++j) acc += p[j] * ToFloat(values[j * a.E + e]);
    sc.context[(b * a.H * a.E + k * a.E + e) * a.S + s] = acc / total;
  }
}

template <typename T>
cudaError_t Launch(const AttentionLaunch& a, void* workspace, cudaStream_t stream) {
  const int64_t T_ = a.P + a.S;
  const unsigned BS = static_cast<unsigned>(a.B * a.S);
  const Scratch sc = Scratch::Carve(workspace, a.B, a.S, T_, a.H, a.G, a.E, nullptr);
  CompactMaskKernel<<<static_cast<unsigned>(a.B), 256, 0, stream>>>(a.head_mask, a.H, sc.heads, sc.head_counts);
  ExpandHeadsKernel<<<static_cast<unsigned>(a.B), 256, 0, stream>>>(a.head_mask, sc, a.H, a.G, a.E, a.kv_active);
  if (a.P > 0) {
    const unsigned blocks = Blocks(a.B * a.G * a.P * a.E, 256) < 4096 ? Blocks(a.B * a.G * a.P * a.E, 256) : 4096;
    CopyPastKernel<T><<<blocks, 256, 0, stream>>>(static_cast<const T*>(a.past_key), static_cast<T*>(a.present_key),
                                                  a.B * a.G, a.P, T_, a.E);
    CopyPastKernel<T><<<blocks, 256, 0, stream>>>(static_cast<const T*>(a.past_value),
                                                  static_cast<T*>(a.present_value), a.B * a.G, a.P, T_, a.E);
  }
  ProjectKernel<T><<<dim3(Blocks((a.H + 2 * a.G) * a.E, 8), BS), 256, 0, stream>>>(a, sc);
  if (a.rope) RopeKernel<T><<<dim3(static_cast<unsigned>(a.H + a.G), BS), 64, 0, stream>>>(a, sc);
  AttendKernel<T><<<dim3(static_cast<unsigned>(a.H), BS), 128, 0, stream>>>(a, sc);
  GatherProjectKernel<T><<<dim3(Blocks(a.D, 256), BS), 256, 0, stream>>>(
      sc.o_rows, sc.o_counts, a.H * a.E, sc.context, static_cast<const T*>(a.w_o_t), static_cast<const T*>(a.b_o),
      static_cast<T*>(a.y), a.S, a.D);
  return cudaGetLastError();
}

}  // namespace

size_t AttentionWorkspaceBytes(int64_t B, int64_t S, int64_t T, int64_t H, int64_t G, int64_t E) {
  size_t bytes = 0;
  Scratch::Carve(nullptr, B, S, T, H, G, E, &bytes);
  return bytes;
}

cudaError_t LaunchSparseHeadAttention(const AttentionLaunch& a, void* workspace, cudaStream_t stream) {
  if (a.B == 0 || a.S == 0) return cudaSuccess;
  return a.dtype == DType::kFloat16 ? Launch<__half>(a, workspace, stream) : Launch<float>(a, workspace, stream);
}

}  // namespace cuda
}  // namespace shadowllm
