#include "plugin.h"

#include <tuple>
#include <utility>

namespace shadowllm {
namespace trt {

using nvinfer1::DimensionOperation;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

SparseHeadAttentionPlugin::SparseHeadAttentionPlugin(AttentionConfig config, int64_t optional_inputs)
    : config_(config), inputs_(kSlots, {kBQ, kBK, kBV, kBO, kCos, kSin, kQNorm, kKNorm}, optional_inputs) {
  if (config.num_heads <= 0 || config.num_kv_heads <= 0 || config.head_dim <= 0 ||
      config.num_heads % config.num_kv_heads != 0)
    throw std::invalid_argument("num_heads, num_kv_heads, head_dim must be positive and num_heads a multiple of "
                                "num_kv_heads");
  if (config.rope && (inputs_.Index(kCos) < 0 || inputs_.Index(kSin) < 0))
    throw std::invalid_argument("rope=1 needs the cos and sin inputs");
  if (config.rope && config.head_dim % 2 != 0) throw std::invalid_argument("rope=1 needs an even head_dim");
  if ((inputs_.Index(kQNorm) < 0) != (inputs_.Index(kKNorm) < 0))
    throw std::invalid_argument("q_norm and k_norm come together");
  if (config.window < 0) throw std::invalid_argument("sliding_window must be >= 0");
}

nvinfer1::IPluginV3* SparseHeadAttentionPlugin::clone() noexcept {
  try {
    return new SparseHeadAttentionPlugin(config_, inputs_.Bits());
  } catch (...) {
    return nullptr;
  }
}

int32_t SparseHeadAttentionPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                                                   const nvinfer1::DimsExprs*, int32_t, nvinfer1::DimsExprs* outputs,
                                                   int32_t nb_outputs, nvinfer1::IExprBuilder& builder) noexcept {
  if (nb_inputs != inputs_.Count() || nb_outputs != 3 || inputs[0].nbDims != 3 ||
      inputs[inputs_.Index(kPastKey)].nbDims != 4) {
    Log(nvinfer1::ILogger::Severity::kERROR, "SparseHeadAttention: expected " + std::to_string(inputs_.Count()) +
                                                 " inputs (x rank 3, caches rank 4), got " + std::to_string(nb_inputs));
    return -1;
  }
  const nvinfer1::DimsExprs& x = inputs[inputs_.Index(kX)];
  const nvinfer1::DimsExprs& past = inputs[inputs_.Index(kPastKey)];
  const nvinfer1::DimsExprs& mask = inputs[inputs_.Index(kAttentionMask)];
  outputs[0] = x;
  nvinfer1::DimsExprs present = past;  // [B, G, max(C, T), E]: past_key's C positions or the mask's T
  present.d[2] = builder.operation(DimensionOperation::kMAX, *past.d[2], *mask.d[1]);
  outputs[1] = present;
  outputs[2] = present;
  return 0;
}

std::string SparseHeadAttentionPlugin::ShapeError(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs) const {
  if (nb_inputs != inputs_.Count()) return "expected " + std::to_string(inputs_.Count()) + " inputs";
  auto dims = [&](Slot s) -> const nvinfer1::Dims& { return in[inputs_.Index(s)].dims; };
  const nvinfer1::Dims& x = dims(kX);
  if (x.nbDims != 3) return "x is " + DimsText(x) + ", expected [B,S,D]";
  const int64_t B = x.d[0], S = x.d[1], D = x.d[2];
  const int64_t H = config_.num_heads, G = config_.num_kv_heads, E = config_.head_dim;
  const nvinfer1::Dims& mask = dims(kAttentionMask);
  std::string why = ExpectDims(mask, {B, -1}, "attention_mask");
  if (!why.empty()) return why;
  const int64_t T = mask.d[1];
  if (T < S) return "attention_mask covers " + std::to_string(T) + " positions, fewer than the " + std::to_string(S) +
                    " new tokens";
  for (auto [slot, name, rows] : {std::tuple{kWQ, "w_q", H * E}, std::tuple{kWK, "w_k", G * E},
                                  std::tuple{kWV, "w_v", G * E}, std::tuple{kWOT, "w_o_t", H * E}})
    if (why.empty()) why = ExpectDims(dims(slot), {rows, D}, name);
  for (auto [slot, name, rows] : {std::tuple{kBQ, "b_q", H * E}, std::tuple{kBK, "b_k", G * E},
                                  std::tuple{kBV, "b_v", G * E}, std::tuple{kBO, "b_o", D}})
    if (why.empty() && inputs_.Index(slot) >= 0) why = ExpectDims(dims(slot), {rows}, name);
  for (auto [slot, name] : {std::pair{kPastKey, "past_key"}, std::pair{kPastValue, "past_value"}})
    if (why.empty()) why = ExpectDims(dims(slot), {B, G, -1, E}, name);
  if (!why.empty()) return why;
  // The past is past_key's first T - S positions (the op contract): it must hold them.
  const int64_t C = dims(kPastKey).d[2];
  if (dims(kPastValue).d[2] != C)
    return "past_key and past_value hold " + std::to_string(C) + " and " + std::to_string(dims(kPastValue).d[2]) +
           " positions: they must match";
  if (C < T - S)
    return "past_key holds " + std::to_string(C) + " positions; the attention mask says the past is " +
           std::to_string(T - S);
  why = ExpectDims(dims(kPositionIds), {B, S}, "position_ids");
  if (why.empty()) why = ExpectDims(dims(kHeadMask), {B, H}, "head_mask");
  for (auto [slot, name] : {std::pair{kCos, "cos"}, std::pair{kSin, "sin"}})  // [M, R/2], R <= E (partial rotary)
    if (why.empty() && inputs_.Index(slot) >= 0) {
      why = ExpectDims(dims(slot), {-1, -1}, name);
      if (why.empty() && (dims(slot).d[1] < 1 || 2 * dims(slot).d[1] > E))
        why = std::string(name) + " is " + DimsText(dims(slot)) + ": its width must lie in 1..head_dim/2";
    }
  for (auto [slot, name] : {std::pair{kQNorm, "q_norm"}, std::pair{kKNorm, "k_norm"}})
    if (why.empty() && inputs_.Index(slot) >= 0) why = ExpectDims(dims(slot), {E}, name);
  return why;
}

bool SparseHeadAttentionPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out,
                                                          int32_t nb_inputs, int32_t) noexcept {
  if (pos >= nb_inputs) return SupportsSlot(SlotKind::kFloat, in_out, pos);
  if (pos == inputs_.Index(kHeadMask)) return SupportsSlot(SlotKind::kMask, in_out, pos);
  if (pos == inputs_.Index(kAttentionMask) || pos == inputs_.Index(kPositionIds))
    return SupportsSlot(SlotKind::kInt64, in_out, pos);
  return SupportsSlot(SlotKind::kFloat, in_out, pos);
}

