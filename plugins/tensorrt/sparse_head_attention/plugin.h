// ai.shadowllm::SparseHeadAttention as a TensorRT IPluginV3 (fp32 / fp16, dynamic batch, new and
// past length; the present caches' length is past + new, an expression of the input shapes).
#pragma once

#include "../common/creator_base.h"
#include "kernel.h"

namespace shadowllm {
namespace trt {

struct AttentionConfig {
  int64_t num_heads, num_kv_heads, head_dim;
  float scale;
  bool rope;
  bool kv_active;  // kv_policy == "active"
  int64_t window = 0;         // sliding_window (0: every key)
  float qk_norm_eps = 1e-6f;  // of the q_norm / k_norm inputs, when present
};

class SparseHeadAttentionPlugin : public SparsePluginBase {
 public:
  // Contract slots (docs/export-format.md). The thresholds and quantized weights' scales between head_mask and
  // q_norm are not plugin inputs (compiler/tensorrt.py refuses such nodes), so q_norm / k_norm follow head_mask.
  enum Slot { kX, kWQ, kBQ, kWK, kBK, kWV, kBV, kWOT, kBO, kPastKey, kPastValue, kAttentionMask, kPositionIds,
              kCos, kSin, kHeadMask, kQNorm, kKNorm, kSlots };

  SparseHeadAttentionPlugin(AttentionConfig config, int64_t optional_inputs);
  nvinfer1::IPluginV3* clone() noexcept override;
  const char* getPluginName() const noexcept override { return "SparseHeadAttention"; }
  int32_t getNbOutputs() const noexcept override { return 3; }
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs*, int32_t,
                          nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& builder) noexcept override;
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
  AttentionConfig config_;
  InputMap inputs_;
};

class SparseHeadAttentionCreator : public SparseCreatorBase {
 public:
  SparseHeadAttentionCreator();

 protected:
  nvinfer1::IPluginV3* Create(const FieldReader& fields) override;
};

}  // namespace trt
}  // namespace shadowllm
