#include "vector_math.h"

#include <cmath>

#include "kernel_utils.h"
#include "simd.h"

#ifdef SHADOWLLM_X86
#include <immintrin.h>
#endif

namespace shadowllm {
namespace {

#ifdef SHADOWLLM_X86
// exp(x) in 8 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact to ~1 ulp),
// exp(r) by its Taylor series to r^7 (truncation below 2e-8 relative), times 2^n built in the
// exponent bits. Below -87.3 the result is 0 (a hidden key's score, -FLT_MAX, weighs nothing); above
// 88 it stays at exp(88) (2^n must stay finite: SiLU's t / (1 + exp(-t)) needs nothing past it).
SHADOWLLM_AVX2_TARGET inline __m256 Exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

SHADOWLLM_AVX2_TARGET int64_t SiluAvx2(const float* gate, float* up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 t = _mm256_loadu_ps(gate ? gate + i : up + i);
    const __m256 silu = _mm256_div_ps(t, _mm256_add_ps(one, Exp8(_mm256_sub_ps(_mm256_setzero_ps(), t))));
    _mm256_storeu_ps(up + i, gate ? _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)) : silu);
  }
  return i;  // the rest one at a time
}

SHADOWLLM_AVX2_TARGET int64_t ExpShiftedAvx2(float* v, int64_t n, float shift, float* sum) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 total = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), s));
    _mm256_storeu_ps(v + i, e);
    total = _mm256_add_ps(total, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  for (float l : lanes) *sum += l;
  return i;
}
#endif

}  // namespace

void ActivateInPlace(Activation a, const float* gate, float* up, int64_t n) {
  int64_t i = 0;
#ifdef SHADOWLLM_X86
  if (a == Activation::kSilu && CpuHasAvx2()) i = SiluAvx2(gate, up, n);
#endif
  for (; i < n; ++i) up[i] = gate ? Activate(a, gate[i]) * up[i] : Activate(a, up[i]);
}

float ExpShiftedSum(float* v, int64_t n, float shift) {
  float sum = 0.f;
  int64_t i = 0;
#ifdef SHADOWLLM_X86
  if (CpuHasAvx2()) i = ExpShiftedAvx2(v, n, shift, &sum);
#endif
  for (; i < n; ++i) sum += (v[i] = std::exp(v[i] - shift));
  return sum;
}

// Compiled for AVX-512, AVX2 and baseline x86-64 (SHADOWLLM_CLONES), 16 entries a vector: the
// attention kernel itself is built for baseline x86-64, where a dot of a 64-entry head ran as one
// dependent chain of SSE multiply-adds per (head, key).
SHADOWLLM_CLONES
void ScoreKeys(const float* q, int64_t n, const float* keys, int64_t m, int64_t E, float scale, float* p) {
  const int64_t E16 = E / 16 * 16;
  for (int64_t i = 0; i < n; ++i) {
    const float* qi = q + i * E;
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
      const float* k0 = keys + j * E;
      V16 acc[4] = {};
      for (int64_t e = 0; e < E16; e += 16) {
        const V16 qv = Load(qi + e);
        for (int u = 0; u < 4; ++u) acc[u] += qv * Load(k0 + u * E + e);
      }
      for (int u = 0; u < 4; ++u) {
        float tail = 0.f;
        for (int64_t e = E16; e < E; ++e) tail += qi[e] * k0[u * E + e];
        p[i * m + j + u] = scale * (Sum(acc[u]) + tail);
      }
    }
    for (; j < m; ++j) {
      float a = 0.f;
      for (int64_t e = 0; e < E; ++e) a += qi[e] * keys[j * E + e];
      p[i * m + j] = scale * a;
    }
  }
}

SHADOWLLM_CLONES
void AccumulateValues(const float* p, int64_t n, const float* values, int64_t m, int64_t E, float* out,
                      int64_t stride) {
  const int64_t E16 = E / 16 * 16;
  for (int64_t i = 0; i < n; ++i) {
    float* oi = out + i * stride;
    for (int64_t e = 0; e < E16; e += 16) {  // 16 context entries of head i over every key
      V16 acc = Load(oi + e);
      for (int64_t j = 0; j < m; ++j) acc += Splat(p[i * m + j]) * Load(values + j * E + e);
      Store(oi + e, acc);
    }
    for (int64_t e = E16; e < E; ++e)
      for (int64_t j = 0; j < m; ++j) oi[e] += p[i * m + j] * values[j * E + e];
  }
}

}  // namespace shadowllm
