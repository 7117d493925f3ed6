// The ai.shadowllm::BlockedMatMul custom op for ONNX Runtime's CPU provider: y = x @ w^T with w [N, D]
// as block codes and fp16 scales (the LM head of a quantized export; docs/export-format.md).
#pragma once

#include "../common/ort_helpers.h"

namespace shadowllm {

struct BlockedMatMulKernel {
  explicit BlockedMatMulKernel(const OrtKernelInfo* info);
  void Compute(OrtKernelContext* context);
  int activation_bits;  // 8: x rounded to the int8 activation grid (activation_grid.h) first
};

struct BlockedMatMulOp : Ort::CustomOpBase<BlockedMatMulOp, BlockedMatMulKernel> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new BlockedMatMulKernel(info); }
  const char* GetName() const { return "BlockedMatMul"; }
  size_t GetInputTypeCount() const { return 4; }  // x w w_scale w_min
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // int8 or uint4 codes
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace shadowllm
