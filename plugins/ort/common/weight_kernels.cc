#include "weight_kernels.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SHADOWLLM_AVX2 1
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#endif

#include "gemm.h"
#include "row_kernels.h"
#include "scratch.h"
#include "simd.h"

namespace shadowllm {
namespace {

typedef uint8_t U8x16 __attribute__((vector_size(16)));
typedef int8_t I8x16 __attribute__((vector_size(16)));
typedef _Float16 H16 __attribute__((vector_size(32)));

constexpr int64_t kPrefillTokens = 4;  // from this many tokens on, dequantize once and run the fp32 products
constexpr int kMaxDecode = kPrefillTokens - 1;

SHADOWLLM_INLINE float Half(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof h);
  return static_cast<float>(h);
}

SHADOWLLM_INLINE V16 Halves(const uint16_t* p) {  // 16 consecutive fp16 values as floats
  H16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, V16);
}

// 32 int4 codes (16 bytes, low nibble first) as two vectors of 16 floats in element order.
SHADOWLLM_INLINE void Nibbles(const uint8_t* p, V16& first, V16& second) {
  U8x16 raw;
  std::memcpy(&raw, p, sizeof raw);
  const U8x16 lo = raw & 15, hi = raw >> 4;
  const U8x16 a = __builtin_shufflevector(lo, hi, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const U8x16 b = __builtin_shufflevector(lo, hi, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  first = __builtin_convertvector(a, V16);
  second = __builtin_convertvector(b, V16);
}

// 32 int8 codes as two vectors of 16 floats.
SHADOWLLM_INLINE void Bytes(const int8_t* p, V16& first, V16& second) {
  I8x16 a, b;
  std::memcpy(&a, p, sizeof a);
  std::memcpy(&b, p + 16, sizeof b);
  first = __builtin_convertvector(a, V16);
  second = __builtin_convertvector(b, V16);
}

// Codes [i, i + 32) of a matrix (flat element index i, a multiple of 2) as floats, before scaling.
SHADOWLLM_INLINE void Codes(const Matrix& w, int64_t i, V16& first, V16& second) {
  if (w.format == WeightFormat::kInt4)
    Nibbles(w.bytes() + i / 2, first, second);
  else
    Bytes(static_cast<const int8_t*>(w.data) + i, first, second);
}

// Decode: dot products of S tokens with rows [i0, i1) of `rows`, blocks along each row. The block's
// sum d * (q . x) + m * sum(x): the codes are scaled once per block, the minimum meets x's block sum.
// (Portable version; DotQuantRowsAvx2 below is the one x86 machines with AVX2 run.)
void DotQuantRows(const float* x, const float* xsum, int64_t S, const Matrix& w, const int64_t* rows, int64_t i0,
                  int64_t i1, float* out) {
  const int64_t D = w.cols, nb = D / kBlock;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = rows[i];
    V16 acc[kMaxDecode] = {};
    float lift[kMaxDecode] = {};
    for (int64_t b = 0; b < nb; ++b) {
      V16 q0, q1;
      Codes(w, r * D + b * kBlock, q0, q1);
      const V16 d = Splat(Half(w.scale[r * nb + b]));
      for (int64_t s = 0; s < S; ++s) {
        const float* xs = x + s * D + b * kBlock;
        acc[s] += d * (q0 * Load(xs) + q1 * Load(xs + 16));
      }
      if (w.minimum) {
        const float m = Half(w.minimum[r * nb + b]);
        for (int64_t s = 0; s < S; ++s) lift[s] += m * xsum[s * nb + b];
      }
    }
    for (int64_t s = 0; s < S; ++s) out[i * S + s] = Sum(acc[s]) + lift[s];
  }
}

// Decode: y[s, c0:c1) += the kept rows' contributions, blocks across rows (block_axis 0). Per block
// of kBlock rows with any kept row: the codes weighted by their coefficients are summed first, then
// scaled by the block's scales (one read per block), plus the minimums times the coefficients' sum.
// (Portable version; GatherQuantColumnsAvx2 below is the one x86 machines with AVX2 run.)
void GatherQuantColumns(const Matrix& w, const std::vector<int64_t>& rows, const float* coeff, int64_t S,
                        int64_t col, int64_t width, int64_t c0, int64_t c1, float* y) {
  const int64_t C = w.cols, n = c1 - c0, n32 = n / kBlock * kBlock, n16 = n / 16 * 16;
  std::vector<float> acc(static_cast<size_t>(S * n));
  float csum[kMaxDecode];
  const int64_t R = static_cast<int64_t>(rows.size());
  for (int64_t i = 0; i < R;) {
    const int64_t block = rows[i] / kBlock;
    int64_t j = i;
    while (j < R && rows[j] / kBlock == block) ++j;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t s = 0; s < S; ++s) csum[s] = 0.f;
    for (int64_t k = i; k < j; ++k) {
      const int64_t r = rows[k];
      for (int64_t s = 0; s < S; ++s) csum[s] += coeff[k * S + s];
      for (int64_t c = 0; c < n32; c += kBlock) {
        V16 q0, q1;
        Codes(w, r * C + col + c0 + c, q0, q1);
        for (int64_t s = 0; s < S; ++s) {
          const V16 cf = Splat(coeff[k * S + s]);
          float* a = acc.data() + s * n + c;
          Store(a, Load(a) + cf * q0);
          Store(a + 16, Load(a + 16) + cf * q1);
        }
      }
      for (int64_t c = n32; c < n; ++c) {  // a run narrower than a block (small head_dim): one code at a time
        const int64_t e = r * C + col + c0 + c;
        const uint8_t byte = w.format == WeightFormat::kInt4 ? w.bytes()[e / 2] : 0;
        const float q = w.format == WeightFormat::kInt4 ? static_cast<float>((e & 1) ? byte >> 4 : byte & 15)
                                                        : static_cast<float>(static_cast<const int8_t*>(w.data)[e]);
        for (int64_t s = 0; s < S; ++s) acc[s * n + c] += coeff[k * S + s] * q;
      }
    }
    const uint16_t* d = w.scale + block * C + col + c0;
    const uint16_t* m = w.minimum ? w.minimum + block * C + col + c0 : nullptr;
    for (int64_t c = 0; c < n16; c += 16) {
      const V16 dv = Halves(d + c), mv = m ? Halves(m + c) : V16{};
      for (int64_t s = 0; s < S; ++s) {
        float* out = y + s * width + c0 + c;
        Store(out, Load(out) + dv * Load(acc.data() + s * n + c) + mv * csum[s]);
      }
    }
    for (int64_t c = n16; c < n; ++c)
      for (int64_t s = 0; s < S; ++s)
        y[s * width + c0 + c] += Half(d[c]) * acc[s * n + c] + (m ? Half(m[c]) * csum[s] : 0.f);
    i = j;
  }
}

