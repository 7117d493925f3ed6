#include "kernel.h"

#include <vector>

#include "../common/vector_math.h"
#include "../common/weight_kernels.h"

namespace shadowllm {

void SparseNeuronMLP(const MLPArgs& a, const Parallel& parallel) {
  const int64_t D = a.D, S = a.S, F = a.F;
  const bool gated = a.w_gate.present();
  // Per-call temporaries, kept per calling thread and reused (every one is fully written before it is
  // read): a decode step allocated and zeroed a dozen vectors per op, 60 ops a token (~5% of the
  // calling thread in malloc, free and memset, while the other thread waits). Bound as references, so
  // that code running on another thread (a parallel task) would see these, not its own empty ones.
  thread_local struct {
    std::vector<float> kept_x, grid_x, pre, full, h;
    std::vector<int64_t> kept, channels, out_rows;
    std::vector<GatherJob> jobs;
    ActivationCodes codes;
    RowCodes h_codes;  // h's blocks: 32 neurons
  } mine;
  auto &kept_x = mine.kept_x, &grid_x = mine.grid_x, &pre = mine.pre, &full = mine.full, &h = mine.h;
  auto &kept = mine.kept, &channels = mine.channels, &out_rows = mine.out_rows;
  auto &jobs = mine.jobs;
  auto &codes = mine.codes;
  auto &h_codes = mine.h_codes;
  const ActivationCodes* x_codes = a.activation_bits ? &codes : nullptr;
  for (int64_t b = 0; b < a.B; ++b) {
    const float* x = KeepLarge(a.x + b * S * D, S * D, a.t_x, kept_x);  // below t_x: zero
    if (a.activation_bits) {  // then onto the int8 grid; the integer kernels read the codes
      grid_x.assign(x, x + S * D);
      RoundToGrid(grid_x.data(), S, D, &codes);
      x = grid_x.data();
    }
    ActiveRows(a.mask + b * F, F, kept);
    const int64_t K = static_cast<int64_t>(kept.size());
    // Pre-activations of the kept neurons, [rows, S]: up (w_in) rows 0..K-1, then (gated) gate rows.
    pre.resize(static_cast<size_t>((gated ? 2 : 1) * K * S));
    if (a.channel_major) {
      // Every output of a kept channel's row, then the kept neurons picked out of it.
      KeptChannels(a.x + b * S * D, S, D, a.t_x, channels);
      const int passes = gated ? 2 : 1;  // up, then gate: one parallel region
      full.resize(static_cast<size_t>(passes * S * F));
      jobs.assign({{&a.w_in, 0, F, nullptr, full.data()}});
      if (gated) jobs.push_back({&a.w_gate, 0, F, nullptr, full.data() + S * F});
      ChannelProject(x, S, D, channels, jobs, parallel, x_codes);
      for (int pass = 0; pass < passes; ++pass) {
        const float* src = full.data() + pass * S * F;
        float* dst = pre.data() + pass * K * S;
        if (K == F && S == 1) {  // every neuron kept (thresholds alone): already in place
          std::copy(src, src + F, dst);
          continue;
        }
        for (int64_t k = 0; k < K; ++k)
          for (int64_t s = 0; s < S; ++s) dst[k * S + s] = src[s * F + kept[k]];
      }
    } else {
      // Input rows: the kept w_in rows, then (gated) the kept w_gate rows.
      ProjectKeptRows(x, S, a.w_in, kept, pre.data(), parallel, x_codes);
      if (gated) ProjectKeptRows(x, S, a.w_gate, kept, pre.data() + K * S, parallel, x_codes);
    }
    // h of the kept neurons: act(gate) * (up + bias), all at once; then, with t_h, only neurons whose h
    // counts for some token are read out (the others' entries dropped from h).
    float* up = pre.data();
    if (a.b_in)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t s = 0; s < S; ++s) up[k * S + s] += a.b_in[kept[k]];
    ActivateInPlace(a.activation, gated ? pre.data() + K * S : nullptr, up, K * S);
    out_rows.clear();
    h.clear();
    for (int64_t k = 0; k < K; ++k) {
      float* v = up + k * S;
      bool any = a.t_h == nullptr;
      if (a.t_h)
        for (int64_t s = 0; s < S; ++s) {
          if (Counts(v[s], *a.t_h)) any = true;
          else v[s] = 0.f;
        }
      if (!any) continue;
      out_rows.push_back(kept[k]);
      h.insert(h.end(), v, v + S);
    }
    RowCodes* h_grid = a.activation_bits && GatherTakesCodes(a.w_out_t, S, D) ? &h_codes : nullptr;
    if (a.activation_bits) RoundRowsToGrid(out_rows, h.data(), S, h_grid);
    GatherKeptRows(a.w_out_t, out_rows, h.data(), S, 0, D, a.b_out, a.y + b * S * D, parallel, h_grid);
  }
}

}  // namespace shadowllm
