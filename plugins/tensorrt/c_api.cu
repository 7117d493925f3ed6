// A small C ABI over the CUDA kernels, with no TensorRT:
//  - host-array entries for the tests (upload, run twice — the second run on the workspace the
//    first left, timed with CUDA events — download), compared against the float64 NumPy reference;
//  - device-pointer entries for the CUDA runtime backend and the GPU benchmark: device buffers, a
//    workspace and a stream in; no host copies, no synchronisation;
//  - the launch-shape knobs the benchmark sweeps.
// dtype: 0 fp32, 1 fp16, 2 bf16 (every float array in that type; thresholds are fp32 scalars);
// activation: 0 relu, 1 gelu, 2 gelu_tanh, 3 silu.
#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <vector>

#include "sparse_head_attention/kernel.h"
#include "sparse_neuron_mlp/kernel.h"

#define SHADOWLLM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using namespace shadowllm::cuda;

thread_local std::string g_error;

// Device copies of host arrays, freed on scope exit. A null host pointer stays null.
class DeviceArrays {
 public:
  ~DeviceArrays() {
    for (void* p : owned_) cudaFree(p);
  }
  void* Upload(const void* host, size_t bytes) {
    if (host == nullptr) return nullptr;
    void* d = Alloc(bytes);
    if (d && cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess) ok_ = false;
    return d;
  }
  void* Alloc(size_t bytes) {
    void* d = nullptr;
    if (cudaMalloc(&d, bytes ? bytes : 1) != cudaSuccess) {
      ok_ = false;
      return nullptr;
    }
    owned_.push_back(d);
    return d;
  }
  bool ok() const { return ok_; }

 private:
  std::vector<void*> owned_;
  bool ok_ = true;
};

int32_t Fail(const std::string& what) {
  g_error = what + ": " + cudaGetErrorString(cudaGetLastError());
  return 1;
}

int32_t Status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return 0;
  g_error = std::string(what) + ": " + cudaGetErrorString(err);
  return 1;
}

// First launch on a fresh (uncleared) workspace, then one timed launch on the workspace the first
// left (workspace_clean): both write the same outputs, so the tests check both paths.
template <typename Launch>
int32_t TimedRun(Launch launch, float* kernel_ms) {
  cudaEvent_t start, stop;
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) return Fail("cudaEventCreate");
  cudaError_t err = launch(false);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err == cudaSuccess) {
    cudaEventRecord(start);
    err = launch(true);
    cudaEventRecord(stop);
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
  }
  float ms = 0.f;
  if (err == cudaSuccess) cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (err != cudaSuccess) return Status(err, "kernel launch");
  if (kernel_ms) *kernel_ms = ms;
  return 0;
}

MLPLaunch MLPArgs(const void* x, const void* w_in, const void* b_in, const void* w_gate, const void* w_out_t,
                  const void* b_out, const bool* mask, const float* t_x, const float* t_h, int32_t channel_major,
                  void* y, int64_t B, int64_t S, int64_t D, int64_t F, int32_t activation, int32_t dtype) {
  MLPLaunch a{};
  a.x = x, a.w_in = w_in, a.b_in = b_in, a.w_gate = w_gate, a.w_out_t = w_out_t, a.b_out = b_out;
  a.mask = mask, a.t_x = t_x, a.t_h = t_h, a.y = y;
  a.B = B, a.S = S, a.D = D, a.F = F;
  a.activation = static_cast<shadowllm::Activation>(activation);
  a.dtype = static_cast<DType>(dtype);
  a.channel_major = channel_major != 0;
  return a;
}

}  // namespace

SHADOWLLM_EXPORT int32_t shadowllm_cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

SHADOWLLM_EXPORT const char* shadowllm_cuda_last_error() { return g_error.c_str(); }

