// The ai.shadowllm::SparseNeuronMLP custom op for ONNX Runtime's CPU provider.
#pragma once

#include "../common/ort_helpers.h"
#include "kernel.h"

namespace shadowllm {

struct SparseNeuronMLPKernel {
  explicit SparseNeuronMLPKernel(const OrtKernelInfo* info);
  void Compute(OrtKernelContext* context);
  Activation activation;
  bool channel_major;
  int activation_bits;
};

struct SparseNeuronMLPOp : Ort::CustomOpBase<SparseNeuronMLPOp, SparseNeuronMLPKernel> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new SparseNeuronMLPKernel(info); }
  const char* GetName() const { return "SparseNeuronMLP"; }
  // x w_in b_in w_gate w_out_t b_out mask t_x t_h, then the scale and minimum of w_in, w_gate, w_out_t
  size_t GetInputTypeCount() const { return 15; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1 || i == 3 || i == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // fp32, int8 or uint4
    if (i >= 9) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    return i == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    const bool optional = i == 2 || i == 3 || i == 5 || i >= 7;  // b_in, w_gate, b_out, t_x, t_h, scales
    return optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace shadowllm
