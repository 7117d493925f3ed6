#include "activation_grid.h"

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SHADOWLLM_GRID_AVX2 1
#endif

#include "../../common/weight_format.h"
#include "simd.h"

namespace shadowllm {
namespace {

// One block's scale: max|v| / 127 in fp32 (0 for a block of zeros).
float BlockScale(float amax) { return amax / 127.f; }

// round(v / d) with ties to even (the default rounding mode), as an int; 0 when d is 0.
int Code(float v, float d) { return d == 0.f ? 0 : static_cast<int>(std::nearbyint(v / d)); }

#ifdef SHADOWLLM_GRID_AVX2
// The same rounding 8 lanes at a time (a prompt rounds S x width entries per projection: the scalar
// nearbyint call per entry cost a 128-token SmolLM2 prefill ~0.1 s): v / d, then round to nearest even.
__attribute__((target("avx2"))) inline __m256 GridCodes8(__m256 v, __m256 d) {
  const __m256 safe = _mm256_blendv_ps(d, _mm256_set1_ps(1.f), _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ));
  return _mm256_round_ps(_mm256_div_ps(v, safe), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// 32 contiguous entries rounded in place, their codes (as floats) into q; returns the block's scale.
__attribute__((target("avx2"))) inline float RoundBlock32Avx2(float* v, float* q) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int t = 0; t < 4; ++t) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 8 * t)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  const float d = BlockScale(_mm_cvtss_f32(h));
  const __m256 vd = _mm256_set1_ps(d);
  for (int t = 0; t < 4; ++t) {
    const __m256 c = GridCodes8(_mm256_loadu_ps(v + 8 * t), vd);
    _mm256_storeu_ps(q + 8 * t, c);
    _mm256_storeu_ps(v + 8 * t, _mm256_mul_ps(c, vd));
  }
  return d;
}

__attribute__((target("avx2"))) void RoundBlocksAvx2(float* x, int64_t S, int64_t D, ActivationCodes* codes) {
  const int64_t nb = D / kBlock;
  alignas(32) float q[kBlock];
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b = 0; b < nb; ++b) {
      const float d = RoundBlock32Avx2(x + s * D + b * kBlock, q);
      if (!codes) continue;
      int sum = 0;
      const int64_t at = s * D + b * kBlock;
      for (int64_t i = 0; i < kBlock; ++i) {
        const int c = static_cast<int>(q[i]);
        codes->q[at + i] = static_cast<int8_t>(c);
        codes->q_pairs[at + ((i & 1) ? kBlock / 2 + i / 2 : i / 2)] = static_cast<int8_t>(c);
        sum += c;
      }
      codes->d[s * nb + b] = d;
      codes->dsum[s * nb + b] = d * static_cast<float>(sum);
    }
}

// Rows i..j of a block, every token at once: coeff[k * S + s] is contiguous in s, so the lanes are tokens.
__attribute__((target("avx2"))) int64_t RoundRowBlockAvx2(float* coeff, int64_t i, int64_t j, int64_t S,
                                                           int8_t* q, float* d_out, int64_t d_stride) {
  const __m256 sign = _mm256_set1_ps(-0.f), c127 = _mm256_set1_ps(127.f);
  alignas(32) float lanes[8];
  alignas(32) int32_t ints[8];
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    __m256 m = _mm256_setzero_ps();
    for (int64_t k = i; k < j; ++k) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(coeff + k * S + s)));
    const __m256 d = _mm256_div_ps(m, c127);  // BlockScale, lane by lane
    for (int64_t k = i; k < j; ++k) {
      float* v = coeff + k * S + s;
      const __m256 c = GridCodes8(_mm256_loadu_ps(v), d);
      _mm256_storeu_ps(v, _mm256_mul_ps(c, d));
      if (!q) continue;
      _mm256_store_si256(reinterpret_cast<__m256i*>(ints), _mm256_cvtps_epi32(c));
      for (int l = 0; l < 8; ++l) q[k * S + s + l] = static_cast<int8_t>(ints[l]);
    }
    if (!d_out) continue;
    _mm256_store_ps(lanes, d);
    for (int l = 0; l < 8; ++l) d_out[(s + l) * d_stride] = lanes[l];
  }
  return s;  // the tokens from here on: one at a time
}

