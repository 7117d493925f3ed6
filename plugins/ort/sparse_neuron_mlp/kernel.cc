#include "kernel.h"

#include <vector>

#include "../common/weight_kernels.h"

namespace shadowllm {

void SparseNeuronMLP(const MLPArgs& a, const Parallel& parallel) {
  const int64_t D = a.D, S = a.S, F = a.F;
  const bool gated = a.w_gate.present();
  std::vector<float> kept_x, grid_x;
  ActivationCodes codes;
  const ActivationCodes* x_codes = a.activation_bits ? &codes : nullptr;
  for (int64_t b = 0; b < a.B; ++b) {
    const float* x = KeepLarge(a.x + b * S * D, S * D, a.t_x, kept_x);  // below t_x: zero
    if (a.activation_bits) {  // then onto the int8 grid; the integer kernels read the codes
      grid_x.assign(x, x + S * D);
      RoundToGrid(grid_x.data(), S, D, &codes);
      x = grid_x.data();
    }
    const std::vector<int64_t> kept = ActiveRows(a.mask + b * F, F);
    const int64_t K = static_cast<int64_t>(kept.size());
    // Pre-activations of the kept neurons, [rows, S]: up (w_in) rows 0..K-1, then (gated) gate rows.
    std::vector<float> pre(static_cast<size_t>((gated ? 2 : 1) * K * S));
    if (a.channel_major) {
      // Every output of a kept channel's row, then the kept neurons picked out of it.
      const std::vector<int64_t> channels = KeptChannels(a.x + b * S * D, S, D, a.t_x);
      std::vector<float> full(static_cast<size_t>(S * F));
      for (int pass = 0; pass < (gated ? 2 : 1); ++pass) {
        ChannelProject(x, S, D, channels, pass ? a.w_gate : a.w_in, 0, F, nullptr, full.data(), parallel);
        float* dst = pre.data() + pass * K * S;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t s = 0; s < S; ++s) dst[k * S + s] = full[s * F + kept[k]];
      }
    } else {
      // Input rows: the kept w_in rows, then (gated) the kept w_gate rows.
      ProjectKeptRows(x, S, a.w_in, kept, pre.data(), parallel, x_codes);
      if (gated) ProjectKeptRows(x, S, a.w_gate, kept, pre.data() + K * S, parallel, x_codes);
    }
    const float* up = pre.data();
    const float* gate = pre.data() + K * S;
    // h of the kept neurons; with t_h, only neurons whose h counts for some token are read out.
    std::vector<int64_t> out_rows;
    out_rows.reserve(static_cast<size_t>(K));
    std::vector<float> h;
    h.reserve(static_cast<size_t>(K * S));
    for (int64_t k = 0; k < K; ++k) {
      const float bias = a.b_in ? a.b_in[kept[k]] : 0.f;
      const size_t first = h.size();
      bool any = a.t_h == nullptr;
      for (int64_t s = 0; s < S; ++s) {
        const float u = up[k * S + s] + bias;
        float v = gated ? Activate(a.activation, gate[k * S + s]) * u : Activate(a.activation, u);
        if (a.t_h) {
          if (Counts(v, *a.t_h)) any = true;
          else v = 0.f;
        }
        h.push_back(v);
      }
      if (any) out_rows.push_back(kept[k]);
      else h.resize(first);
    }
    if (a.activation_bits) RoundRowsToGrid(out_rows, h.data(), S);  // h's blocks: 32 neurons
    GatherKeptRows(a.w_out_t, out_rows, h.data(), S, 0, D, a.b_out, a.y + b * S * D, parallel);
  }
}

}  // namespace shadowllm
