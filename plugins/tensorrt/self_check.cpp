// Host-side checks of the plugin objects that need neither TensorRT's runtime nor a GPU, exported
// as C so that tests can call them through ctypes: the creators getCreators returns, attribute
// round trips through getFieldsToSerialize, the format combinations offered, and a bad attribute
// reaching the logger TensorRT would have installed.
#include <cstdio>
#include <string>
#include <vector>

#include "sparse_head_attention/plugin.h"
#include "sparse_neuron_mlp/plugin.h"

#define SHADOWLLM_EXPORT extern "C" __attribute__((visibility("default")))

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nb_creators);
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder);

namespace {

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

void Write(const std::string& text, char* buffer, int32_t size) {
  if (buffer && size > 0) std::snprintf(buffer, static_cast<size_t>(size), "%s", text.c_str());
}

nvinfer1::IPluginCreatorV3One* Creator(int32_t i) {
  int32_t n = 0;
  nvinfer1::IPluginCreatorInterface* const* creators = getCreators(n);
  return i < n ? static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]) : nullptr;
}

std::string Describe(const PluginFieldCollection* fc) {
  std::string out;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    const PluginField& f = fc->fields[i];
    out += std::string(i ? "," : "") + f.name + "=";
    if (f.type == PluginFieldType::kCHAR) out += static_cast<const char*>(f.data);
    if (f.type == PluginFieldType::kINT32) out += std::to_string(*static_cast<const int32_t*>(f.data));
    if (f.type == PluginFieldType::kFLOAT32) out += std::to_string(*static_cast<const float*>(f.data));
  }
  return out;
}

struct CapturingLogger : nvinfer1::ILogger {
  std::string last;
  void log(Severity, const char* msg) noexcept override { last = msg; }
};
struct StubFinder : nvinfer1::ILoggerFinder {
  CapturingLogger logger;
  nvinfer1::ILogger* findLogger() override { return &logger; }
};

// Offers every position fp32, fp16, then bf16 and the op's index types; returns "ok" or what failed.
std::string CheckFormats(nvinfer1::IPluginV3* plugin, const std::vector<DataType>& index_types, int32_t nb_inputs,
                         int32_t nb_outputs) {
  auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
  for (DataType ft : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
    std::vector<nvinfer1::DynamicPluginTensorDesc> io(static_cast<size_t>(nb_inputs + nb_outputs));
    for (int32_t pos = 0; pos < nb_inputs + nb_outputs; ++pos) {
      const DataType want = pos < nb_inputs && index_types[pos] != DataType::kFLOAT ? index_types[pos] : ft;
      io[pos].desc.format = nvinfer1::TensorFormat::kLINEAR;
      io[pos].desc.type = want;
      if (!build->supportsFormatCombination(pos, io.data(), nb_inputs, nb_outputs))
        return "position " + std::to_string(pos) + " refused its type";
      io[pos].desc.type = DataType::kINT8;
      if (build->supportsFormatCombination(pos, io.data(), nb_inputs, nb_outputs))
        return "position " + std::to_string(pos) + " accepted int8";
      io[pos].desc.type = want;
    }
  }
  return "ok";
}

}  // namespace

// "name version namespace" per creator, one line each.
SHADOWLLM_EXPORT int32_t shadowllm_trt_describe_creators(char* buffer, int32_t size) {
  std::string out;
  int32_t n = 0;
  getCreators(n);
  for (int32_t i = 0; i < n; ++i) {
    nvinfer1::IPluginCreatorV3One* c = Creator(i);
    out += std::string(c->getPluginName()) + " " + c->getPluginVersion() + " " + c->getPluginNamespace() + " " +
           c->getInterfaceInfo().kind + "\n";
  }
  Write(out, buffer, size);
  return n;
}

