// Elementwise math over whole arrays, 8 lanes at a time on AVX2 with a polynomial exp (relative error
// ~1e-7, inside the ops' 1e-5 parity): the MLP's activation (SiLU, the Llama family's; the others
// through the scalar Activate of kernel_utils.h) and attention's softmax exponentials.
#pragma once

#include <cstdint>

#include "../../common/activation.h"

namespace shadowllm {

// up[i] <- act(gate[i]) * up[i] (gate not null: a gated MLP) or act(up[i]), for i in [0, n).
void ActivateInPlace(Activation a, const float* gate, float* up, int64_t n);

// v[i] <- exp(v[i] - shift) for i in [0, n); returns their sum.
float ExpShiftedSum(float* v, int64_t n, float shift);

// Attention over one block of keys, for the n query heads that share them (rows of E entries):
// p[i * m + j] = scale * q[i] . keys[j] for j in [0, m), four keys per pass (independent sums).
void ScoreKeys(const float* q, int64_t n, const float* keys, int64_t m, int64_t E, float scale, float* p);
// out[i * stride + e] += sum_j p[i * m + j] * values[j * E + e]: the unnormalised context of each head.
void AccumulateValues(const float* p, int64_t n, const float* values, int64_t m, int64_t E, float* out,
                      int64_t stride);

}  // namespace shadowllm
