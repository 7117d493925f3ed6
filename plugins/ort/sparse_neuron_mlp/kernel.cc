#include "kernel.h"

#include <vector>

#include "../common/row_kernels.h"

namespace shadowllm {

void SparseNeuronMLP(const MLPArgs& a, const Parallel& parallel) {
  const int64_t D = a.D, S = a.S;
  const bool gated = a.w_gate != nullptr;
  for (int64_t b = 0; b < a.B; ++b) {
    const std::vector<int64_t> kept = ActiveRows(a.mask + b * a.F, a.F);
    const int64_t K = static_cast<int64_t>(kept.size());
    // Input rows: the kept w_in rows, then (gated) the kept w_gate rows; one ProjectRows call.
    std::vector<const float*> in_rows, out_rows;
    in_rows.reserve(static_cast<size_t>(gated ? 2 * K : K));
    out_rows.reserve(static_cast<size_t>(K));
    for (int64_t n : kept) in_rows.push_back(a.w_in + n * D), out_rows.push_back(a.w_out_t + n * D);
    if (gated)
      for (int64_t n : kept) in_rows.push_back(a.w_gate + n * D);
    std::vector<float> pre(in_rows.size() * static_cast<size_t>(S));  // [rows, S]
    ProjectRows(a.x + b * S * D, S, D, in_rows, pre.data(), parallel);
    std::vector<float> h(static_cast<size_t>(K * S));  // [K, S]
    for (int64_t k = 0; k < K; ++k) {
      const float bias = a.b_in ? a.b_in[kept[k]] : 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float up = pre[k * S + s] + bias;
        h[k * S + s] = gated ? Activate(a.activation, pre[(K + k) * S + s]) * up : Activate(a.activation, up);
      }
    }
    GatherProject(out_rows, h.data(), S, D, a.b_out, a.y + b * S * D, parallel);
  }
}

}  // namespace shadowllm
