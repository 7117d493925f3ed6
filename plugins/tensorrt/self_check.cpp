// Host-side checks of the plugin objects that need neither TensorRT's runtime nor a GPU, exported
// as C so that tests can call them through ctypes: the creators getCreators returns, attribute
// round trips through getFieldsToSerialize, the format combinations offered, a bad attribute
// reaching the logger TensorRT would have installed, and the runtime shape checks (onShapeChange).
#include <cstdio>
#include <initializer_list>
#include <string>
#include <utility>
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
  const int32_t optional_attn = 0b11110000;  // cos, sin, q_norm, k_norm present; no biases (a Qwen3 / Gemma 3 layer)
  const int64_t window = 512;
  const float qk_eps = 1e-6f;
  std::vector<PluginField> attn_fields{PluginField("num_heads", &heads, PluginFieldType::kINT64, 1),
                                       PluginField("num_kv_heads", &kv, PluginFieldType::kINT64, 1),
                                       PluginField("head_dim", &dim, PluginFieldType::kINT64, 1),
                                       PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
                                       PluginField("rope", &rope, PluginFieldType::kINT64, 1),
                                       PluginField("kv_policy", "active", PluginFieldType::kCHAR, 7),
                                       PluginField("sliding_window", &window, PluginFieldType::kINT64, 1),
                                       PluginField("qk_norm_eps", &qk_eps, PluginFieldType::kFLOAT32, 1),
                                       PluginField("optional_inputs", &optional_attn, PluginFieldType::kINT32, 1)};
  const std::vector<std::vector<PluginField>*> all{&mlp_fields, &attn_fields};
  const DataType F = DataType::kFLOAT, I = DataType::kINT64, M = DataType::kINT32;  // masks: int32
  const std::vector<std::vector<DataType>> index_types{{F, F, F, F, M}, {F, F, F, F, F, F, F, I, I, F, F, M, F, F}};
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

namespace {

nvinfer1::PluginTensorDesc Desc(std::initializer_list<int64_t> dims) {
  nvinfer1::PluginTensorDesc d{};
  d.dims.nbDims = static_cast<int32_t>(dims.size());
  int32_t i = 0;
  for (int64_t v : dims) d.dims.d[i++] = v;
  d.type = DataType::kFLOAT;
  d.format = nvinfer1::TensorFormat::kLINEAR;
  return d;
}

}  // namespace