size_t SparseHeadAttentionPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t,
                                                   const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept {
  const nvinfer1::Dims& x = inputs[inputs_.Index(kX)].max;
  return cuda::AttentionWorkspaceBytes(x.d[0], x.d[1], x.d[2], config_.num_heads, config_.num_kv_heads,
                                       config_.head_dim);
}

int32_t SparseHeadAttentionPlugin::enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                                           const nvinfer1::PluginTensorDesc*, const void* const* inputs,
                                           void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  auto in = [&](Slot s) { return inputs_.Get(inputs, s); };
  const nvinfer1::Dims& x = input_desc[inputs_.Index(kX)].dims;
  cuda::AttentionLaunch a{};
  a.x = in(kX);
  a.w_q = in(kWQ);
  a.b_q = in(kBQ);
  a.w_k = in(kWK);
  a.b_k = in(kBK);
  a.w_v = in(kWV);
  a.b_v = in(kBV);
  a.w_o_t = in(kWOT);
  a.b_o = in(kBO);
  a.past_key = in(kPastKey);
  a.past_value = in(kPastValue);
  a.attention_mask = static_cast<const int64_t*>(in(kAttentionMask));
  a.position_ids = static_cast<const int64_t*>(in(kPositionIds));
  a.cos = in(kCos);
  a.sin = in(kSin);
  a.head_mask = in(kHeadMask);
  a.mask_int32 = true;  // supportsFormatCombination accepts int32 only (the prepared graph casts the bool mask)
  a.y = outputs[0];
  a.present_key = outputs[1];
  a.present_value = outputs[2];
  a.B = x.d[0];
  a.S = x.d[1];
  a.D = x.d[2];
  // The ONNX contract: the past is the first P = T - S of past_key's positions, present has
  // max(C, T) (C = P: past + new). Engines do not alias present to past (the CUDA backend does).
  const int64_t T = input_desc[inputs_.Index(kAttentionMask)].dims.d[1];
  a.P = T - a.S;
  a.past_rows = input_desc[inputs_.Index(kPastKey)].dims.d[2];
  a.capacity = a.past_rows > T ? a.past_rows : T;
  a.rope_positions = inputs_.Index(kCos) < 0 ? 0 : input_desc[inputs_.Index(kCos)].dims.d[0];
  a.rope_half = inputs_.Index(kCos) < 0 ? 0 : input_desc[inputs_.Index(kCos)].dims.d[1];
  a.q_norm = in(kQNorm);
  a.k_norm = in(kKNorm);
  a.qk_norm_eps = config_.qk_norm_eps;
  a.window = config_.window;
  a.H = config_.num_heads;
  a.G = config_.num_kv_heads;
  a.E = config_.head_dim;
  a.scale = config_.scale;
  a.rope = config_.rope;
  a.kv_active = config_.kv_active;
  a.dtype = StorageType(input_desc);
  return LaunchStatus(cuda::LaunchSparseHeadAttention(a, workspace, stream));
}