// Launch-shape knobs (a value <= 0 leaves that knob as it is).
SHADOWLLM_EXPORT void shadowllm_cuda_set_tuning(int32_t gather_ctas_per_sm, int32_t rowdot_warps_per_sm,
                                                int32_t attend_ctas_per_sm, int32_t attend_min_keys) {
  Tuning& t = GlobalTuning();
  if (gather_ctas_per_sm > 0) t.gather_ctas_per_sm = gather_ctas_per_sm;
  if (rowdot_warps_per_sm > 0) t.rowdot_warps_per_sm = rowdot_warps_per_sm;
  if (attend_ctas_per_sm > 0) t.attend_ctas_per_sm = attend_ctas_per_sm;
  if (attend_min_keys > 0) t.attend_min_keys = attend_min_keys;
}

// ---------------------------------------------------------------- SparseNeuronMLP
SHADOWLLM_EXPORT int64_t shadowllm_cuda_mlp_workspace_bytes(int64_t B, int64_t S, int64_t D, int64_t F,
                                                            int32_t channel_major) {
  return static_cast<int64_t>(MLPWorkspaceBytes(B, S, D, F, channel_major != 0));
}

// Device pointers (t_x / t_h: device fp32 scalars or null), workspace of mlp_workspace_bytes,
// workspace_clean: 1 when the workspace is as this op's previous launch left it.
SHADOWLLM_EXPORT int32_t shadowllm_cuda_mlp_launch(const void* x, const void* w_in, const void* b_in,
                                                   const void* w_gate, const void* w_out_t, const void* b_out,
                                                   const bool* mask, const float* t_x, const float* t_h,
                                                   int32_t channel_major, void* y, int64_t B, int64_t S, int64_t D,
                                                   int64_t F, int32_t activation, int32_t dtype, void* workspace,
                                                   int32_t workspace_clean, void* stream) {
  MLPLaunch a = MLPArgs(x, w_in, b_in, w_gate, w_out_t, b_out, mask, t_x, t_h, channel_major, y, B, S, D, F,
                        activation, dtype);
  a.workspace_clean = workspace_clean != 0;
  return Status(LaunchSparseNeuronMLP(a, workspace, static_cast<cudaStream_t>(stream)), "SparseNeuronMLP launch");
}

// Host arrays (t_x / t_h: host fp32 scalars or null); w_in / w_gate are [D, F] when channel_major.
SHADOWLLM_EXPORT int32_t shadowllm_cuda_sparse_neuron_mlp(const void* x, const void* w_in, const void* b_in,
                                                          const void* w_gate, const void* w_out_t, const void* b_out,
                                                          const bool* mask, const float* t_x, const float* t_h,
                                                          int32_t channel_major, void* y, int64_t B, int64_t S,
                                                          int64_t D, int64_t F, int32_t activation, int32_t dtype,
                                                          float* kernel_ms) {
  const size_t e = DTypeBytes(static_cast<DType>(dtype));
  DeviceArrays dev;
  MLPLaunch a = MLPArgs(dev.Upload(x, B * S * D * e), dev.Upload(w_in, F * D * e), dev.Upload(b_in, F * e),
                        dev.Upload(w_gate, F * D * e), dev.Upload(w_out_t, F * D * e), dev.Upload(b_out, D * e),
                        static_cast<const bool*>(dev.Upload(mask, B * F)),
                        static_cast<const float*>(dev.Upload(t_x, sizeof(float))),
                        static_cast<const float*>(dev.Upload(t_h, sizeof(float))), channel_major,
                        dev.Alloc(B * S * D * e), B, S, D, F, activation, dtype);
  void* workspace = dev.Alloc(MLPWorkspaceBytes(B, S, D, F, channel_major != 0));
  if (!dev.ok()) return Fail("device allocation or upload");
  auto launch = [&](bool clean) {
    a.workspace_clean = clean;
    return LaunchSparseNeuronMLP(a, workspace, nullptr);
  };
  if (TimedRun(launch, kernel_ms)) return 1;
  if (cudaMemcpy(y, a.y, B * S * D * e, cudaMemcpyDeviceToHost) != cudaSuccess) return Fail("download");
  return 0;
}

