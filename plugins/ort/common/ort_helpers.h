// Glue between ONNX Runtime's C++ custom-op API and the kernels.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <stdexcept>
#include <string>
#include <vector>

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

template <typename T>
T Attribute(const OrtKernelInfo* info, const char* name, T fallback) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
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
