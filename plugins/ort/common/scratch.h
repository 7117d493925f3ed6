// Reusable memory for a call's large temporaries on its calling thread (a prompt's dequantized weight
// rows, a transposed product, a GEMM's packed panel, a decode gather's partial sums): one growing buffer per thread and slot, never
// zeroed. Allocated per call, glibc mapped, faulted in and unmapped megabytes per projection: a 4-bit
// threshold prefill spent ~10% of its time in page faults and ~15% in memset.
#pragma once

#include <cstddef>
#include <vector>

namespace shadowllm {

enum class ScratchSlot : int { kWeights = 0, kProduct = 1, kPanel = 2, kPartial = 3 };
constexpr int kScratchSlots = 4;

// n floats of the slot's buffer on this thread (contents undefined); valid until the next call for the
// same slot on this thread.
inline float* Scratch(ScratchSlot slot, size_t n) {
  thread_local std::vector<float> buffers[kScratchSlots];
  std::vector<float>& b = buffers[static_cast<int>(slot)];
  if (b.size() < n) b.resize(n);
  return b.data();
}

}  // namespace shadowllm
