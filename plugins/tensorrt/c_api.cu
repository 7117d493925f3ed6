// A small C ABI over the CUDA kernels so that tests can run them from Python (ctypes) against the
// float64 NumPy reference on a GPU, with no TensorRT: host arrays in, host arrays out, plus the
// time of one launch (after a warm-up launch) measured with CUDA events.
#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <vector>

#include "sparse_head_attention/kernel.h"
#include "sparse_neuron_mlp/kernel.h"

#define SHADOWLLM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

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

// Warm-up launch, then one timed launch; both write the same outputs.
template <typename Launch>
int32_t TimedRun(Launch launch, float* kernel_ms) {
  cudaEvent_t start, stop;
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) return Fail("cudaEventCreate");
  cudaError_t err = launch();
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err == cudaSuccess) {
    cudaEventRecord(start);
    err = launch();
    cudaEventRecord(stop);
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
  }
  float ms = 0.f;
  if (err == cudaSuccess) cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (err != cudaSuccess) {
    g_error = std::string("kernel launch: ") + cudaGetErrorString(err);
    return 1;
  }
  if (kernel_ms) *kernel_ms = ms;
  return 0;
}

}  // namespace

SHADOWLLM_EXPORT int32_t shadowllm_cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

SHADOWLLM_EXPORT const char* shadowllm_cuda_last_error() { return g_error.c_str(); }

// dtype: 0 fp32, 1 fp16 (every float array in that type); activation: 0 relu, 1 gelu, 2 gelu_tanh, 3 silu.
SHADOWLLM_EXPORT int32_t shadowllm_cuda_sparse_neuron_mlp(const void* x, const void* w_in, const void* b_in,
                                                          const void* w_gate, const void* w_out_t, const void* b_out,
                                                          const bool* mask, void* y, int64_t B, int64_t S, int64_t D,
                                                          int64_t F, int32_t activation, int32_t dtype,
                                                          float* kernel_ms) {
  using namespace shadowllm::cuda;
  const size_t e = DTypeBytes(static_cast<DType>(dtype));
  DeviceArrays dev;
  MLPLaunch a{};
  a.x = dev.Upload(x, B * S * D * e);
  a.w_in = dev.Upload(w_in, F * D * e);
  a.b_in = dev.Upload(b_in, F * e);
  a.w_gate = dev.Upload(w_gate, F * D * e);
  a.w_out_t = dev.Upload(w_out_t, F * D * e);
  a.b_out = dev.Upload(b_out, D * e);
  a.mask = static_cast<const bool*>(dev.Upload(mask, B * F));
  a.y = dev.Alloc(B * S * D * e);
  a.B = B, a.S = S, a.D = D, a.F = F;
  a.activation = static_cast<shadowllm::Activation>(activation);
  a.dtype = static_cast<DType>(dtype);
  void* workspace = dev.Alloc(MLPWorkspaceBytes(B, S, F));
  if (!dev.ok()) return Fail("device allocation or upload");
  if (TimedRun([&] { return LaunchSparseNeuronMLP(a, workspace, nullptr); }, kernel_ms)) return 1;
  if (cudaMemcpy(y, a.y, B * S * D * e, cudaMemcpyDeviceToHost) != cudaSuccess) return Fail("download");
  return 0;
}

SHADOWLLM_EXPORT int32_t shadowllm_cuda_sparse_head_attention(
    const void* x, const void* w_q, const void* b_q, const void* w_k, const void* b_k, const void* w_v, const void* b_v,
    const void* w_o_t, const void* b_o, const void* past_key, const void* past_value, const int64_t* attention_mask,
    const int64_t* position_ids, const void* cos, const void* sin, int64_t max_positions, const bool* head_mask,
    void* y, void* present_key, void* present_value, int64_t B, int64_t S, int64_t D, int64_t P, int64_t H, int64_t G,
    int64_t E, float scale, int32_t rope, int32_t kv_active, int32_t dtype, float* kernel_ms) {
  using namespace shadowllm::cuda;
  const size_t e = DTypeBytes(static_cast<DType>(dtype));
  const int64_t T = P + S;
  DeviceArrays dev;
  AttentionLaunch a{};
  a.x = dev.Upload(x, B * S * D * e);
  a.w_q = dev.Upload(w_q, H * E * D * e);
  a.b_q = dev.Upload(b_q, H * E * e);
  a.w_k = dev.Upload(w_k, G * E * D * e);
  a.b_k = dev.Upload(b_k, G * E * e);
  a.w_v = dev.Upload(w_v, G * E * D * e);
  a.b_v = dev.Upload(b_v, G * E * e);
  a.w_o_t = dev.Upload(w_o_t, H * E * D * e);
  a.b_o = dev.Upload(b_o, D * e);
  a.past_key = dev.Upload(past_key, B * G * P * E * e);
  a.past_value = dev.Upload(past_value, B * G * P * E * e);
  a.attention_mask = static_cast<const int64_t*>(dev.Upload(attention_mask, B * T * sizeof(int64_t)));
  a.position_ids = static_cast<const int64_t*>(dev.Upload(position_ids, B * S * sizeof(int64_t)));
  a.cos = dev.Upload(rope ? cos : nullptr, max_positions * (E / 2) * e);
  a.sin = dev.Upload(rope ? sin : nullptr, max_positions * (E / 2) * e);
  a.head_mask = static_cast<const bool*>(dev.Upload(head_mask, B * H));
  a.y = dev.Alloc(B * S * D * e);
  a.present_key = dev.Alloc(B * G * T * E * e);
  a.present_value = dev.Alloc(B * G * T * E * e);
  a.B = B, a.S = S, a.D = D, a.P = P, a.H = H, a.G = G, a.E = E;
  a.scale = scale;
  a.rope = rope != 0;
  a.kv_active = kv_active != 0;
  a.dtype = static_cast<DType>(dtype);
  void* workspace = dev.Alloc(AttentionWorkspaceBytes(B, S, T, H, G, E));
  if (!dev.ok()) return Fail("device allocation or upload");
  if (TimedRun([&] { return LaunchSparseHeadAttention(a, workspace, nullptr); }, kernel_ms)) return 1;
  if (cudaMemcpy(y, a.y, B * S * D * e, cudaMemcpyDeviceToHost) != cudaSuccess ||
      cudaMemcpy(present_key, a.present_key, B * G * T * E * e, cudaMemcpyDeviceToHost) != cudaSuccess ||
      cudaMemcpy(present_value, a.present_value, B * G * T * E * e, cudaMemcpyDeviceToHost) != cudaSuccess)
    return Fail("download");
  return 0;
}
