// The output projection both sparse ops end with: only the kept rows of a row-major [N, D] weight
// (a head owns E rows of w_o_t, a neuron one row of w_out_t) are read, once, in place.
#pragma once

#include <cstdint>
#include <vector>

namespace shadowllm {

// y[s, :] = bias + sum_r coeff[r * S + s] * w_t[rows[r], :] for s < S, y row-major [S, D].
// Parallel over slices of D (each thread owns its output columns); sums over rows in double.
void GatherProject(const std::vector<int64_t>& rows, const float* coeff, const float* w_t, const float* bias,
                   float* y, int64_t S, int64_t D);

}  // namespace shadowllm
