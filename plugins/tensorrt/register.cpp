// The two symbols TensorRT looks for when it loads a plugin library (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins, polygraphy --plugins): getCreators and setLoggerFinder.
#include "sparse_head_attention/plugin.h"
#include "sparse_neuron_mlp/plugin.h"

#define SHADOWLLM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {
shadowllm::trt::SparseNeuronMLPCreator g_mlp_creator;
shadowllm::trt::SparseHeadAttentionCreator g_attention_creator;
nvinfer1::IPluginCreatorInterface* const g_creators[] = {&g_mlp_creator, &g_attention_creator};
}  // namespace

SHADOWLLM_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { shadowllm::trt::SetLoggerFinder(finder); }

SHADOWLLM_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nb_creators) {
  nb_creators = static_cast<int32_t>(sizeof(g_creators) / sizeof(g_creators[0]));
  return g_creators;
}
