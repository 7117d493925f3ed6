// Small helpers shared by the CPU kernels: activations, active-row lists,
// activation thresholds.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "../../common/activation.h"

namespace shadowllm {

inline float Activate(Activation a, float t) {
  switch (a) {
    case Activation::kRelu: return t > 0.f ? t : 0.f;
    case Activation::kGelu: return 0.5f * t * (1.f + std::erf(t * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * t * (1.f + std::tanh(0.79788456080286536f * (t + 0.044715f * t * t * t)));
    case Activation::kSilu: return t / (1.f + std::exp(-t));
  }
  return t;
}

// The indices i with mask[i] true: computed once per call and row, then only those rows are read.
// Into `rows` (cleared first): the ops keep it per thread, so a decode step allocates nothing.
inline void ActiveRows(const bool* mask, int64_t n, std::vector<int64_t>& rows) {
  rows.clear();
  for (int64_t i = 0; i < n; ++i)
    if (mask[i]) rows.push_back(i);
}

// Activation thresholds (docs/export-format.md): an entry v counts only when |v| >= t (ties kept).
inline bool Counts(float v, float t) { return std::fabs(v) >= t; }

// The n entries of x as the op sees them: x itself without a threshold, else a copy in `scratch`
// with the entries below *t set to zero.
inline const float* KeepLarge(const float* x, int64_t n, const float* t, std::vector<float>& scratch) {
  if (t == nullptr) return x;
  scratch.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) scratch[i] = Counts(x[i], *t) ? x[i] : 0.f;
  return scratch.data();
}

// Channels d of x [S, D] that some token keeps (|x[s, d]| >= t): the input rows of a channel-major
// weight a call must read, into `kept` (cleared first). All D channels when there is no threshold.
inline void KeptChannels(const float* x, int64_t S, int64_t D, const float* t, std::vector<int64_t>& kept) {
  kept.clear();
  for (int64_t d = 0; d < D; ++d) {
    bool any = t == nullptr;
    for (int64_t s = 0; s < S && !any; ++s) any = Counts(x[s * D + d], *t);
    if (any) kept.push_back(d);
  }
}

}  // namespace shadowllm
