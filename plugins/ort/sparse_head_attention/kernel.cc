#include "kernel.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/vector_math.h"
#include "../common/weight_kernels.h"

namespace shadowllm {
namespace {

// Rotate-half RoPE in place on the first 2*half entries of one head vector at position `pos` (half = E/2
// unless the rotary embedding is partial; the rest pass through).
void Rope(float* t, const float* cos, const float* sin, int64_t pos, int64_t half) {
  const float* c = cos + pos * half;
  const float* s = sin + pos * half;
  for (int64_t i = 0; i < half; ++i) {
    const float t1 = t[i], t2 = t[i + half];
    t[i] = t1 * c[i] - t2 * s[i];
    t[i + half] = t2 * c[i] + t1 * s[i];
  }
}

// RMSNorm in place over one [E] head vector (qwen3 / gemma3_text q and k norms), in float as transformers.
void HeadNorm(float* t, const float* weight, float eps, int64_t E) {
  if (weight == nullptr) return;
  double squares = 0.0;
  for (int64_t e = 0; e < E; ++e) squares += static_cast<double>(t[e]) * t[e];
  const float inv = 1.f / std::sqrt(static_cast<float>(squares / static_cast<double>(E)) + eps);
  for (int64_t e = 0; e < E; ++e) t[e] = weight[e] * (t[e] * inv);
}

}  // namespace

void SparseHeadAttention(const AttentionArgs& a, const Parallel& parallel) {
  const int64_t S = a.S, D = a.D, E = a.E, P = a.P, T = a.P + a.S, G = a.G, H = a.H;
  const int64_t C = a.C, N = std::max(C, T);  // past_key's positions, present's
  const bool in_place = a.present_key == a.past_key;
  const int64_t per_group = H / G;
  // Per-call temporaries, kept per calling thread and reused (each is fully written before it is read;
  // see SparseNeuronMLP). Bound as references: the parallel tasks below capture them, and a
  // thread_local named inside a task would be the executing thread's own, empty one.
  thread_local struct {
    std::vector<float> kept_x, grid_x, proj, partial, context, merged;
    std::vector<int64_t> heads, channels, first_rows, out_rows;
    std::vector<GatherJob> jobs;
    std::vector<std::vector<float>> run_out;  // the channel-major path's [S, width] per run
    ActivationCodes codes;
    RowCodes context_codes;  // blocks of 32 of the H*E entries
  } mine;
  auto &kept_x = mine.kept_x, &grid_x = mine.grid_x, &proj = mine.proj, &partial = mine.partial,
       &context = mine.context, &merged = mine.merged;
  auto &heads = mine.heads, &channels = mine.channels, &first_rows = mine.first_rows, &out_rows = mine.out_rows;
  auto &jobs = mine.jobs;
  auto &run_out = mine.run_out;
  auto &codes = mine.codes;
  auto &context_codes = mine.context_codes;
  const ActivationCodes* x_codes = a.activation_bits ? &codes : nullptr;
  for (int64_t b = 0; b < a.B; ++b) {
    const float* x = KeepLarge(a.x + b * S * D, S * D, a.t_x, kept_x);  // below t_x: zero
    if (a.activation_bits) {  // then onto the int8 grid; the integer kernels read the codes
      grid_x.assign(x, x + S * D);
      RoundToGrid(grid_x.data(), S, D, &codes);
      x = grid_x.data();
    }
    ActiveRows(a.head_mask + b * H, H, heads);
    const int64_t K = static_cast<int64_t>(heads.size());
    std::vector<int64_t> groups;  // kv heads whose new K/V are computed
    {
      std::vector<char> on(static_cast<size_t>(G), a.kv_active ? 0 : 1);
      for (int64_t h : heads) on[h / per_group] = 1;
      for (int64_t g = 0; g < G; ++g)
        if (on[g]) groups.push_back(g);
    }
    const int64_t NG = static_cast<int64_t>(groups.size());
    const int64_t* positions = a.position_ids + b * S;

    // q of kept heads, k and v of the needed kv heads: proj is [rows, S] with rows = (K + 2 NG) * E.
    proj.resize(static_cast<size_t>((K + 2 * NG) * E * S));
    if (a.channel_major) {
      // Each run of consecutive units is one column block of a [D, units*E] weight, read one kept
      // channel row at a time (KeptChannels: all D without a threshold).
      KeptChannels(a.x + b * S * D, S, D, a.t_x, channels);
      // q, k and v in one parallel region: a job per run, each into its own [S, width] block.
      jobs.clear();
      first_rows.clear();  // of each job's run in proj
      auto add_runs = [&](const std::vector<int64_t>& units, const Matrix& w, int64_t first_row) {
        for (size_t i = 0; i < units.size();) {
          size_t j = i + 1;
          while (j < units.size() && units[j] == units[j - 1] + 1) ++j;
          const int64_t width = static_cast<int64_t>(j - i) * E;
          if (run_out.size() <= jobs.size()) run_out.emplace_back();
          run_out[jobs.size()].resize(static_cast<size_t>(S * width));
          jobs.push_back({&w, units[i] * E, width, nullptr, nullptr});
          first_rows.push_back(first_row + static_cast<int64_t>(i) * E);
          i = j;
        }
      };
      add_runs(heads, a.w_q, 0);
      add_runs(groups, a.w_k, K * E);
      add_runs(groups, a.w_v, (K + NG) * E);
      for (size_t i = 0; i < jobs.size(); ++i) jobs[i].y = run_out[i].data();
      ChannelProject(x, S, D, channels, jobs, parallel, x_codes);
      for (size_t i = 0; i < jobs.size(); ++i)
        for (int64_t c = 0; c < jobs[i].width; ++c)
          for (int64_t s = 0; s < S; ++s) proj[(first_rows[i] + c) * S + s] = run_out[i][s * jobs[i].width + c];
    } else {
      // Every weight row this call needs: q rows of kept heads, k and v rows of the needed kv heads.
      auto unit_rows = [&](const std::vector<int64_t>& units) {
        std::vector<int64_t> rows;
        rows.reserve(units.size() * static_cast<size_t>(E));
        for (int64_t u : units)
          for (int64_t e = 0; e < E; ++e) rows.push_back(u * E + e);
        return rows;
      };
      const std::vector<int64_t> q_rows = unit_rows(heads), kv_rows = unit_rows(groups);
      ProjectKeptRows(x, S, a.w_q, q_rows, proj.data(), parallel, x_codes);
      ProjectKeptRows(x, S, a.w_k, kv_rows, proj.data() + K * E * S, parallel, x_codes);
      ProjectKeptRows(x, S, a.w_v, kv_rows, proj.data() + (K + NG) * E * S, parallel, x_codes);
    }

    // Present cache: the past's positions (nothing to copy in place), then the new K/V (RoPE on K)
    // of needed kv heads at P..T-1, zeros there for the rest.
    std::vector<char> group_on(static_cast<size_t>(G), 0);
    for (int64_t g : groups) group_on[g] = 1;
    for (int64_t g = 0; g < G; ++g) {
      float* pk = a.present_key + (b * G + g) * N * E;
      float* pv = a.present_value + (b * G + g) * N * E;
      if (!in_place) {
        std::memcpy(pk, a.past_key + (b * G + g) * C * E, sizeof(float) * C * E);
        std::memcpy(pv, a.past_value + (b * G + g) * C * E, sizeof(float) * C * E);
      }
      if (!group_on[g]) {
        std::fill(pk + P * E, pk + T * E, 0.f);
        std::fill(pv + P * E, pv + T * E, 0.f);
      }
    }
    for (int64_t j = 0; j < NG; ++j) {
      const int64_t g = groups[j];
      float* pk = a.present_key + (b * G + g) * N * E + P * E;
      float* pv = a.present_value + (b * G + g) * N * E + P * E;
      const float* k_rows = proj.data() + ((K + j) * E) * S;
      const float* v_rows = proj.data() + ((K + NG + j) * E) * S;
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t e = 0; e < E; ++e) {
          pk[s * E + e] = k_rows[e * S + s] + (a.b_k ? a.b_k[g * E + e] : 0.f);
          pv[s * E + e] = v_rows[e * S + s] + (a.b_v ? a.b_v[g * E + e] : 0.f);
        }
        HeadNorm(pk + s * E, a.k_norm, a.qk_norm_eps, E);
        if (a.rope) Rope(pk + s * E, a.cos, a.sin, positions[s], a.rope_half);
      }
    }