const nvinfer1::PluginFieldCollection* SparseHeadAttentionPlugin::getFieldsToSerialize() noexcept {
  fields_ = FieldWriter();
  fields_.Int("num_heads", static_cast<int32_t>(config_.num_heads));
  fields_.Int("num_kv_heads", static_cast<int32_t>(config_.num_kv_heads));
  fields_.Int("head_dim", static_cast<int32_t>(config_.head_dim));
  fields_.Float("scale", config_.scale);
  fields_.Int("rope", config_.rope ? 1 : 0);
  fields_.String("kv_policy", config_.kv_active ? "active" : "all");
  fields_.Int("sliding_window", static_cast<int32_t>(config_.window));
  fields_.Float("qk_norm_eps", config_.qk_norm_eps);
  fields_.Int("optional_inputs", static_cast<int32_t>(inputs_.Bits()));
  return fields_.Collection();
}

SparseHeadAttentionCreator::SparseHeadAttentionCreator()
    : SparseCreatorBase("SparseHeadAttention",
                        {PluginField("num_heads", nullptr, PluginFieldType::kINT32, 1),
                         PluginField("num_kv_heads", nullptr, PluginFieldType::kINT32, 1),
                         PluginField("head_dim", nullptr, PluginFieldType::kINT32, 1),
                         PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1),
                         PluginField("rope", nullptr, PluginFieldType::kINT32, 1),
                         PluginField("kv_policy", nullptr, PluginFieldType::kCHAR, 0),
                         PluginField("sliding_window", nullptr, PluginFieldType::kINT32, 1),
                         PluginField("qk_norm_eps", nullptr, PluginFieldType::kFLOAT32, 1),
                         PluginField("optional_inputs", nullptr, PluginFieldType::kINT32, 1)}) {}

nvinfer1::IPluginV3* SparseHeadAttentionCreator::Create(const FieldReader& fields) {
  const std::string policy = fields.Has("kv_policy") ? fields.String("kv_policy") : "all";
  if (policy != "all" && policy != "active")
    throw std::invalid_argument("kv_policy '" + policy + "' is not one of all, active");
  AttentionConfig config{fields.Int("num_heads"), fields.Int("num_kv_heads"), fields.Int("head_dim"),
                         fields.Float("scale"), fields.Has("rope") && fields.Int("rope") != 0, policy == "active",
                         fields.Has("sliding_window") ? fields.Int("sliding_window") : 0,
                         fields.Has("qk_norm_eps") ? fields.Float("qk_norm_eps") : 1e-6f};
  const int64_t optional = fields.Has("optional_inputs") ? fields.Int("optional_inputs") : -1;
  return new SparseHeadAttentionPlugin(config, optional);
}

}  // namespace trt
}  // namespace shadowllm
