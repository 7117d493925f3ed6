// Glue between ONNX Runtime's C++ custom-op API and the kernels.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>
#include <vector>

namespace shadowllm {

// A required or optional input's data (null when an optional input is absent).
template <typename T>
const T* InputData(const Ort::KernelContext& ctx, size_t i) {
  Ort::ConstValue v = ctx.GetInput(i);
  if (v == nullptr) return nullptr;
  return v.GetTensorData<T>();
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

}  // namespace shadowllm