// Creates each plugin from node-like attributes, serialises, re-creates, compares; 0 when all hold.
SHADOWLLM_EXPORT int32_t shadowllm_trt_self_check(char* buffer, int32_t size) {
  StubFinder finder;
  setLoggerFinder(&finder);
  std::string report;
  auto fail = [&](const std::string& why) {
    setLoggerFinder(nullptr);
    Write(why, buffer, size);
    return 1;
  };

  const char* act = "silu";
  const int32_t optional_mlp = 0b010;  // w_gate present, biases absent: a Llama MLP
  std::vector<PluginField> mlp_fields{PluginField("activation", act, PluginFieldType::kCHAR, 5),
                                      PluginField("optional_inputs", &optional_mlp, PluginFieldType::kINT32, 1),
                                      PluginField("plugin_version", "1", PluginFieldType::kCHAR, 2)};
  const int64_t heads = 9, kv = 3, dim = 64, rope = 1;  // int64 as some parsers pass them
  const float scale = 0.125f;
  const int32_t optional_attn = 0b110000;  // cos, sin present; no biases
  std::vector<PluginField> attn_fields{PluginField("num_heads", &heads, PluginFieldType::kINT64, 1),
                                       PluginField("num_kv_heads", &kv, PluginFieldType::kINT64, 1),
                                       PluginField("head_dim", &dim, PluginFieldType::kINT64, 1),
                                       PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
                                       PluginField("rope", &rope, PluginFieldType::kINT64, 1),
                                       PluginField("kv_policy", "active", PluginFieldType::kCHAR, 7),
                                       PluginField("optional_inputs", &optional_attn, PluginFieldType::kINT32, 1)};
  const std::vector<std::vector<PluginField>*> all{&mlp_fields, &attn_fields};
  const DataType F = DataType::kFLOAT, I = DataType::kINT64, M = DataType::kINT32;  // masks: int32
  const std::vector<std::vector<DataType>> index_types{{F, F, F, F, M}, {F, F, F, F, F, F, F, I, I, F, F, M}};
  const int32_t nb_outputs[] = {1, 3};

  for (int32_t i = 0; i < 2; ++i) {
    nvinfer1::IPluginCreatorV3One* creator = Creator(i);
    const PluginFieldCollection fc{static_cast<int32_t>(all[i]->size()), all[i]->data()};
    nvinfer1::IPluginV3* plugin = creator->createPlugin("check", &fc, nvinfer1::TensorRTPhase::kBUILD);
    if (plugin == nullptr) return fail(std::string(creator->getPluginName()) + ": createPlugin failed: " + finder.logger.last);
    auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
    auto* runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
    if (std::string(core->getPluginName()) != creator->getPluginName()) return fail("plugin and creator names differ");
    if (build->getNbOutputs() != nb_outputs[i]) return fail(std::string(core->getPluginName()) + ": wrong output count");
    const std::string first = Describe(runtime->getFieldsToSerialize());
    nvinfer1::IPluginV3* again = creator->createPlugin("again", runtime->getFieldsToSerialize(), nvinfer1::TensorRTPhase::kRUNTIME);
    if (again == nullptr) return fail(std::string(core->getPluginName()) + ": re-creating from serialised fields failed");
    auto* again_runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(again->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    const std::string second = Describe(again_runtime->getFieldsToSerialize());
    if (first != second) return fail("round trip changed fields: " + first + " vs " + second);
    const std::string formats = CheckFormats(plugin, index_types[i], static_cast<int32_t>(index_types[i].size()), nb_outputs[i]);
    if (formats != "ok") return fail(std::string(core->getPluginName()) + ": " + formats);
    DataType out_types[3];
    const DataType in_types[1] = {DataType::kHALF};
    if (build->getOutputDataTypes(out_types, nb_outputs[i], in_types, 1) != 0 || out_types[0] != DataType::kHALF)
      return fail("output types do not follow x");
    report += std::string(core->getPluginName()) + ": " + first + "\n";
    delete again;
    delete plugin;
  }

  // A bad attribute: no plugin, and the reason on TensorRT's logger.
  const char* bad = "tanh";
  const PluginField bad_field("activation", bad, PluginFieldType::kCHAR, 5);
  const PluginFieldCollection bad_fc{1, &bad_field};
  if (Creator(0)->createPlugin("bad", &bad_fc, nvinfer1::TensorRTPhase::kBUILD) != nullptr)
    return fail("activation 'tanh' was accepted");
  report += "bad activation logged: " + finder.logger.last + "\n";
  setLoggerFinder(nullptr);
  Write(report, buffer, size);
  return 0;
}
