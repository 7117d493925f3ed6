// Glue between ONNX Runtime's C++ custom-op API and the kernels.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <stdexcept>
#include <string>
#include <vector>

#include "../../common/weight_format.h"
#include "parallel.h"

namespace shadowllm {

// A required or optional input's data (null when an optional input is absent).
template <typename T>
const T* InputData(const Ort::KernelContext& ctx, size_t i) {
  if (i >= ctx.GetInputCount()) return nullptr;  // trailing optional inputs the node leaves off
  Ort::ConstValue v = ctx.GetInput(i);
  if (v == nullptr) return nullptr;
  return v.GetTensorData<T>();
}

// An optional scalar input (an activation threshold): null when absent, else its one value.
inline const float* ScalarInput(const Ort::KernelContext& ctx, size_t i, const char* op, const char* name) {
  const float* data = InputData<float>(ctx, i);
  if (data != nullptr && ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetElementCount() != 1)
    throw std::invalid_argument(std::string(op) + ": input " + name + " must hold one value (a threshold)");
  return data;
}

inline std::vector<int64_t> InputShape(const Ort::KernelContext& ctx, size_t i) {
  return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape();
}

// A projection input `i` in its weight format (plugins/common/weight_format.h): fp32 values, or INT8 /
// UINT4 codes with the fp16 scale input `scale_i` (and, UINT4, minimum input `min_i`). Blocks run
// along the rows (blocks_on_rows: output projections, channel-major input projections) or the
// columns. Absent (optional) input: a Matrix with no data.
inline Matrix WeightInput(const Ort::KernelContext& ctx, size_t i, size_t scale_i, size_t min_i, bool blocks_on_rows,
                          const char* op, const char* name) {
  Matrix m;
  if (i >= ctx.GetInputCount() || ctx.GetInput(i) == nullptr) return m;
  const auto info = ctx.GetInput(i).GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> shape = info.GetShape();
  const std::string what = std::string(op) + ": input " + name;
  if (shape.size() != 2) throw std::invalid_argument(what + " must be a matrix");
  m.rows = shape[0];
  m.cols = shape[1];
  m.data = ctx.GetInput(i).GetTensorRawData();
  m.block_axis = blocks_on_rows ? 0 : 1;
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: m.format = WeightFormat::kF32; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: m.format = WeightFormat::kInt8; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT4: m.format = WeightFormat::kInt4; break;
    default: throw std::invalid_argument(what + " has an element type the native kernels do not read (expected "
                                         "float, int8 or uint4 codes)");
  }
  auto optional = [&](size_t k) -> const uint16_t* {
    if (k >= ctx.GetInputCount() || ctx.GetInput(k) == nullptr) return nullptr;
    const auto scales = ctx.GetInput(k).GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> want = blocks_on_rows ? std::vector<int64_t>{m.rows / kBlock, m.cols}
                                                     : std::vector<int64_t>{m.rows, m.cols / kBlock};
    if (scales.GetShape() != want)
      throw std::invalid_argument(what + ": its scales / minimums must be [" + std::to_string(want[0]) + ", " +
                                  std::to_string(want[1]) + "] (blocks of 32 along the input)");
    return static_cast<const uint16_t*>(ctx.GetInput(k).GetTensorRawData());
  };
  m.scale = optional(scale_i);
  m.minimum = optional(min_i);
  const bool quantized = m.format != WeightFormat::kF32;
  if ((blocks_on_rows ? m.rows : m.cols) % kBlock != 0 && quantized)
    throw std::invalid_argument(what + ": quantized, its input dimension must be a multiple of 32");
  if (quantized != (m.scale != nullptr) || (m.format == WeightFormat::kInt4) != (m.minimum != nullptr))
    throw std::invalid_argument(what + ": int8 codes need their scales, uint4 codes their scales and minimums, "
                                "fp32 values neither");
  return m;
}

template <typename T>
T Attribute(const OrtKernelInfo* info, const char* name, T fallback) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

// The block_size attribute of a node with quantized weights: 32 (the only block the kernels read).
inline void CheckBlockSize(const OrtKernelInfo* info, const char* op) {
  const int64_t block = Attribute<int64_t>(info, "block_size", kBlock);
  if (block != kBlock)
    throw std::invalid_argument(std::string(op) + ": block_size " + std::to_string(block) + " (the kernels read 32)");
}

// The activation_bits attribute: 0 (absent: fp32 inputs) or 8 (the int8 activation grid, activation_grid.h).
inline int ActivationBits(const OrtKernelInfo* info, const char* op) {
  const int64_t bits = Attribute<int64_t>(info, "activation_bits", 0);
  if (bits != 0 && bits != 8)
    throw std::invalid_argument(std::string(op) + ": activation_bits " + std::to_string(bits) + " (expected 0 or 8)");
  return static_cast<int>(bits);
}

// The weight_layout attribute: false for row_major (the default), true for channel_major.
inline bool ChannelMajor(const OrtKernelInfo* info, const char* op) {
  const std::string layout = Attribute<std::string>(info, "weight_layout", "row_major");
  if (layout != "row_major" && layout != "channel_major")
    throw std::invalid_argument(std::string(op) + ": weight_layout '" + layout +
                                "' is not one of row_major, channel_major");
  return layout == "channel_major";
}

// Parallel over onnxruntime's intra-op thread pool for the call in progress.
class OrtParallel : public Parallel {
 public:
  explicit OrtParallel(const Ort::KernelContext& ctx) : ctx_(ctx) {}
  void For(int64_t tasks, const std::function<void(int64_t)>& body) const override {
    if (tasks <= 1) {
      if (tasks == 1) body(0);
      return;
    }
    ctx_.ParallelFor(&Trampoline, static_cast<size_t>(tasks), 0, const_cast<std::function<void(int64_t)>*>(&body));
  }

 private:
  static void Trampoline(void* body, size_t i) { (*static_cast<std::function<void(int64_t)>*>(body))(static_cast<int64_t>(i)); }
  const Ort::KernelContext& ctx_;
};

}  // namespace shadowllm