#ifdef SHADOWLLM_AVX2
// The same loops in AVX2 + FMA + F16C intrinsics: GCC's generic 16-float vectors lower the code
// conversions through the stack, 8x slower than these. Codes become floats in registers: 16 bytes of
// int4 (32 codes) -> unpacked nibbles in element order -> four vectors of 8 floats.
AVX2_TARGET inline void Codes8(const Matrix& w, int64_t i, __m256 q[4]) {
  if (w.format == WeightFormat::kInt4) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.bytes() + i / 2));
    const __m128i low = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    const __m128i a = _mm_unpacklo_epi8(lo, hi), b = _mm_unpackhi_epi8(lo, hi);
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  } else {
    const int8_t* p = static_cast<const int8_t*>(w.data) + i;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  }
}

AVX2_TARGET inline __m256 Halves8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

AVX2_TARGET inline float Sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// kS > 0 fixes the number of inputs at compile time: a decode step (S = 1) then keeps its
// accumulators in registers; indexed by a runtime S they live on the stack, and every block's FMA
// waits on a store and a reload (3x slower at S = 1). kS = 0: any S up to kMaxDecode.
template <int kS>
AVX2_TARGET void DotQuantRowsAvx2S(const float* x, const float* xsum, int64_t S_, const Matrix& w,
                                   const int64_t* rows, int64_t i0, int64_t i1, float* out) {
  const int64_t S = kS > 0 ? kS : S_;
  const int64_t D = w.cols, nb = D / kBlock;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = rows[i];
    __m256 acc[kMaxDecode];
    float lift[kMaxDecode] = {};
    for (int64_t s = 0; s < S; ++s) acc[s] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256 q[4];
      Codes8(w, r * D + b * kBlock, q);
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(w.scale[r * nb + b]));
      for (int64_t s = 0; s < S; ++s) {
        const float* xs = x + s * D + b * kBlock;
        __m256 t = _mm256_mul_ps(q[0], _mm256_loadu_ps(xs));
        t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xs + 8), t);
        t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xs + 16), t);
        t = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xs + 24), t);
        acc[s] = _mm256_fmadd_ps(d, t, acc[s]);
      }
      if (w.minimum) {
        const float m = _cvtsh_ss(w.minimum[r * nb + b]);
        for (int64_t s = 0; s < S; ++s) lift[s] += m * xsum[s * nb + b];
      }
    }
    for (int64_t s = 0; s < S; ++s) out[i * S + s] = Sum8(acc[s]) + lift[s];
  }
}

