#include "kernel.h"

#include "../common/gather_project.h"

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

    GatherProject(rows, h.data(), a.w_out_t, a.b_out, y, S, D);
  }
}

}  // namespace shadowllm
