// Small helpers shared by the CPU kernels: activations, a short dot product, active-row lists,
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

// Dot product of two short contiguous rows (a query and a key: head_dim terms), in 8 fp32 lanes.
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  return s + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The indices i with mask[i] true: computed once per call and row, then only those rows are read.
inline std::vector<int64_t> ActiveRows(const bool* mask, int64_t n) {
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    if (mask[i]) rows.push_back(i);
  return rows;
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
// weight a call must read. All D channels when there is no threshold.
inline std::vector<int64_t> KeptChannels(const float* x, int64_t S, int64_t D, const float* t) {
  std::vector<int64_t> kept;
  kept.reserve(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) {
    bool any = t == nullptr;
    for (int64_t s = 0; s < S && !any; ++s) any = Counts(x[s * D + d], *t);
    if (any) kept.push_back(d);
  }
  return kept;
}

}  // namespace shadowllm