// Columns outer, rows inner: a 32-column strip of every kept row of a block accumulates in
// registers, then meets the block's scales once.
template <int kS>  // as DotQuantRowsAvx2S
AVX2_TARGET void GatherQuantColumnsAvx2S(const Matrix& w, const std::vector<int64_t>& rows, const float* coeff,
                                         int64_t S_, int64_t col, int64_t width, int64_t c0, int64_t c1, float* y) {
  const int64_t S = kS > 0 ? kS : S_;
  const int64_t C = w.cols, n = c1 - c0, n32 = n / kBlock * kBlock;
  const int64_t R = static_cast<int64_t>(rows.size());
  for (int64_t i = 0; i < R;) {
    const int64_t block = rows[i] / kBlock;
    int64_t j = i;
    while (j < R && rows[j] / kBlock == block) ++j;
    float csum[kMaxDecode] = {};
    for (int64_t k = i; k < j; ++k)
      for (int64_t s = 0; s < S; ++s) csum[s] += coeff[k * S + s];
    const uint16_t* d = w.scale + block * C + col;
    const uint16_t* m = w.minimum ? w.minimum + block * C + col : nullptr;
    for (int64_t c = c0; c < c0 + n32; c += kBlock) {
      __m256 acc[kMaxDecode][4];
      for (int64_t s = 0; s < S; ++s)
        for (int t = 0; t < 4; ++t) acc[s][t] = _mm256_setzero_ps();
      for (int64_t k = i; k < j; ++k) {
        __m256 q[4];
        Codes8(w, rows[k] * C + col + c, q);
        for (int64_t s = 0; s < S; ++s) {
          const __m256 cf = _mm256_set1_ps(coeff[k * S + s]);
          for (int t = 0; t < 4; ++t) acc[s][t] = _mm256_fmadd_ps(cf, q[t], acc[s][t]);
        }
      }
      for (int t = 0; t < 4; ++t) {
        const __m256 dv = Halves8(d + c + 8 * t);
        const __m256 mv = m ? Halves8(m + c + 8 * t) : _mm256_setzero_ps();
        for (int64_t s = 0; s < S; ++s) {
          float* out = y + s * width + c + 8 * t;
          __m256 v = _mm256_fmadd_ps(dv, acc[s][t], _mm256_loadu_ps(out));
          _mm256_storeu_ps(out, _mm256_fmadd_ps(mv, _mm256_set1_ps(csum[s]), v));
        }
      }
    }
    for (int64_t c = c0 + n32; c < c1; ++c)  // a run narrower than a block (small head_dim)
      for (int64_t s = 0; s < S; ++s) {
        float a = 0.f;
        for (int64_t k = i; k < j; ++k) a += coeff[k * S + s] * WeightAt(w, rows[k], col + c);
        y[s * width + c] += a;
      }
    i = j;
  }
}

// The same dots with x on the int8 activation grid (activation_grid.h), as integers: per block, the
// 32 weight codes as bytes (int4: the two nibble planes of 16 bytes; int8: their magnitudes, the signs
// moved onto x's codes) meet x's 32 codes in one maddubs (pairs summed to 16 bits: at most
// 2 * 128 * 127, no saturation), one madd to 32 bits, one conversion, one FMA with d_w * d_x. An int4
// block's minimum meets d_x * sum(q_x) (codes.dsum) once per block.
// The integer dot of one block of weight codes (flat element index i, a multiple of 32) with x's 32
// codes xq, as 8 int32 lanes to be summed (BlockCodeDot: as floats): int4 codes as their two nibble
// planes (x's codes in the matching pair order, ActivationCodes::q_pairs), int8 codes as magnitudes
// with the signs moved onto x.
AVX2_TARGET inline __m256i BlockCodeSums(const Matrix& w, int64_t i, bool int4, __m256i xq) {
  __m256i wq;
  if (int4) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.bytes() + i / 2));
    wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(15));
  } else {
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(w.data) + i));
    xq = _mm256_sign_epi8(xq, codes);
    wq = _mm256_sign_epi8(codes, codes);
  }
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), _mm256_set1_epi16(1));
}

AVX2_TARGET inline __m256 BlockCodeDot(const Matrix& w, int64_t i, bool int4, __m256i xq) {
  return _mm256_cvtepi32_ps(BlockCodeSums(w, i, int4, xq));
}

template <int kS>
AVX2_TARGET void DotQuantRowsInt8Avx2S(const ActivationCodes& x, int64_t S_, const Matrix& w, const int64_t* rows,
                                       int64_t i0, int64_t i1, float* out) {
  const int64_t S = kS > 0 ? kS : S_;
  const int64_t D = w.cols, nb = D / kBlock;
  const bool int4 = w.format == WeightFormat::kInt4;
  const int8_t* q = int4 ? x.q_pairs.data() : x.q.data();
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = rows[i];
    __m256 acc[kMaxDecode];
    float lift[kMaxDecode] = {};
    for (int64_t s = 0; s < S; ++s) acc[s] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const float dw = _cvtsh_ss(w.scale[r * nb + b]);
      for (int64_t s = 0; s < S; ++s) {  // the block's codes are read once from memory, then from L1
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + s * D + b * kBlock));
        const __m256 dot = BlockCodeDot(w, r * D + b * kBlock, int4, xq);
        acc[s] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d[s * nb + b]), dot, acc[s]);
      }
      if (w.minimum) {
        const float m = _cvtsh_ss(w.minimum[r * nb + b]);
        for (int64_t s = 0; s < S; ++s) lift[s] += m * x.dsum[s * nb + b];
      }
    }
    for (int64_t s = 0; s < S; ++s) out[i * S + s] = Sum8(acc[s]) + lift[s];
  }
}

