#include "gather_project.h"

#include <algorithm>

#include "kernel_utils.h"

namespace shadowllm {

void GatherProject(const std::vector<int64_t>& rows, const float* coeff, const float* w_t, const float* bias,
                   float* y, int64_t S, int64_t D) {
  const int64_t R = static_cast<int64_t>(rows.size());
  const int64_t slice = 64;
#pragma omp parallel for schedule(static)
  for (int64_t d0 = 0; d0 < D; d0 += slice) {
    const int64_t len = std::min(slice, D - d0);
    std::vector<double> acc(static_cast<size_t>(S * len), 0.0);
    for (int64_t r = 0; r < R; ++r) {
      const float* w = w_t + rows[r] * D + d0;
      for (int64_t s = 0; s < S; ++s) Axpy(coeff[r * S + s], w, acc.data() + s * len, len);
    }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < len; ++i)
        y[s * D + d0 + i] = static_cast<float>(acc[s * len + i] + (bias ? bias[d0 + i] : 0.f));
  }
}

}  // namespace shadowllm
