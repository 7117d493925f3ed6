// The primitives both sparse ops are made of. Weights are row-major with one row per output
// unit (a neuron's w_in / w_gate / w_out_t row, the E rows of a head), and a kernel is handed the
// addresses of the kept rows: every weight byte it reads belongs to a kept unit, read in place,
// once per call, front to back. fp32 throughout; the inner loops are compiled for AVX-512, AVX2+FMA
// and baseline x86-64 and picked at load time (GCC target_clones).
#pragma once

#include <cstdint>
#include <vector>

#include "parallel.h"

namespace shadowllm {

// out[r * S + s] = x[s, :] . rows[r][0:D] for r < rows.size(), s < S  (x row-major [S, D]).
void ProjectRows(const float* x, int64_t S, int64_t D, const std::vector<const float*>& rows, float* out,
                 const Parallel& parallel);

// y[s, :] = bias + sum_r coeff[r * S + s] * rows[r][0:D]  (y row-major [S, D]; bias may be null).
// Few tokens (decode): threads split the rows, each streaming whole rows into its own partial sum.
// Many tokens (prefill): threads split the columns, with a register tile over tokens.
void GatherProject(const std::vector<const float*>& rows, const float* coeff, int64_t S, int64_t D,
                   const float* bias, float* y, const Parallel& parallel);

}  // namespace shadowllm