// Lane sums of eight int32 vectors, one vector: lane k = the sum of v[k]'s 8 lanes.
AVX2_TARGET inline __m256i LaneSums8(const __m256i v[8]) {
  const __m256i h01 = _mm256_hadd_epi32(v[0], v[1]), h23 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i h45 = _mm256_hadd_epi32(v[4], v[5]), h67 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);  // per 128-bit half
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// A decode step (one token) four rows at a time: x's block codes are loaded once for the four, and
// the four rows' sums are independent chains. Eight blocks of a row at a time: each block's integer dot
// stays an int32 vector until the eight are summed across lanes together (one vector, a block a lane),
// so the fp16 scales and minimums are converted, multiplied by x's scales and accumulated eight at a
// time, not one scalar conversion, multiply and broadcast per block and row
// (research/decode_kernel_bench.cc on an AVX-512 Xeon, int8 inputs, cycles a 32-weight block: in L2
// 5.0-5.2 -> 4.0-4.1, out of cache 10.3-10.5 -> 8.3-8.6).
AVX2_TARGET void DotFourRowsInt8Avx2(const ActivationCodes& x, const Matrix& w, const int64_t* rows, int64_t i0,
                                     int64_t i1, float* out) {
  const int64_t D = w.cols, nb = D / kBlock, nb8 = nb / 8 * 8;
  const bool int4 = w.format == WeightFormat::kInt4;
  const int8_t* q = int4 ? x.q_pairs.data() : x.q.data();
  for (int64_t i = i0; i < i1; i += 4) {
    const int64_t r[4] = {rows[i], rows[i + 1], rows[i + 2], rows[i + 3]};
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 lift[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b0 = 0; b0 < nb8; b0 += 8) {
      const __m256 dx = _mm256_loadu_ps(x.d.data() + b0);
      for (int u = 0; u < 4; ++u) {  // a row's eight blocks (x's codes: from L1 again per row)
        __m256i sums[8];
        for (int64_t k = 0; k < 8; ++k)
          sums[k] = BlockCodeSums(w, r[u] * D + (b0 + k) * kBlock, int4,
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (b0 + k) * kBlock)));
        const __m256 scale = _mm256_mul_ps(Halves8(w.scale + r[u] * nb + b0), dx);
        acc[u] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(LaneSums8(sums)), acc[u]);
        if (w.minimum)
          lift[u] = _mm256_fmadd_ps(Halves8(w.minimum + r[u] * nb + b0), _mm256_loadu_ps(x.dsum.data() + b0), lift[u]);
      }
    }
    float tail[4] = {};  // the last nb % 8 blocks, one at a time
    for (int64_t b = nb8; b < nb; ++b) {
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
      for (int u = 0; u < 4; ++u) {
        tail[u] += _cvtsh_ss(w.scale[r[u] * nb + b]) * x.d[b] * Sum8(BlockCodeDot(w, r[u] * D + b * kBlock, int4, xq));
        if (w.minimum) tail[u] += _cvtsh_ss(w.minimum[r[u] * nb + b]) * x.dsum[b];
      }
    }
    for (int u = 0; u < 4; ++u) out[i + u] = Sum8(_mm256_add_ps(acc[u], lift[u])) + tail[u];
  }
}

