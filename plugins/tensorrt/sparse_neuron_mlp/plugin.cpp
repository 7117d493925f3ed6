#include "plugin.h"

namespace shadowllm {
namespace trt {

using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

SparseNeuronMLPPlugin::SparseNeuronMLPPlugin(Activation activation, int64_t optional_inputs)
    : activation_(activation), inputs_(kSlots, {kBIn, kWGate, kBOut}, optional_inputs) {}

nvinfer1::IPluginV3* SparseNeuronMLPPlugin::clone() noexcept {
  try {
    return new SparseNeuronMLPPlugin(activation_, inputs_.Bits());
  } catch (...) {
    return nullptr;
  }
}

int32_t SparseNeuronMLPPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                                               const nvinfer1::DimsExprs*, int32_t, nvinfer1::DimsExprs* outputs,
                                               int32_t nb_outputs, nvinfer1::IExprBuilder&) noexcept {
  if (nb_inputs != inputs_.Count() || nb_outputs != 1 || inputs[0].nbDims != 3) {
    Log(nvinfer1::ILogger::Severity::kERROR, "SparseNeuronMLP: expected " + std::to_string(inputs_.Count()) +
                                                 " inputs with x of rank 3, got " + std::to_string(nb_inputs));
    return -1;
  }
  outputs[0] = inputs[0];
  return 0;
}

std::string SparseNeuronMLPPlugin::ShapeError(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs) const {
  if (nb_inputs != inputs_.Count()) return "expected " + std::to_string(inputs_.Count()) + " inputs";
  const nvinfer1::Dims& x = in[inputs_.Index(kX)].dims;
  if (x.nbDims != 3) return "x is " + DimsText(x) + ", expected [B,S,D]";
  const int64_t B = x.d[0], D = x.d[2];
  const nvinfer1::Dims& w_out = in[inputs_.Index(kWOutT)].dims;
  if (w_out.nbDims != 2) return "w_out_t is " + DimsText(w_out) + ", expected [F,D]";
  const int64_t F = w_out.d[0];
  std::string why = ExpectDims(w_out, {F, D}, "w_out_t");
  if (why.empty()) why = ExpectDims(in[inputs_.Index(kWIn)].dims, {F, D}, "w_in");
  if (why.empty() && inputs_.Index(kWGate) >= 0) why = ExpectDims(in[inputs_.Index(kWGate)].dims, {F, D}, "w_gate");
  if (why.empty() && inputs_.Index(kBIn) >= 0) why = ExpectDims(in[inputs_.Index(kBIn)].dims, {F}, "b_in");
  if (why.empty() && inputs_.Index(kBOut) >= 0) why = ExpectDims(in[inputs_.Index(kBOut)].dims, {D}, "b_out");
  if (why.empty()) why = ExpectDims(in[inputs_.Index(kMask)].dims, {B, F}, "mask");
  return why;
}

bool SparseNeuronMLPPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out,
                                                      int32_t nb_inputs, int32_t) noexcept {
  if (pos >= nb_inputs) return SupportsSlot(SlotKind::kFloat, in_out, pos);
  return SupportsSlot(pos == inputs_.Index(kMask) ? SlotKind::kMask : SlotKind::kFloat, in_out, pos);
}

size_t SparseNeuronMLPPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t,
                                               const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept {
  const nvinfer1::Dims& x = inputs[inputs_.Index(kX)].max;
  return cuda::MLPWorkspaceBytes(x.d[0], x.d[1], x.d[2], inputs[inputs_.Index(kWIn)].max.d[0], false);
}

int32_t SparseNeuronMLPPlugin::enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc*,
                                       const void* const* inputs, void* const* outputs, void* workspace,
                                       cudaStream_t stream) noexcept {
  auto in = [&](Slot s) { return inputs_.Get(inputs, s); };
  const nvinfer1::Dims& x = input_desc[inputs_.Index(kX)].dims;
  cuda::MLPLaunch a{};
  a.x = in(kX);
  a.w_in = in(kWIn);
  a.b_in = in(kBIn);
  a.w_gate = in(kWGate);
  a.w_out_t = in(kWOutT);
  a.b_out = in(kBOut);
  a.mask = in(kMask);
  a.mask_int32 = true;  // supportsFormatCombination accepts int32 only (the prepared graph casts the bool mask)
  a.y = outputs[0];
  a.B = x.d[0];
  a.S = x.d[1];
  a.D = x.d[2];
  a.F = input_desc[inputs_.Index(kWIn)].dims.d[0];
  a.activation = activation_;
  a.dtype = StorageType(input_desc);
  return LaunchStatus(cuda::LaunchSparseNeuronMLP(a, workspace, stream));
}

const nvinfer1::PluginFieldCollection* SparseNeuronMLPPlugin::getFieldsToSerialize() noexcept {
  fields_ = FieldWriter();
  fields_.String("activation", ActivationName(activation_));
  fields_.Int("optional_inputs", static_cast<int32_t>(inputs_.Bits()));
  return fields_.Collection();
}

SparseNeuronMLPCreator::SparseNeuronMLPCreator()
    : SparseCreatorBase("SparseNeuronMLP", {PluginField("activation", nullptr, PluginFieldType::kCHAR, 0),
                                            PluginField("optional_inputs", nullptr, PluginFieldType::kINT32, 1)}) {}

nvinfer1::IPluginV3* SparseNeuronMLPCreator::Create(const FieldReader& fields) {
  const int64_t optional = fields.Has("optional_inputs") ? fields.Int("optional_inputs") : -1;
  return new SparseNeuronMLPPlugin(ParseActivation(fields.String("activation")), optional);
}

}  // namespace trt
}  // namespace shadowllm