    // Per kv head, token and block of keys, all the group's kept query heads together: q (bias,
    // RoPE), scores over visible keys (hidden ones score the float minimum, so a row that sees
    // nothing attends uniformly), a softmax partial (max, sum, unnormalised context); the blocks of
    // a (head, token) are then merged. Each key and value row is read once per group — a task per
    // query head read the group's cache once per head, the decode cost that grows with the context —
    // and long contexts spread over every thread even with few kv heads (flash-decoding's split).
    // Blocks of 64..512 keys, enough of them for about 8 tasks: a decode step has only G * S tasks
    // otherwise (3 for SmolLM2, on 2 threads: one thread ran two of them while the other waited).
    const int64_t keys_per_block = std::min<int64_t>(512, std::max<int64_t>(64, (T * G * S + 7) / 8));
    const int64_t blocks = (T + keys_per_block - 1) / keys_per_block;
    std::vector<int64_t> first(static_cast<size_t>(G + 1), K);  // kept heads of group g: [first[g], first[g+1])
    for (int64_t k = K - 1; k >= 0; --k) first[heads[k] / per_group] = k;
    for (int64_t g = G - 1; g >= 0; --g) first[g] = std::min(first[g], first[g + 1]);
    // partials per (kept head, token, block): max, sum, then E context entries
    partial.resize(static_cast<size_t>(K * S * blocks * (E + 2)));
    auto part = [&](int64_t k, int64_t s, int64_t c) { return partial.data() + ((k * S + s) * blocks + c) * (E + 2); };
    const int64_t* visible = a.attention_mask + b * T;
    parallel.For(G * S * blocks, [&](int64_t task) {
      const int64_t g = task / (S * blocks), s = task / blocks % S, c = task % blocks;
      const int64_t k0 = first[g], n = first[g + 1] - k0;
      if (n == 0) return;
      const int64_t j0 = c * keys_per_block, width = std::min(T - j0, keys_per_block);
      thread_local struct { std::vector<float> q, p; } task_buffers;  // per thread: the tasks run on both
      auto &q = task_buffers.q, &p = task_buffers.p;  // one TLS lookup per task, not one per use
      q.resize(static_cast<size_t>(n * E));
      p.resize(static_cast<size_t>(n * width));
      const float* keys = a.present_key + (b * G + g) * N * E;
      const float* values = a.present_value + (b * G + g) * N * E;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t k = k0 + i, h = heads[k];
        float* qi = q.data() + i * E;
        for (int64_t e = 0; e < E; ++e) qi[e] = proj[(k * E + e) * S + s] + (a.b_q ? a.b_q[h * E + e] : 0.f);
        HeadNorm(qi, a.q_norm, a.qk_norm_eps, E);
        if (a.rope) Rope(qi, a.cos, a.sin, positions[s], a.rope_half);
        part(k, s, c)[0] = -FLT_MAX;
      }
      const int64_t oldest = a.window > 0 ? P + s - a.window + 1 : 0;  // the first key inside the window
      // every key's score, then the hidden ones (later than the token, outside the window, padding)
      // set to the float minimum
      ScoreKeys(q.data(), n, keys + j0 * E, width, E, a.scale, p.data());
      for (int64_t j = 0; j < width; ++j) {
        const bool seen = j0 + j <= P + s && j0 + j >= oldest && visible[j0 + j];
        for (int64_t i = 0; i < n; ++i) {
          float& v = p[i * width + j];
          if (!seen) v = -FLT_MAX;
          float& top = part(k0 + i, s, c)[0];
          top = std::max(top, v);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        float* r = part(k0 + i, s, c);
        r[1] = ExpShiftedSum(p.data() + i * width, width, r[0]);
        std::fill(r + 2, r + 2 + E, 0.f);
      }
      // consecutive kept heads' partials lie S * blocks * (E + 2) floats apart
      AccumulateValues(p.data(), n, values + j0 * E, width, E, part(k0, s, c) + 2, S * blocks * (E + 2));
    });
    context.resize(static_cast<size_t>(K * E * S));
    merged.resize(static_cast<size_t>(E));  // one (head, token)'s context, its blocks merged
    float* out = merged.data();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t s = 0; s < S; ++s) {
        float top = -FLT_MAX, total = 0.f;
        for (int64_t c = 0; c < blocks; ++c) top = std::max(top, part(k, s, c)[0]);
        std::fill(out, out + E, 0.f);
        for (int64_t c = 0; c < blocks; ++c) {
          const float* r = part(k, s, c);
          const float f = std::exp(r[0] - top);  // 0 for a block of hidden keys when some key is seen
          total += f * r[1];
          for (int64_t e = 0; e < E; ++e) out[e] += f * r[2 + e];
        }
        for (int64_t e = 0; e < E; ++e) context[(k * E + e) * S + s] = out[e] / total;
      }

    // y = sum over kept heads of context_h @ w_o_t[hE:(h+1)E] + b_o: the E rows each kept head owns;
    // with t_o, only the rows of context entries that count for some token.
    out_rows.clear();
    size_t used = 0;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t e = 0; e < E; ++e) {
        float* c = context.data() + (k * E + e) * S;
        bool any = a.t_o == nullptr;
        if (a.t_o)
          for (int64_t s = 0; s < S; ++s) {
            if (Counts(c[s], *a.t_o)) any = true;
            else c[s] = 0.f;
          }
        if (!any) continue;
        if (used != static_cast<size_t>(k * E + e)) std::copy(c, c + S, context.data() + used * S);
        ++used;
        out_rows.push_back(heads[k] * E + e);
      }
    RowCodes* context_grid = a.activation_bits && GatherTakesCodes(a.w_o_t, S, D) ? &context_codes : nullptr;
    if (a.activation_bits) RoundRowsToGrid(out_rows, context.data(), S, context_grid);
    GatherKeptRows(a.w_o_t, out_rows, context.data(), S, 0, D, a.b_o, a.y + b * S * D, parallel, context_grid);
  }
}

}  // namespace shadowllm
