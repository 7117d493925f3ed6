#include "kernel.h"

#include "../common/gather_project.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

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

// out[s, :] = x[s, :] . w[row, :] (+ bias) for the E rows of one head.
void Project(const float* x, const float* w, const float* bias, int64_t S, int64_t D, int64_t E, float* out) {
  for (int64_t s = 0; s < S; ++s)
    for (int64_t e = 0; e < E; ++e) out[s * E + e] = Dot(x + s * D, w + e * D, D) + (bias ? bias[e] : 0.f);
}

}  // namespace

void SparseHeadAttention(const AttentionArgs& a) {
  const int64_t S = a.S, D = a.D, E = a.E, P = a.P, T = a.P + a.S, G = a.G, H = a.H;
  const int64_t per_group = H / G;
  for (int64_t b = 0; b < a.B; ++b) {
    const float* x = a.x + b * S * D;
    const std::vector<int64_t> heads = ActiveRows(a.head_mask + b * H, H);
    std::vector<char> group_on(static_cast<size_t>(G), a.kv_active ? 0 : 1);
    for (int64_t h : heads) group_on[h / per_group] = 1;
    const int64_t* positions = a.position_ids + b * S;

    // New K/V of the needed kv heads, written straight into the present cache after the past.
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < G; ++g) {
      float* pk = a.present_key + (b * G + g) * T * E;
      float* pv = a.present_value + (b * G + g) * T * E;
      std::memcpy(pk, a.past_key + (b * G + g) * P * E, sizeof(float) * P * E);
      std::memcpy(pv, a.past_value + (b * G + g) * P * E, sizeof(float) * P * E);
      if (!group_on[g]) {
        std::fill(pk + P * E, pk + T * E, 0.f);
        std::fill(pv + P * E, pv + T * E, 0.f);
        continue;
      }
      Project(x, a.w_k + g * E * D, a.b_k ? a.b_k + g * E : nullptr, S, D, E, pk + P * E);
      Project(x, a.w_v + g * E * D, a.b_v ? a.b_v + g * E : nullptr, S, D, E, pv + P * E);
      if (a.rope)
        for (int64_t s = 0; s < S; ++s) Rope(pk + (P + s) * E, a.cos, a.sin, positions[s], E);
    }

    // Per kept head: q, scores over visible keys, softmax, context, stored [K*E, S] (one row per
    // w_o_t row) for the output projection.
    const int64_t K = static_cast<int64_t>(heads.size());
    std::vector<float> context(static_cast<size_t>(K * E * S));
    const int64_t* visible = a.attention_mask + b * T;
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t h = heads[k], g = h / per_group;
      std::vector<float> q(static_cast<size_t>(S * E)), p(static_cast<size_t>(T));
      Project(x, a.w_q + h * E * D, a.b_q ? a.b_q + h * E : nullptr, S, D, E, q.data());
      const float* keys = a.present_key + (b * G + g) * T * E;
      const float* values = a.present_value + (b * G + g) * T * E;
      for (int64_t s = 0; s < S; ++s) {
        float* qs = q.data() + s * E;
        if (a.rope) Rope(qs, a.cos, a.sin, positions[s], E);
        float top = -FLT_MAX;
        for (int64_t j = 0; j < T; ++j) {
          // hidden keys score the float minimum, so a row that sees nothing attends uniformly
          p[j] = (j <= P + s && visible[j]) ? Dot(qs, keys + j * E, E) * a.scale : -FLT_MAX;
          top = std::max(top, p[j]);
        }
        double total = 0.0;
        for (int64_t j = 0; j < T; ++j) total += (p[j] = std::exp(p[j] - top));
        std::vector<double> out(static_cast<size_t>(E), 0.0);
        for (int64_t j = 0; j < T; ++j) Axpy(p[j] / total, values + j * E, out.data(), E);
        for (int64_t e = 0; e < E; ++e) context[(k * E + e) * S + s] = static_cast<float>(out[e]);
      }
    }

    // y = sum over kept heads of context_h @ w_o_t[hE:(h+1)E] + b_o: the E rows of each kept head.
    std::vector<int64_t> rows;
    rows.reserve(static_cast<size_t>(K * E));
    for (int64_t h : heads)
      for (int64_t e = 0; e < E; ++e) rows.push_back(h * E + e);
    GatherProject(rows, context.data(), a.w_o_t, a.b_o, a.y + b * S * D, S, D);
  }
}

}  // namespace shadowllm
