// SparseNeuronMLP on the CPU (DESIGN §3): only the rows of kept neurons are read, in place.
#pragma once

#include <cstdint>

#include "../common/kernel_utils.h"
#include "../common/parallel.h"

namespace shadowllm {

struct MLPArgs {
  const float* x;        // [B, S, D]
  const float* w_in;     // [F, D]
  const float* b_in;     // [F] or null
  const float* w_gate;   // [F, D] or null (ungated)
  const float* w_out_t;  // [F, D]
  const float* b_out;    // [D] or null
  const bool* mask;      // [B, F]
  float* y;              // [B, S, D]
  int64_t B, S, D, F;
  Activation activation;
};

// y = sum over kept n of h_n(x) * w_out_t[n] + b_out, per batch row: the kept neurons are listed
// once; their w_in (and w_gate) rows give h for all S tokens in one pass (ProjectRows); their
// w_out_t rows are summed into y (GatherProject).
void SparseNeuronMLP(const MLPArgs& a, const Parallel& parallel);

}  // namespace shadowllm
