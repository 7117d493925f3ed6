// The one seam between the kernels and a thread pool: run body(i) for i in [0, tasks), in any order,
// possibly concurrently. In onnxruntime it is the session's intra-op pool (KernelContext::ParallelFor),
// so the kernels share ORT's threads instead of starting their own against them.
#pragma once

#include <cstdint>
#include <functional>

namespace shadowllm {

class Parallel {
 public:
  virtual ~Parallel() = default;
  virtual void For(int64_t tasks, const std::function<void(int64_t)>& body) const = 0;
};

class Serial : public Parallel {
 public:
  void For(int64_t tasks, const std::function<void(int64_t)>& body) const override {
    for (int64_t i = 0; i < tasks; ++i) body(i);
  }
};

// Splits [0, n) into about `tasks` contiguous chunks (each a multiple of `align`) and runs
// body(begin, end) per chunk.
inline void ForChunks(const Parallel& parallel, int64_t n, int64_t tasks, int64_t align,
                      const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  if (tasks < 1) tasks = 1;
  int64_t chunk = (n + tasks - 1) / tasks;
  chunk = (chunk + align - 1) / align * align;
  const int64_t count = (n + chunk - 1) / chunk;
  parallel.For(count, [&](int64_t i) {
    const int64_t begin = i * chunk, end = begin + chunk < n ? begin + chunk : n;
    body(begin, end);
  });
}

}  // namespace shadowllm
