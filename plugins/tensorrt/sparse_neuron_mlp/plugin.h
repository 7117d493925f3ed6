// ai.shadowllm::SparseNeuronMLP as a TensorRT IPluginV3 (fp32 / fp16, dynamic batch and length).
#pragma once

#include "../common/creator_base.h"
#include "kernel.h"

namespace shadowllm {
namespace trt {

class SparseNeuronMLPPlugin : public SparsePluginBase {
 public:
  // Contract slots (docs/export-format.md): x, w_in, b_in?, w_gate?, w_out_t, b_out?, mask.
  enum Slot { kX, kWIn, kBIn, kWGate, kWOutT, kBOut, kMask, kSlots };

  SparseNeuronMLPPlugin(Activation activation, int64_t optional_inputs);
  nvinfer1::IPluginV3* clone() noexcept override;
  const char* getPluginName() const noexcept override { return "SparseNeuronMLP"; }
  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs*, int32_t,
                          nvinfer1::DimsExprs* outputs, int32_t nb_outputs, nvinfer1::IExprBuilder&) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc*,
                  const void* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

 protected:
  std::string ShapeError(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs) const override;

 private:
  Activation activation_;
  InputMap inputs_;
};

class SparseNeuronMLPCreator : public SparseCreatorBase {
 public:
  SparseNeuronMLPCreator();

 protected:
  nvinfer1::IPluginV3* Create(const FieldReader& fields) override;
};

}  // namespace trt
}  // namespace shadowllm
