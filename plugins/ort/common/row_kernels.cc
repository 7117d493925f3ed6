#include "row_kernels.h"

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace shadowllm {
namespace {

// A tile of R rows x T tokens: the R*T dot products over D, the rows and tokens each loaded once
// per 16 columns. R=4 keeps four row streams in flight for the memory system.
template <int R, int T>
SHADOWLLM_INLINE void DotTile(const float* const* w, const float* x, int64_t D, float* out, int64_t S) {
  V16 acc[R][T] = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    V16 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = Load(x + t * D + d);
    for (int r = 0; r < R; ++r) {
      const V16 wv = Load(w[r] + d);
      for (int t = 0; t < T; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float tail = 0.f;
      for (int64_t i = d; i < D; ++i) tail += w[r][i] * x[t * D + i];
      out[r * S + t] = Sum(acc[r][t]) + tail;
    }
}

// Rows [r0, r1) against every token: 4 rows x 4 tokens at a time, then the rest.
SHADOWLLM_CLONES
void ProjectChunk(const float* x, int64_t S, int64_t D, const float* const* rows, int64_t r0, int64_t r1, float* out) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    int64_t s = 0;
    for (; s + 4 <= S; s += 4) DotTile<4, 4>(rows + r, x + s * D, D, out + r * S + s, S);
    for (; s < S; ++s) DotTile<4, 1>(rows + r, x + s * D, D, out + r * S + s, S);
  }
  for (; r < r1; ++r)
    for (int64_t s = 0; s < S; ++s) DotTile<1, 1>(rows + r, x + s * D, D, out + r * S + s, S);
}

// acc[0:D] (+)= sum over rows [r0, r1) of coeff[r * S + s] * rows[r], four rows per pass over acc.
SHADOWLLM_CLONES
void AccumulateRows(const float* const* rows, const float* coeff, int64_t S, int64_t s, int64_t r0, int64_t r1,
                    int64_t D, float* acc) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const V16 c0 = Splat(coeff[r * S + s]), c1 = Splat(coeff[(r + 1) * S + s]);
    const V16 c2 = Splat(coeff[(r + 2) * S + s]), c3 = Splat(coeff[(r + 3) * S + s]);
    const float *w0 = rows[r], *w1 = rows[r + 1], *w2 = rows[r + 2], *w3 = rows[r + 3];
    int64_t d = 0;
    for (; d + 16 <= D; d += 16)
      Store(acc + d, Load(acc + d) + ((c0 * Load(w0 + d) + c1 * Load(w1 + d)) + (c2 * Load(w2 + d) + c3 * Load(w3 + d))));
    for (; d < D; ++d)
      acc[d] += (coeff[r * S + s] * w0[d] + coeff[(r + 1) * S + s] * w1[d]) +
                (coeff[(r + 2) * S + s] * w2[d] + coeff[(r + 3) * S + s] * w3[d]);
  }
  for (; r < r1; ++r) {
    const float c = coeff[r * S + s];
    for (int64_t d = 0; d < D; ++d) acc[d] += c * rows[r][d];
  }
}

// Columns [d0, d0 + 64) of tokens [s0, s0 + T), rows [r0, r1): a T x 64 register tile added to y.
template <int T>
SHADOWLLM_INLINE void ProjectTile(const float* const* rows, int64_t r0, int64_t r1, const float* coeff, int64_t S,
                                  int64_t s0, int64_t d0, int64_t D, float* y) {
  V16 acc[T][4] = {};
  for (int64_t r = r0; r < r1; ++r) {
    const float* w = rows[r] + d0;
    const V16 w0 = Load(w), w1 = Load(w + 16), w2 = Load(w + 32), w3 = Load(w + 48);
    for (int t = 0; t < T; ++t) {
      const V16 c = Splat(coeff[r * S + s0 + t]);
      acc[t][0] += c * w0;
      acc[t][1] += c * w1;
      acc[t][2] += c * w2;
      acc[t][3] += c * w3;
    }
  }
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < 4; ++j) Store(y + (s0 + t) * D + d0 + 16 * j, Load(y + (s0 + t) * D + d0 + 16 * j) + acc[t][j]);
}

// Prefill output projection, columns [d0, d1): rows in blocks of kRowBlock, so that the block's
// 64-column strips stay in cache across every token tile.
constexpr int64_t kRowBlock = 64;

SHADOWLLM_CLONES
void ProjectColumns(const float* const* rows, int64_t R, const float* coeff, int64_t S, int64_t D, int64_t d0,
                    int64_t d1, float* y) {
  int64_t d = d0;
  for (; d + 64 <= d1; d += 64)
    for (int64_t rb = 0; rb < R; rb += kRowBlock) {
      const int64_t re = std::min(R, rb + kRowBlock);
      int64_t s = 0;
      for (; s + 4 <= S; s += 4) ProjectTile<4>(rows, rb, re, coeff, S, s, d, D, y);
      for (; s < S; ++s) ProjectTile<1>(rows, rb, re, coeff, S, s, d, D, y);
    }
  for (; d < d1; ++d)  // columns past the last whole tile
    for (int64_t s = 0; s < S; ++s) {
      float a = 0.f;
      for (int64_t r = 0; r < R; ++r) a += coeff[r * S + s] * rows[r][d];
      y[s * D + d] += a;
    }
}

constexpr int64_t kRowTasks = 8;       // decode: partial sums, each over a contiguous share of the rows
constexpr int64_t kPrefillTokens = 4;  // from this many tokens on, split columns instead of rows

}  // namespace

void ProjectRows(const float* x, int64_t S, int64_t D, const std::vector<const float*>& rows, float* out,
                 const Parallel& parallel) {
  const int64_t R = static_cast<int64_t>(rows.size());
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(64, R / 16));
  ForChunks(parallel, R, tasks, 4, [&](int64_t r0, int64_t r1) { ProjectChunk(x, S, D, rows.data(), r0, r1, out); });
}

void GatherProject(const std::vector<const float*>& rows, const float* coeff, int64_t S, int64_t D,
                   const float* bias, float* y, const Parallel& parallel) {
  const int64_t R = static_cast<int64_t>(rows.size());
  for (int64_t s = 0; s < S; ++s)
    for (int64_t d = 0; d < D; ++d) y[s * D + d] = bias ? bias[d] : 0.f;
  if (R == 0) return;
  if (S >= kPrefillTokens) {
    const int64_t tasks = std::max<int64_t>(1, D / 128);
    ForChunks(parallel, D, tasks, 64, [&](int64_t d0, int64_t d1) { ProjectColumns(rows.data(), R, coeff, S, D, d0, d1, y); });
    return;
  }
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(kRowTasks, R / 32));
  const int64_t chunk = (R + tasks - 1) / tasks;
  std::vector<float> partial(static_cast<size_t>(tasks * S * D), 0.f);
  parallel.For(tasks, [&](int64_t i) {
    const int64_t r0 = i * chunk, r1 = std::min(R, r0 + chunk);
    for (int64_t s = 0; s < S; ++s) AccumulateRows(rows.data(), coeff, S, s, r0, r1, D, partial.data() + (i * S + s) * D);
  });
  for (int64_t i = 0; i < tasks; ++i)
    for (int64_t j = 0; j < S * D; ++j) y[j] += partial[i * S * D + j];
}

}  // namespace shadowllm
