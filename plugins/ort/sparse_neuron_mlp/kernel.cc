#include "kernel.h"

#include <algorithm>
#include <vector>

namespace shadowllm {

void SparseNeuronMLP(const MLPArgs& a) {
  const int64_t D = a.D, S = a.S;
  for (int64_t b = 0; b < a.B; ++b) {
    const std::vector<int64_t> rows = ActiveRows(a.mask + b * a.F, a.F);
    const int64_t K = static_cast<int64_t>(rows.size());
    const float* x = a.x + b * S * D;
    float* y = a.y + b * S * D;
    std::vector<float> h(static_cast<size_t>(K * S));  // [K, S]: activations of the kept neurons

#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = rows[k];
      const float* w_in = a.w_in + n * D;
      const float* w_gate = a.w_gate ? a.w_gate + n * D : nullptr;
      const float bias = a.b_in ? a.b_in[n] : 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float up = Dot(x + s * D, w_in, D) + bias;
        h[k * S + s] = w_gate ? Activate(a.activation, Dot(x + s * D, w_gate, D)) * up : Activate(a.activation, up);
      }
    }

    // Each thread owns a slice of the D output columns, so no two threads write the same y.
    const int64_t slice = 64;
#pragma omp parallel for schedule(static)
    for (int64_t d0 = 0; d0 < D; d0 += slice) {
      const int64_t len = std::min(slice, D - d0);
      std::vector<double> acc(static_cast<size_t>(S * len), 0.0);
      for (int64_t k = 0; k < K; ++k) {
        const float* w_out = a.w_out_t + rows[k] * D + d0;
        for (int64_t s = 0; s < S; ++s) Axpy(h[k * S + s], w_out, acc.data() + s * len, len);
      }
      for (int64_t s = 0; s < S; ++s)
        for (int64_t i = 0; i < len; ++i)
          y[s * D + d0 + i] = static_cast<float>(acc[s * len + i] + (a.b_out ? a.b_out[d0 + i] : 0.f));
    }
  }
}

}  // namespace shadowllm
