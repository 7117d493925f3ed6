// Entry point ONNX Runtime calls when the library is registered (SessionOptions.register_custom_ops_library).
#include <mutex>

#include "common/ort_helpers.h"
#include "sparse_head_attention/op.h"
#include "sparse_neuron_mlp/op.h"

namespace {
shadowllm::SparseNeuronMLPOp g_mlp;
shadowllm::SparseHeadAttentionOp g_attention;
}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  Ort::InitApi(api->GetApi(ORT_API_VERSION));
  static std::mutex lock;
  std::lock_guard<std::mutex> guard(lock);
  try {
    // One domain object per registration: the session keeps a reference to it.
    static std::vector<Ort::CustomOpDomain> domains;
    domains.emplace_back("ai.shadowllm");
    domains.back().Add(&g_mlp);
    domains.back().Add(&g_attention);
    Ort::UnownedSessionOptions(options).Add(domains.back());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