// A decode step's gather (one token) over int4 weights with blocks across rows, coefficients on the
// int8 grid (their codes q, block scales d): per block of listed rows, the integer sums
// sum_k q[k] * code[k, c] for every column, then one scale per column: y[c] += d_w[c] * d_x * sum +
// m[c] * d_x * sum_k q[k]. Two kept rows go through one maddubs: their codes (64 columns per 32 bytes)
// are split into nibble planes and byte-interleaved (row a's code, row b's code, ...) against the pair
// (q[a], q[b]) repeated — no conversion to float per weight (the float gather converts every code: 3x
// the instructions), and any two kept rows of a block pair up, so a step still reads only the kept
// rows' codes. A pair streams along both its rows start to end, adding into 16-bit sums kept in an L1
// array (sums of 8 pairs fit: 8 * 2 * 15 * 127 < 2^15), widened to 32 bits every 8 pairs; the rows
// kAhead pairs on are prefetched a line per two strips. Two sequential streams at a time: visiting a
// 64-column strip of every row of the block before the next strip (the earlier order) kept 16-32
// streams open, more than the hardware prefetcher follows, and ran 1.5-2x slower out of L3
// (research/decode_kernel_bench.cc). Listed rows [g0, g1) (whole blocks) into y[width], width a
// multiple of 32.
AVX2_TARGET inline __m256i Strip(const uint8_t* p, bool half) {  // 64 columns' codes, or 32 and zeros
  return half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

struct alignas(32) Lane {  // a 256-bit register's worth of memory (a vector of __m256i drops the alignment)
  int64_t v[4];
};

AVX2_TARGET void GatherInt4CodesAvx2(const Matrix& w, const int64_t* rows, const int8_t* q, const float* d,
                                     int64_t g0, int64_t g1, int64_t col, int64_t width, float* y) {
  const int64_t C = w.cols;
  const uint8_t* base = w.bytes();
  const __m256i low = _mm256_set1_epi8(15);
  const int64_t strips = (width + 63) / 64;
  constexpr int64_t kAhead = 4;  // pairs: the lines of the rows 4 pairs on are fetched while a pair computes
  thread_local std::vector<Lane> sums16, sums32;  // per strip: 4 vectors of 16-bit sums, 8 of 32-bit
  if (static_cast<int64_t>(sums16.size()) < strips * 4) sums16.resize(strips * 4), sums32.resize(strips * 8);
  __m256i* a16 = reinterpret_cast<__m256i*>(sums16.data());
  __m256i* a32 = reinterpret_cast<__m256i*>(sums32.data());
  for (int64_t i = g0; i < g1;) {
    const int64_t block = rows[i] / kBlock;
    int64_t j = i;
    int sum = 0;
    while (j < g1 && rows[j] / kBlock == block) sum += q[j++];
    const float dx = d[block];
    if (dx == 0.f) {  // every coefficient of the block is 0
      i = j;
      continue;
    }
    for (int64_t t = 0; t < strips * 8; ++t) a32[t] = _mm256_setzero_si256();
    for (int64_t k = i; k < j;) {
      const int64_t stop = j < k + 16 ? j : k + 16;
      for (int64_t t = 0; t < strips * 4; ++t) a16[t] = _mm256_setzero_si256();
      for (; k < stop; k += 2) {
        const bool pair = k + 1 < stop;
        const uint8_t* ra = base + (rows[k] * C + col) / 2;
        const uint8_t* rb = pair ? base + (rows[k + 1] * C + col) / 2 : nullptr;
        const int64_t pk = k + 2 * kAhead < g1 ? k + 2 * kAhead : -1;
        const uint8_t* pa = pk >= 0 ? base + (rows[pk] * C + col) / 2 : nullptr;
        const uint8_t* pb = pk >= 0 && pk + 1 < g1 ? base + (rows[pk + 1] * C + col) / 2 : nullptr;
        const __m256i cf = _mm256_set1_epi16(static_cast<int16_t>(
            static_cast<uint8_t>(q[k]) | (pair ? static_cast<uint16_t>(static_cast<uint8_t>(q[k + 1])) << 8 : 0)));
        for (int64_t s = 0; s < strips; ++s) {
          const bool half = s * 64 + 64 > width;
          if ((s & 1) == 0) {
            if (pa) _mm_prefetch(reinterpret_cast<const char*>(pa + s * 32), _MM_HINT_T0);
            if (pb) _mm_prefetch(reinterpret_cast<const char*>(pb + s * 32), _MM_HINT_T0);
          }
          const __m256i a = Strip(ra + s * 32, half);
          const __m256i b = pair ? Strip(rb + s * 32, half) : _mm256_setzero_si256();
          const __m256i la = _mm256_and_si256(a, low), ha = _mm256_and_si256(_mm256_srli_epi16(a, 4), low);
          const __m256i lb = _mm256_and_si256(b, low), hb = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
          // byte i of a 32-byte load holds columns 2i (low nibble) and 2i + 1; per 128-bit lane,
          // unpacklo takes bytes 0-7 and unpackhi bytes 8-15 of the lane
          __m256i* acc = a16 + s * 4;  // columns 0,2..14 | 32..46; 16..30 | 48..62; 1..15 | 33..47; 17..31 | 49..63
          acc[0] = _mm256_add_epi16(acc[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(la, lb), cf));
          acc[1] = _mm256_add_epi16(acc[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(la, lb), cf));
          acc[2] = _mm256_add_epi16(acc[2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(ha, hb), cf));
          acc[3] = _mm256_add_epi16(acc[3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(ha, hb), cf));
        }
      }
      for (int64_t s = 0; s < strips; ++s) {
        const __m256i* h = a16 + s * 4;
        // even and odd columns interleaved back: p0 = columns 0-7 | 32-39, p1 8-15 | 40-47, ...
        const __m256i p[4] = {_mm256_unpacklo_epi16(h[0], h[2]), _mm256_unpackhi_epi16(h[0], h[2]),
                              _mm256_unpacklo_epi16(h[1], h[3]), _mm256_unpackhi_epi16(h[1], h[3])};
        __m256i* acc = a32 + s * 8;
        for (int t = 0; t < 4; ++t) {
          acc[t] = _mm256_add_epi32(acc[t], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p[t])));
          acc[t + 4] = _mm256_add_epi32(acc[t + 4], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(p[t], 1)));
        }
      }
    }
    const uint16_t* dw = w.scale + block * C + col;
    const uint16_t* mw = w.minimum ? w.minimum + block * C + col : nullptr;
    const __m256 vdx = _mm256_set1_ps(dx), vlift = _mm256_set1_ps(dx * static_cast<float>(sum));
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t c = s * 64;
      const bool half = c + 64 > width;
      for (int t = 0; t < (half ? 4 : 8); ++t) {
        float* out = y + c + 8 * t;
        __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(Halves8(dw + c + 8 * t), vdx), _mm256_cvtepi32_ps(a32[s * 8 + t]),
                                   _mm256_loadu_ps(out));
        if (mw) v = _mm256_fmadd_ps(Halves8(mw + c + 8 * t), vlift, v);
        _mm256_storeu_ps(out, v);
      }
    }
    i = j;
  }
}

AVX2_TARGET
void DotQuantRowsInt8Avx2(const ActivationCodes& x, int64_t S, const Matrix& w, const int64_t* rows, int64_t i0,
                          int64_t i1, float* out) {
  if (S == 1) {
    const int64_t i4 = i0 + (i1 - i0) / 4 * 4;
    DotFourRowsInt8Avx2(x, w, rows, i0, i4, out);
    return DotQuantRowsInt8Avx2S<1>(x, S, w, rows, i4, i1, out);
  }
  DotQuantRowsInt8Avx2S<0>(x, S, w, rows, i0, i1, out);
}

