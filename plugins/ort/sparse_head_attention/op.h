// The ai.shadowllm::SparseHeadAttention custom op for ONNX Runtime's CPU provider.
#pragma once

#include "../common/ort_helpers.h"
#include "kernel.h"

namespace shadowllm {

struct SparseHeadAttentionKernel {
  explicit SparseHeadAttentionKernel(const OrtKernelInfo* info);
  void Compute(OrtKernelContext* context);
  int64_t num_heads, num_kv_heads, head_dim;
  int64_t sliding_window;
  float scale, qk_norm_eps;
  bool rope, kv_active, channel_major;
  int activation_bits;
};

struct SparseHeadAttentionOp : Ort::CustomOpBase<SparseHeadAttentionOp, SparseHeadAttentionKernel> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new SparseHeadAttentionKernel(info); }
  const char* GetName() const { return "SparseHeadAttention"; }
  // x w_q b_q w_k b_k w_v b_v w_o_t b_o past_key past_value attention_mask position_ids cos sin head_mask t_x t_o,
  // then the scale and minimum of w_q, w_k, w_v, w_o_t (revision 5), then q_norm k_norm (revision 6)
  size_t GetInputTypeCount() const { return 28; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1 || i == 3 || i == 5 || i == 7) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // fp32, int8 or uint4
    if (i >= 18 && i < 26) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    if (i == 11 || i == 12) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (i == 15) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    const bool optional = i == 2 || i == 4 || i == 6 || i == 8 || i == 13 || i == 14 || i >= 16;  // biases, cos, sin, t_*, ...
    return optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace shadowllm
