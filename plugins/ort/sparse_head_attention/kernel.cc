#include "kernel.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/row_kernels.h"

namespace shadowllm {
namespace {

// Rotate-half RoPE in place on one [E] vector at position `pos`.
void Rope(float* t, const float* cos, const float* sin, int64_t pos, int64_t E) {
  const int64_t half = E / 2;
  const float* c = cos + pos * half;
  const float* s = sin + pos * half;
  for (int64_t i = 0; i < half; ++i) {
    const float t1 = t[i], t2 = t[i + half];
    t[i] = t1 * c[i] - t2 * s[i];
    t[i + half] = t2 * c[i] + t1 * s[i];
  }
}

}  // namespace

void SparseHeadAttention(const AttentionArgs& a, const Parallel& parallel) {
  const int64_t S = a.S, D = a.D, E = a.E, P = a.P, T = a.P + a.S, G = a.G, H = a.H;
  const int64_t C = a.C, N = std::max(C, T);  // past_key's positions, present's
  const bool in_place = a.present_key == a.past_key;
  const int64_t per_group = H / G;
  std::vector<float> kept_x;
  for (int64_t b = 0; b < a.B; ++b) {
    const float* x = KeepLarge(a.x + b * S * D, S * D, a.t_x, kept_x);  // below t_x: zero
    const std::vector<int64_t> heads = ActiveRows(a.head_mask + b * H, H);
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
    std::vector<float> proj(static_cast<size_t>((K + 2 * NG) * E * S));
    if (a.channel_major) {
      // Each run of consecutive units is one column block of a [D, units*E] weight, read one kept
      // channel row at a time (KeptChannels: all D without a threshold).
      const std::vector<int64_t> channels = KeptChannels(a.x + b * S * D, S, D, a.t_x);
      std::vector<float> block;
      auto project_runs = [&](const std::vector<int64_t>& units, const float* w, int64_t ld, int64_t first_row) {
        for (size_t i = 0; i < units.size();) {
          size_t j = i + 1;
          while (j < units.size() && units[j] == units[j - 1] + 1) ++j;
          const int64_t width = static_cast<int64_t>(j - i) * E;
          block.resize(static_cast<size_t>(S * width));
          ChannelProject(x, S, D, channels, w, ld, units[i] * E, width, nullptr, block.data(), parallel);
          for (int64_t c = 0; c < width; ++c)
            for (int64_t s = 0; s < S; ++s) proj[(first_row + static_cast<int64_t>(i) * E + c) * S + s] = block[s * width + c];
          i = j;
        }
      };
      project_runs(heads, a.w_q, H * E, 0);
      project_runs(groups, a.w_k, G * E, K * E);
      project_runs(groups, a.w_v, G * E, (K + NG) * E);
    } else {
      // One pass over every weight row this call needs: q rows of kept heads, k and v rows of the
      // needed kv heads.
      std::vector<const float*> rows;
      rows.reserve(static_cast<size_t>((K + 2 * NG) * E));
      for (int64_t h : heads)
        for (int64_t e = 0; e < E; ++e) rows.push_back(a.w_q + (h * E + e) * D);
      for (const float* w : {a.w_k, a.w_v})
        for (int64_t g : groups)
          for (int64_t e = 0; e < E; ++e) rows.push_back(w + (g * E + e) * D);
      ProjectRows(x, S, D, rows, proj.data(), parallel);
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
        if (a.rope) Rope(pk + s * E, a.cos, a.sin, positions[s], E);
      }
    }

    // Per kept head and token: q (bias, RoPE), scores over visible keys (hidden ones score the float
    // minimum, so a row that sees nothing attends uniformly), softmax, context into [K*E, S].
    std::vector<float> context(static_cast<size_t>(K * E * S));
    const int64_t* visible = a.attention_mask + b * T;
    parallel.For(K, [&](int64_t k) {
      const int64_t h = heads[k], g = h / per_group;
      std::vector<float> q(static_cast<size_t>(E)), p(static_cast<size_t>(T)), out(static_cast<size_t>(E));
      const float* keys = a.present_key + (b * G + g) * N * E;
      const float* values = a.present_value + (b * G + g) * N * E;
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t e = 0; e < E; ++e) q[e] = proj[(k * E + e) * S + s] + (a.b_q ? a.b_q[h * E + e] : 0.f);
        if (a.rope) Rope(q.data(), a.cos, a.sin, positions[s], E);
        float top = -FLT_MAX;
        for (int64_t j = 0; j < T; ++j) {
          p[j] = (j <= P + s && visible[j]) ? Dot(q.data(), keys + j * E, E) * a.scale : -FLT_MAX;
          top = std::max(top, p[j]);
        }
        float total = 0.f;
        for (int64_t j = 0; j < T; ++j) total += (p[j] = std::exp(p[j] - top));
        std::fill(out.begin(), out.end(), 0.f);
        for (int64_t j = 0; j < T; ++j) {
          const float w = p[j] / total;
          for (int64_t e = 0; e < E; ++e) out[e] += w * values[j * E + e];
        }
        for (int64_t e = 0; e < E; ++e) context[(k * E + e) * S + s] = out[e];
      }
    });

    // y = sum over kept heads of context_h @ w_o_t[hE:(h+1)E] + b_o: the E rows each kept head owns;
    // with t_o, only the rows of context entries that count for some token.
    std::vector<const float*> out_rows;
    out_rows.reserve(static_cast<size_t>(K * E));
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
        out_rows.push_back(a.w_o_t + (heads[k] * E + e) * D);
      }
    GatherProject(out_rows, context.data(), S, D, a.b_o, a.y + b * S * D, parallel);
  }
}

}  // namespace shadowllm