AVX2_TARGET
void DotQuantRowsAvx2(const float* x, const float* xsum, int64_t S, const Matrix& w, const int64_t* rows, int64_t i0,
                      int64_t i1, float* out) {
  if (S == 1) return DotQuantRowsAvx2S<1>(x, xsum, S, w, rows, i0, i1, out);
  DotQuantRowsAvx2S<0>(x, xsum, S, w, rows, i0, i1, out);
}

AVX2_TARGET
void GatherQuantColumnsAvx2(const Matrix& w, const std::vector<int64_t>& rows, const float* coeff, int64_t S,
                            int64_t col, int64_t width, int64_t c0, int64_t c1, float* y) {
  if (S == 1) return GatherQuantColumnsAvx2S<1>(w, rows, coeff, S, col, width, c0, c1, y);
  GatherQuantColumnsAvx2S<0>(w, rows, coeff, S, col, width, c0, c1, y);
}

AVX2_TARGET
void DequantizeRowAvx2(const Matrix& w, int64_t r, int64_t c0, int64_t c1, float* out) {
  const int64_t C = w.cols;
  int64_t c = c0;
  for (; c + kBlock <= c1; c += kBlock) {
    __m256 q[4];
    Codes8(w, r * C + c, q);
    for (int t = 0; t < 4; ++t) {
      __m256 d, m = _mm256_setzero_ps();
      if (w.block_axis == 1) {
        const int64_t b = r * (C / kBlock) + c / kBlock;
        d = _mm256_set1_ps(_cvtsh_ss(w.scale[b]));
        if (w.minimum) m = _mm256_set1_ps(_cvtsh_ss(w.minimum[b]));
      } else {
        const int64_t b = (r / kBlock) * C + c + 8 * t;
        d = Halves8(w.scale + b);
        if (w.minimum) m = Halves8(w.minimum + b);
      }
      _mm256_storeu_ps(out + (c - c0) + 8 * t, _mm256_fmadd_ps(q[t], d, m));
    }
  }
  for (; c < c1; ++c) out[c - c0] = WeightAt(w, r, c);
}

#endif

std::vector<const float*> RowPointers(const float* base, const std::vector<int64_t>& rows, int64_t ld, int64_t col) {
  std::vector<const float*> out;
  out.reserve(rows.size());
  for (int64_t r : rows) out.push_back(base + r * ld + col);
  return out;
}

// A prompt's products through the packed GEMM: out[i * S + s] = x[s] . rows[i] ...
void PromptProjectRows(const float* x, int64_t S, int64_t D, const std::vector<const float*>& rows, float* out,
                       const Parallel& parallel) {
  const int64_t R = static_cast<int64_t>(rows.size());
  std::vector<const float*> tokens(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) tokens[s] = x + s * D;
  std::fill(out, out + R * S, 0.f);
  Gemm(R, S, D, Operand{rows.data(), false}, Operand{tokens.data(), true}, out, S, parallel);
}

// ... and y[s, :] = bias + sum_i coeff[i * S + s] * rows[i][0 : width], computed transposed
// (y^T [width, S] = rows^T coeff): the weights are the product's A, packed a task's slice at a time,
// and the S tokens' coefficients its B panel, small enough to stay in L2. With the weights as B (y =
// coeff^T rows) every depth step packed a [256, width] panel of them (1.5 MB for SmolLM2's gate,
// beyond L2): a 4-bit threshold prefill takes 0.92x the time this way, a dense one 0.97x (in-process
// A/B, alternating runs).
void PromptGatherRows(const std::vector<const float*>& rows, const float* coeff, int64_t S, int64_t width,
                      const float* bias, float* y, const Parallel& parallel) {
  const int64_t R = static_cast<int64_t>(rows.size());
  std::vector<const float*> coeffs(static_cast<size_t>(R));
  for (int64_t i = 0; i < R; ++i) coeffs[i] = coeff + i * S;
  float* yt = Scratch(ScratchSlot::kProduct, static_cast<size_t>(width * S));
  std::fill(yt, yt + width * S, 0.f);
  Gemm(width, S, R, Operand{rows.data(), true}, Operand{coeffs.data(), false}, yt, S, parallel);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < width; ++c) y[s * width + c] = (bias ? bias[c] : 0.f) + yt[c * S + s];
}

}  // namespace

void DequantizeRow(const Matrix& w, int64_t r, int64_t c0, int64_t c1, float* out) {
  const int64_t C = w.cols;
  if (w.format == WeightFormat::kF32) {
    std::memcpy(out, w.f32() + r * C + c0, sizeof(float) * (c1 - c0));
    return;
  }
#ifdef SHADOWLLM_AVX2
  if (CpuHasAvx2()) return DequantizeRowAvx2(w, r, c0, c1, out);
#endif
  int64_t c = c0;
  for (; c + kBlock <= c1; c += kBlock) {
    V16 q0, q1, d0, d1, m0 = V16{}, m1 = V16{};
    Codes(w, r * C + c, q0, q1);
    if (w.block_axis == 1) {
      const int64_t b = r * (C / kBlock) + c / kBlock;
      d0 = d1 = Splat(Half(w.scale[b]));
      if (w.minimum) m0 = m1 = Splat(Half(w.minimum[b]));
    } else {
      const int64_t b = (r / kBlock) * C + c;
      d0 = Halves(w.scale + b), d1 = Halves(w.scale + b + 16);
      if (w.minimum) m0 = Halves(w.minimum + b), m1 = Halves(w.minimum + b + 16);
    }
    Store(out + (c - c0), q0 * d0 + m0);
    Store(out + (c - c0) + 16, q1 * d1 + m1);
  }
  for (; c < c1; ++c) out[c - c0] = WeightAt(w, r, c);  // a column range narrower than a block
}