// ---------------------------------------------------------------- SparseHeadAttention
SHADOWLLM_EXPORT int64_t shadowllm_cuda_attention_workspace_bytes(int64_t B, int64_t S, int64_t D, int64_t H,
                                                                  int64_t G, int64_t E) {
  return static_cast<int64_t>(AttentionWorkspaceBytes(B, S, D, H, G, E));
}

// Device pointers. In place: past_key == present_key and past_value == present_value, caches of
// `capacity` positions holding the past in their first P. Otherwise present is [B, G, capacity, E]
// and the past [B, G, P, E] is copied into it. past_length (device int64 scalar, in place only) and
// mask_stride (attention_mask [B, mask_stride]) let one captured CUDA graph serve every decode step;
// null and 0 otherwise.
SHADOWLLM_EXPORT int32_t shadowllm_cuda_attention_launch(
    const void* x, const void* w_q, const void* b_q, const void* w_k, const void* b_k, const void* w_v, const void* b_v,
    const void* w_o_t, const void* b_o, const void* past_key, const void* past_value, const int64_t* attention_mask,
    const int64_t* position_ids, const void* cos, const void* sin, int64_t rope_positions, const bool* head_mask,
    const float* t_x, const float* t_o, void* y, void* present_key, void* present_value, int64_t B, int64_t S,
    int64_t D, int64_t P, int64_t H, int64_t G, int64_t E, int64_t capacity, float scale, int32_t rope,
    int32_t kv_active, int32_t dtype, void* workspace, int32_t workspace_clean, void* stream,
    const int64_t* past_length, int64_t mask_stride, const void* q_norm, const void* k_norm, float qk_norm_eps,
    int64_t window, int64_t rope_half) {
  AttentionLaunch a{};
  a.x = x, a.w_q = w_q, a.b_q = b_q, a.w_k = w_k, a.b_k = b_k, a.w_v = w_v, a.b_v = b_v;
  a.w_o_t = w_o_t, a.b_o = b_o, a.past_key = past_key, a.past_value = past_value;
  a.attention_mask = attention_mask, a.position_ids = position_ids;
  a.cos = rope ? cos : nullptr, a.sin = rope ? sin : nullptr, a.head_mask = head_mask, a.t_x = t_x, a.t_o = t_o;
  a.y = y, a.present_key = present_key, a.present_value = present_value;
  a.B = B, a.S = S, a.D = D, a.P = P, a.H = H, a.G = G, a.E = E, a.capacity = capacity;
  a.rope_positions = rope ? rope_positions : 0;
  a.scale = scale, a.rope = rope != 0, a.kv_active = kv_active != 0;
  a.dtype = static_cast<DType>(dtype);
  a.workspace_clean = workspace_clean != 0;
  a.past_length = past_length, a.mask_stride = mask_stride;
  a.q_norm = q_norm, a.k_norm = k_norm, a.qk_norm_eps = qk_norm_eps, a.window = window;
  a.rope_half = rope ? rope_half : 0;
  if (const char* why = AttentionUnsupported(a)) {
    g_error = std::string("SparseHeadAttention launch: ") + why;
    return 1;
  }
  return Status(LaunchSparseHeadAttention(a, workspace, static_cast<cudaStream_t>(stream)),
                "SparseHeadAttention launch");
}

