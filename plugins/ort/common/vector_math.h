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

}  // namespace shadowllm