void ProjectKeptRows(const float* x, int64_t S, const Matrix& w, const std::vector<int64_t>& rows, float* out,
                     const Parallel& parallel, const ActivationCodes* codes) {
  const int64_t D = w.cols, R = static_cast<int64_t>(rows.size());
  const bool prompt = S >= kPrefillTokens && GemmAvailable();
  if (w.format == WeightFormat::kF32) {
    if (prompt) return PromptProjectRows(x, S, D, RowPointers(w.f32(), rows, D, 0), out, parallel);
    ProjectRows(x, S, D, RowPointers(w.f32(), rows, D, 0), out, parallel);
    return;
  }
  if (R == 0) return;
  if (S >= kPrefillTokens) {  // a prompt: the kept rows once in fp32, then the blocked products
    float* dense = Scratch(ScratchSlot::kWeights, static_cast<size_t>(R * D));
    ForChunks(parallel, R, std::max<int64_t>(1, std::min<int64_t>(64, R / 16)), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) DequantizeRow(w, rows[i], 0, D, dense + i * D);
    });
    std::vector<int64_t> all(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) all[i] = i;
    if (prompt) return PromptProjectRows(x, S, D, RowPointers(dense, all, D, 0), out, parallel);
    ProjectRows(x, S, D, RowPointers(dense, all, D, 0), out, parallel);
    return;
  }
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(64, R / 16));
#ifdef SHADOWLLM_AVX2
  if (codes != nullptr && CpuHasAvx2()) {  // x on the int8 grid: integer products
    ForChunks(parallel, R, tasks, 4, [&](int64_t i0, int64_t i1) {
      DotQuantRowsInt8Avx2(*codes, S, w, rows.data(), i0, i1, out);
    });
    return;
  }
#endif
  const int64_t nb = D / kBlock;
  std::vector<float> xsum(static_cast<size_t>(S * nb), 0.f);  // x's block sums, for the minimums
  for (int64_t s = 0; s < S; ++s)
    for (int64_t d = 0; d < D; ++d) xsum[s * nb + d / kBlock] += x[s * D + d];
  ForChunks(parallel, R, tasks, 4, [&](int64_t i0, int64_t i1) {
#ifdef SHADOWLLM_AVX2
    if (CpuHasAvx2()) return DotQuantRowsAvx2(x, xsum.data(), S, w, rows.data(), i0, i1, out);
#endif
    DotQuantRows(x, xsum.data(), S, w, rows.data(), i0, i1, out);
  });
}

bool GatherTakesCodes(const Matrix& w, int64_t S, int64_t width) {
#ifdef SHADOWLLM_AVX2
  return S == 1 && w.format == WeightFormat::kInt4 && width % kBlock == 0 && CpuHasAvx2();
#else
  (void)w, (void)S, (void)width;
  return false;
#endif
}

void GatherKeptRows(const Matrix& w, const std::vector<int64_t>& rows, const float* coeff, int64_t S, int64_t col,
                    int64_t width, const float* bias, float* y, const Parallel& parallel, const RowCodes* codes) {
  GatherKeptRows({GatherJob{&w, col, width, bias, y}}, rows, coeff, S, parallel, codes);
}

namespace {

// One job's gather without the integer kernel: fp32 weights, a prompt, or quantized weights decoded
// to floats in the loop.
void GatherOne(const GatherJob& job, const std::vector<int64_t>& rows, const float* coeff, int64_t S,
               const Parallel& parallel) {
  const Matrix& w = *job.w;
  const int64_t R = static_cast<int64_t>(rows.size()), col = job.col, width = job.width;
  const float* bias = job.bias;
  float* y = job.y;
  const bool prompt = S >= kPrefillTokens && GemmAvailable();
  if (w.format == WeightFormat::kF32) {
    if (prompt) return PromptGatherRows(RowPointers(w.f32(), rows, w.cols, col), coeff, S, width, bias, y, parallel);
    GatherProject(RowPointers(w.f32(), rows, w.cols, col), coeff, S, width, bias, y, parallel);
    return;
  }
  if (S >= kPrefillTokens) {
    float* dense = Scratch(ScratchSlot::kWeights, static_cast<size_t>(R * width));
    ForChunks(parallel, R, std::max<int64_t>(1, std::min<int64_t>(64, R / 16)), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) DequantizeRow(w, rows[i], col, col + width, dense + i * width);
    });
    std::vector<const float*> pointers;
    pointers.reserve(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) pointers.push_back(dense + i * width);
    if (prompt) return PromptGatherRows(pointers, coeff, S, width, bias, y, parallel);
    GatherProject(pointers, coeff, S, width, bias, y, parallel);
    return;
  }
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < width; ++c) y[s * width + c] = bias ? bias[c] : 0.f;
  if (R == 0) return;
  // threads split the columns (in whole blocks): each reads only its columns of the kept rows
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(8, width / 64));
  ForChunks(parallel, width, tasks, kBlock, [&](int64_t c0, int64_t c1) {
#ifdef SHADOWLLM_AVX2
    if (CpuHasAvx2()) return GatherQuantColumnsAvx2(w, rows, coeff, S, col, width, c0, c1, y);
#endif
    GatherQuantColumns(w, rows, coeff, S, col, width, c0, c1, y);
  });
}