// Host arrays. capacity == 0: present = past + new ([B, G, P+S, E]) from past_key / past_value.
// q_norm / k_norm ([E], or null), window (0: every key) and rope_half (cos / sin width; 0: E / 2) as
// the launch above takes them.
// capacity > 0: in place — present_key / present_value are [B, G, capacity, E] in and out, their
// first P positions the past (past_key / past_value are not read); the new rows are written at
// P..P+S-1 and every other position is left as it was.
SHADOWLLM_EXPORT int32_t shadowllm_cuda_sparse_head_attention(
    const void* x, const void* w_q, const void* b_q, const void* w_k, const void* b_k, const void* w_v, const void* b_v,
    const void* w_o_t, const void* b_o, const void* past_key, const void* past_value, const int64_t* attention_mask,
    const int64_t* position_ids, const void* cos, const void* sin, int64_t rope_positions, const bool* head_mask,
    const float* t_x, const float* t_o, void* y, void* present_key, void* present_value, int64_t B, int64_t S,
    int64_t D, int64_t P, int64_t H, int64_t G, int64_t E, int64_t capacity, float scale, int32_t rope,
    int32_t kv_active, int32_t dtype, float* kernel_ms, const void* q_norm, const void* k_norm, float qk_norm_eps,
    int64_t window, int64_t rope_half) {
  const size_t e = DTypeBytes(static_cast<DType>(dtype));
  const int64_t T = P + S;
  const int64_t half = rope_half ? rope_half : E / 2;
  const bool in_place = capacity > 0;
  const int64_t cap = in_place ? capacity : T;
  const size_t cache_bytes = B * G * cap * E * e;
  DeviceArrays dev;
  void* d_present_key = in_place ? dev.Upload(present_key, cache_bytes) : dev.Alloc(cache_bytes);
  void* d_present_value = in_place ? dev.Upload(present_value, cache_bytes) : dev.Alloc(cache_bytes);
  const void* d_past_key = in_place ? d_present_key : dev.Upload(past_key, B * G * P * E * e);
  const void* d_past_value = in_place ? d_present_value : dev.Upload(past_value, B * G * P * E * e);
  void* d_y = dev.Alloc(B * S * D * e);
  void* workspace = dev.Alloc(AttentionWorkspaceBytes(B, S, D, H, G, E));
  auto up = [&](const void* p, size_t n) { return dev.Upload(p, n); };
  const void *d_x = up(x, B * S * D * e), *d_wq = up(w_q, H * E * D * e), *d_bq = up(b_q, H * E * e);
  const void *d_wk = up(w_k, G * E * D * e), *d_bk = up(b_k, G * E * e), *d_wv = up(w_v, G * E * D * e);
  const void *d_bv = up(b_v, G * E * e), *d_wo = up(w_o_t, H * E * D * e), *d_bo = up(b_o, D * e);
  const auto* d_mask = static_cast<const int64_t*>(up(attention_mask, B * T * sizeof(int64_t)));
  const auto* d_pos = static_cast<const int64_t*>(up(position_ids, B * S * sizeof(int64_t)));
  const void* d_cos = up(rope ? cos : nullptr, rope_positions * half * e);
  const void* d_sin = up(rope ? sin : nullptr, rope_positions * half * e);
  const void *d_qn = up(q_norm, E * e), *d_kn = up(k_norm, E * e);
  const auto* d_heads = static_cast<const bool*>(up(head_mask, B * H));
  const auto* d_tx = static_cast<const float*>(up(t_x, sizeof(float)));
  const auto* d_to = static_cast<const float*>(up(t_o, sizeof(float)));
  if (!dev.ok()) return Fail("device allocation or upload");
  std::string refused;  // the launch's own reason, kept over TimedRun's generic one
  auto launch = [&](bool clean) {
    const int32_t rc = shadowllm_cuda_attention_launch(
        d_x, d_wq, d_bq, d_wk, d_bk, d_wv, d_bv, d_wo, d_bo, d_past_key, d_past_value, d_mask, d_pos, d_cos, d_sin,
        rope_positions, d_heads, d_tx, d_to, d_y, d_present_key, d_present_value, B, S, D, P, H, G, E, cap, scale,
        rope, kv_active, dtype, workspace, clean, nullptr, nullptr, 0, d_qn, d_kn, qk_norm_eps, window, rope_half);
    if (rc != 0) refused = g_error;
    return rc == 0 ? cudaSuccess : cudaErrorInvalidValue;
  };
  if (TimedRun(launch, kernel_ms)) {
    if (!refused.empty()) g_error = refused;
    return 1;
  }
  if (cudaMemcpy(y, d_y, B * S * D * e, cudaMemcpyDeviceToHost) != cudaSuccess ||
      cudaMemcpy(present_key, d_present_key, cache_bytes, cudaMemcpyDeviceToHost) != cudaSuccess ||
      cudaMemcpy(present_value, d_present_value, cache_bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
    return Fail("download");
  return 0;
}
