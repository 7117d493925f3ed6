// Glue between ONNX Runtime's C++ custom-op API and the kernels.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>
#include <vector>

#include "parallel.h"

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