// Whether the integer gather runs these jobs: every one of them takes codes.
bool JobsTakeCodes(const std::vector<GatherJob>& jobs, int64_t S) {
  for (const GatherJob& job : jobs)
    if (!GatherTakesCodes(*job.w, S, job.width)) return false;
  return true;
}

}  // namespace

void GatherKeptRows(const std::vector<GatherJob>& jobs, const std::vector<int64_t>& rows, const float* coeff,
                    int64_t S, const Parallel& parallel, const RowCodes* codes) {
  if (!(codes && JobsTakeCodes(jobs, S))) {
    for (const GatherJob& job : jobs) GatherOne(job, rows, coeff, S, parallel);
    return;
  }
  for (const GatherJob& job : jobs)
    for (int64_t c = 0; c < job.width; ++c) job.y[c] = job.bias ? job.bias[c] : 0.f;
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R == 0) return;
#ifdef SHADOWLLM_AVX2
  // One parallel region for every job (q, k and v, or gate and up, share their kept rows), cut into
  // about 8 tasks of rows x columns so two threads balance: row spans end at block boundaries (a
  // task scales its columns once per block) and sum into their own partial outputs, added after;
  // column spans are whole 64-column strips. A region per job, cut in row spans alone, gave a
  // decode step 2 tasks per matrix at sparsity 0.5, and one thread waited on the other's.
  int64_t total = 0;
  for (const GatherJob& job : jobs) total += job.width;
  const int64_t spans = std::max<int64_t>(1, std::min<int64_t>(8, R / 64));
  std::vector<int64_t> cut(static_cast<size_t>(spans + 1), R);
  cut[0] = 0;
  for (int64_t t = 1; t < spans; ++t) {
    int64_t at = std::max(cut[t - 1], R * t / spans);
    while (at > 0 && at < R && rows[at] / kBlock == rows[at - 1] / kBlock) ++at;
    cut[t] = at;
  }
  struct Task { size_t job; int64_t span, c0, c1; };
  std::vector<Task> tasks;
  const int64_t columns_per_task = std::max<int64_t>(64, (total * spans / 8 + 63) / 64 * 64);
  for (size_t j = 0; j < jobs.size(); ++j)
    for (int64_t c0 = 0; c0 < jobs[j].width; c0 += columns_per_task)
      for (int64_t t = 0; t < spans; ++t)
        if (cut[t] < cut[t + 1]) tasks.push_back({j, t, c0, std::min(jobs[j].width, c0 + columns_per_task)});
  std::vector<int64_t> offset(jobs.size() + 1, 0);  // of each job's partial outputs, spans x width
  for (size_t j = 0; j < jobs.size(); ++j) offset[j + 1] = offset[j] + spans * jobs[j].width;
  float* part = Scratch(ScratchSlot::kPartial, static_cast<size_t>(offset.back()));
  parallel.For(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& t = tasks[static_cast<size_t>(i)];
    const GatherJob& job = jobs[t.job];
    float* out = part + offset[t.job] + t.span * job.width + t.c0;
    std::fill(out, out + (t.c1 - t.c0), 0.f);
    GatherInt4CodesAvx2(*job.w, rows.data(), codes->q.data(), codes->d.data(), cut[t.span], cut[t.span + 1],
                        job.col + t.c0, t.c1 - t.c0, out);
  });
  for (size_t j = 0; j < jobs.size(); ++j)
    for (int64_t t = 0; t < spans; ++t) {
      if (cut[t] == cut[t + 1]) continue;
      const float* p = part + offset[j] + t * jobs[j].width;
      for (int64_t c = 0; c < jobs[j].width; ++c) jobs[j].y[c] += p[c];
    }
#endif
}

void ChannelProject(const float* x, int64_t S, int64_t D, const std::vector<int64_t>& channels,
                    const std::vector<GatherJob>& jobs, const Parallel& parallel, const ActivationCodes* codes) {
  thread_local std::vector<float> coeff;  // reused per thread (a call per op and token)
  thread_local RowCodes row_codes;
  coeff.resize(channels.size() * static_cast<size_t>(S));
  for (size_t c = 0; c < channels.size(); ++c)
    for (int64_t s = 0; s < S; ++s) coeff[c * S + s] = x[s * D + channels[c]];
  const bool integer = codes && JobsTakeCodes(jobs, S);
  if (integer) SelectRowCodes(*codes, channels, &row_codes);
  GatherKeptRows(jobs, channels, coeff.data(), S, parallel, integer ? &row_codes : nullptr);
}

}  // namespace shadowllm
