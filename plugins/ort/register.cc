// Entry point ONNX Runtime calls when the library is registered (SessionOptions.register_custom_ops_library).
#include <mutex>
#include <string>

#include "blocked_matmul/op.h"
#include "common/ort_helpers.h"
#include "sparse_head_attention/op.h"
#include "sparse_neuron_mlp/op.h"

namespace {
shadowllm::SparseNeuronMLPOp g_mlp;
shadowllm::SparseHeadAttentionOp g_attention;
shadowllm::BlockedMatMulOp g_matmul;
}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  const OrtApi* ort = api->GetApi(ORT_API_VERSION);
  if (ort == nullptr) {
    // An onnxruntime older than the headers we were built against: it has no API of our version, so
    // refuse with its own (version 1) API instead of dereferencing null.
    const OrtApi* oldest = api->GetApi(1);
    static const std::string message =
        "libshadowllm_ort_ops.so needs onnxruntime with ORT API " + std::to_string(ORT_API_VERSION) +
        " (onnxruntime >= 1." + std::to_string(ORT_API_VERSION) + "); this onnxruntime is " +
        api->GetVersionString();
    return oldest == nullptr ? nullptr : oldest->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(ort);
  static std::mutex lock;
  std::lock_guard<std::mutex> guard(lock);
  try {
    // One domain object per registration: the session keeps a reference to it.
    static std::vector<Ort::CustomOpDomain> domains;
    domains.emplace_back("ai.shadowllm");
    domains.back().Add(&g_mlp);
    domains.back().Add(&g_attention);
    domains.back().Add(&g_matmul);
    Ort::UnownedSessionOptions(options).Add(domains.back());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