// One token's listed rows of a block (n <= kBlock contiguous coefficients: a decode step, S = 1)
// rounded in 8 lanes, through a zero-padded copy; returns the block's scale.
__attribute__((target("avx2"))) float RoundRunAvx2(float* v, int64_t n, int8_t* q) {
  alignas(32) float buf[kBlock] = {}, codes[kBlock];
  std::copy(v, v + n, buf);
  const float d = RoundBlock32Avx2(buf, codes);
  std::copy(buf, buf + n, v);
  if (q)
    for (int64_t k = 0; k < n; ++k) q[k] = static_cast<int8_t>(codes[k]);
  return d;
}
#endif

}  // namespace

void RoundToGrid(float* x, int64_t S, int64_t D, ActivationCodes* codes) {
  const int64_t nb = D / kBlock;
  if (codes) {
    codes->S = S, codes->D = D;
    codes->q.resize(static_cast<size_t>(S * D));
    codes->q_pairs.resize(static_cast<size_t>(S * D));
    codes->d.resize(static_cast<size_t>(S * nb));
    codes->dsum.resize(static_cast<size_t>(S * nb));
  }
#ifdef SHADOWLLM_GRID_AVX2
  if (CpuHasAvx2()) return RoundBlocksAvx2(x, S, D, codes);
#endif
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b = 0; b < nb; ++b) {
      float* v = x + s * D + b * kBlock;
      float amax = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(v[i]));
      const float d = BlockScale(amax);
      int sum = 0;
      for (int64_t i = 0; i < kBlock; ++i) {
        const int q = Code(v[i], d);
        v[i] = static_cast<float>(q) * d;
        sum += q;
        if (codes) {
          const int64_t at = s * D + b * kBlock;
          codes->q[at + i] = static_cast<int8_t>(q);
          codes->q_pairs[at + ((i & 1) ? kBlock / 2 + i / 2 : i / 2)] = static_cast<int8_t>(q);
        }
      }
      if (codes) {
        codes->d[s * nb + b] = d;
        codes->dsum[s * nb + b] = d * static_cast<float>(sum);
      }
    }
}

void RoundRowsToGrid(const std::vector<int64_t>& rows, float* coeff, int64_t S, RowCodes* codes) {
  const int64_t R = static_cast<int64_t>(rows.size());
  if (codes) {
    codes->blocks = R ? rows.back() / kBlock + 1 : 0;
    codes->q.assign(static_cast<size_t>(R * S), 0);
    codes->d.assign(static_cast<size_t>(S * codes->blocks), 0.f);
  }
  for (int64_t i = 0; i < R;) {
    int64_t j = i;
    while (j < R && rows[j] / kBlock == rows[i] / kBlock) ++j;
    int64_t s = 0;
#ifdef SHADOWLLM_GRID_AVX2
    if (S == 1 && CpuHasAvx2()) {
      const float d = RoundRunAvx2(coeff + i, j - i, codes ? codes->q.data() + i : nullptr);
      if (codes) codes->d[rows[i] / kBlock] = d;
      i = j;
      continue;
    }
    if (CpuHasAvx2())
      s = RoundRowBlockAvx2(coeff, i, j, S, codes ? codes->q.data() : nullptr,
                            codes ? codes->d.data() + rows[i] / kBlock : nullptr, codes ? codes->blocks : 0);
#endif
    for (; s < S; ++s) {
      float amax = 0.f;
      for (int64_t k = i; k < j; ++k) amax = std::fmax(amax, std::fabs(coeff[k * S + s]));
      const float d = BlockScale(amax);
      for (int64_t k = i; k < j; ++k) {
        const int q = Code(coeff[k * S + s], d);
        coeff[k * S + s] = static_cast<float>(q) * d;
        if (codes) codes->q[k * S + s] = static_cast<int8_t>(q);
      }
      if (codes) codes->d[s * codes->blocks + rows[i] / kBlock] = d;
    }
    i = j;
  }
}

void SelectRowCodes(const ActivationCodes& x, const std::vector<int64_t>& rows, RowCodes* out) {
  const int64_t S = x.S, R = static_cast<int64_t>(rows.size());
  out->blocks = x.D / kBlock;
  out->d = x.d;
  out->q.resize(static_cast<size_t>(R * S));
  for (int64_t i = 0; i < R; ++i)
    for (int64_t s = 0; s < S; ++s) out->q[i * S + s] = x.q[s * x.D + rows[i]];
}

}  // namespace shadowllm
