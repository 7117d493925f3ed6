// SparseNeuronMLP on the CPU (docs/export-format.md): only the rows of kept neurons are read, in place; with
// activation thresholds, only the weights of the input entries that count.
#pragma once

#include <cstdint>

#include "../common/kernel_utils.h"
#include "../common/parallel.h"
#include "../../common/weight_format.h"

namespace shadowllm {

struct MLPArgs {
  const float* x;        // [B, S, D]
  Matrix w_in;           // [F, D] (row-major) or [D, F] (channel-major), any weight format
  const float* b_in;     // [F] or null
  Matrix w_gate;         // like w_in, or absent (ungated)
  Matrix w_out_t;        // [F, D]
  const float* b_out;    // [D] or null
  const bool* mask;      // [B, F]
  const float* t_x;      // threshold on x (one value), or null
  const float* t_h;      // threshold on the hidden h (one value), or null
  float* y;              // [B, S, D]
  int64_t B, S, D, F;
  Activation activation;
  bool channel_major;  // weight_layout == "channel_major": w_in / w_gate are [D, F]
  int activation_bits;  // 8: x and h rounded to the int8 activation grid (activation_grid.h) before their products
};

// y = sum over kept n of h_n(x) * w_out_t[n] + b_out, per batch row: the kept neurons are listed
// once; h for all S tokens comes from their w_in (and w_gate) rows (ProjectKeptRows), or, channel-major,
// from the rows of the input channels some token keeps (ChannelProject: the whole [D, F] row of a
// channel, the neuron mask applied after); the w_out_t rows of kept neurons whose |h| reaches t_h
// for some token are summed into y (GatherKeptRows). Quantized weights are decoded as they are read
// (weight_kernels.h).
void SparseNeuronMLP(const MLPArgs& a, const Parallel& parallel);

}  // namespace shadowllm