// onShapeChange on consistent shapes (accepted) and on each kind of mismatch (refused, with the
// reason on TensorRT's logger): one line per case, "ok <case>" or "FAIL <case>: <why>"; 0 when all hold.
SHADOWLLM_EXPORT int32_t shadowllm_trt_shape_check(char* buffer, int32_t size) {
  StubFinder finder;
  setLoggerFinder(&finder);
  const int32_t optional_mlp = 0b010;  // x, w_in, w_gate, w_out_t, mask
  std::vector<PluginField> mlp_fields{PluginField("activation", "silu", PluginFieldType::kCHAR, 5),
                                      PluginField("optional_inputs", &optional_mlp, PluginFieldType::kINT32, 1)};
  const int64_t heads = 9, kv = 3, dim = 64, rope = 1;
  const float scale = 0.125f;
  const int32_t optional_attn = 0b110000;  // cos, sin; no biases
  std::vector<PluginField> attn_fields{PluginField("num_heads", &heads, PluginFieldType::kINT64, 1),
                                       PluginField("num_kv_heads", &kv, PluginFieldType::kINT64, 1),
                                       PluginField("head_dim", &dim, PluginFieldType::kINT64, 1),
                                       PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
                                       PluginField("rope", &rope, PluginFieldType::kINT64, 1),
                                       PluginField("optional_inputs", &optional_attn, PluginFieldType::kINT32, 1)};
  using Shapes = std::vector<nvinfer1::PluginTensorDesc>;
  // x, w_in, w_gate, w_out_t, mask
  const Shapes mlp_ok{Desc({2, 3, 64}), Desc({128, 64}), Desc({128, 64}), Desc({128, 64}), Desc({2, 128})};
  // x, w_q, w_k, w_v, w_o_t, past_key, past_value, attention_mask, position_ids, cos, sin, head_mask
  const Shapes attn_ok{Desc({2, 1, 128}), Desc({576, 128}), Desc({192, 128}), Desc({192, 128}), Desc({576, 128}),
                       Desc({2, 3, 10, 64}), Desc({2, 3, 10, 64}), Desc({2, 11}), Desc({2, 1}), Desc({100, 32}),
                       Desc({100, 32}), Desc({2, 9})};
  struct Case {
    const char* name;
    int32_t op;  // 0 MLP, 1 attention
    std::vector<std::pair<int32_t, nvinfer1::PluginTensorDesc>> changed;  // (input position, its shape)
    const char* reason;  // what the log must say; null: accepted
  };
  const std::vector<Case> cases{
      {"mlp consistent", 0, {}, nullptr},
      {"mlp mask of another width", 0, {{4, Desc({2, 100})}}, "mask is [2,100], expected [2,128]"},
      {"mlp w_in of another hidden size", 0, {{1, Desc({128, 32})}}, "w_in is [128,32], expected [128,64]"},
      {"attention consistent (present = past + new)", 1, {}, nullptr},
      {"attention preallocated cache (capacity 64 >= past 10 + 1)", 1,
       {{5, Desc({2, 3, 64, 64})}, {6, Desc({2, 3, 64, 64})}}, nullptr},
      {"attention key and value caches of different lengths", 1, {{5, Desc({2, 3, 64, 64})}}, "hold 64 and 10 positions: they must match"},
      {"attention caches shorter than the past", 1, {{5, Desc({2, 3, 5, 64})}, {6, Desc({2, 3, 5, 64})}},
       "past_key holds 5 positions; the attention mask says the past is 10"},
      {"attention cache of another kv-head count", 1, {{5, Desc({2, 4, 10, 64})}}, "past_key is [2,4,10,64]"},
      {"attention mask shorter than the new tokens", 1, {{7, Desc({2, 0})}}, "fewer than the 1 new tokens"},
      {"attention head mask of another head count", 1, {{11, Desc({2, 8})}}, "head_mask is [2,8], expected [2,9]"},
      {"attention w_k of another width", 1, {{2, Desc({256, 128})}}, "w_k is [256,128]"},
  };
  std::string report;
  int32_t failures = 0;
  for (const Case& c : cases) {
    std::vector<PluginField>& fields = c.op == 0 ? mlp_fields : attn_fields;
    const PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    nvinfer1::IPluginV3* plugin = Creator(c.op)->createPlugin("shapes", &fc, nvinfer1::TensorRTPhase::kRUNTIME);
    if (plugin == nullptr) {
      report += std::string("FAIL ") + c.name + ": createPlugin failed\n";
      ++failures;
      continue;
    }
    auto* runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    Shapes in = c.op == 0 ? mlp_ok : attn_ok;
    for (const auto& [position, desc] : c.changed) in[static_cast<size_t>(position)] = desc;
    const nvinfer1::PluginTensorDesc out[3] = {in[0], in[0], in[0]};
    finder.logger.last.clear();
    const int32_t rc = runtime->onShapeChange(in.data(), static_cast<int32_t>(in.size()), out, c.op == 0 ? 1 : 3);
    const bool ok = c.reason == nullptr ? rc == 0 : rc != 0 && finder.logger.last.find(c.reason) != std::string::npos;
    report += std::string(ok ? "ok " : "FAIL ") + c.name + (finder.logger.last.empty() ? "" : ": " + finder.logger.last) + "\n";
    failures += ok ? 0 : 1;
    delete plugin;
  }
  setLoggerFinder(nullptr);
  Write(report, buffer, size);
  return failures;
}
