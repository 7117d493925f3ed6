#include "gemm.h"

#include "scratch.h"

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SHADOWLLM_GEMM 1
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#endif

namespace shadowllm {
namespace {

constexpr int64_t kMR = 6, kNR = 16;  // the register tile: 6 rows x 16 columns = 12 accumulators
constexpr int64_t kKC = 256;          // depth of a packed panel (A block + B panel stay in L1 / L2)
constexpr int64_t kMC = 96;           // rows of A packed per task
constexpr int64_t kNC = 256;          // columns per task


// Lines [s0, s0 + n) of an operand (rows of A, columns of B) over depth [k0, k0 + kc), into strips of
// W lines: dst[strip][k][W], zero lines past n. per_line: the operand's pointers each lead one line
// (else each leads one depth step, the lines running along it).
void Pack(const Operand& X, bool per_line, int64_t s0, int64_t n, int64_t k0, int64_t kc, int64_t W, float* dst) {
  for (int64_t t = 0; t < n; t += W) {
    float* out = dst + t * kc;
    const int64_t lines = std::min(W, n - t);
    if (per_line) {
      for (int64_t r = 0; r < W; ++r) {
        if (r >= lines) {
          for (int64_t k = 0; k < kc; ++k) out[k * W + r] = 0.f;
          continue;
        }
        const float* src = X.ptr[s0 + t + r] + k0;
        for (int64_t k = 0; k < kc; ++k) out[k * W + r] = src[k];
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = X.ptr[k0 + k] + s0 + t;
        for (int64_t r = 0; r < W; ++r) out[k * W + r] = r < lines ? src[r] : 0.f;
      }
    }
  }
}

// A[i0 : i0 + m, k0 : k0 + kc] into tiles of kMR rows: Ap[tile][k][kMR].
void PackA(const Operand& A, int64_t i0, int64_t m, int64_t k0, int64_t kc, float* Ap) {
  Pack(A, !A.by_column, i0, m, k0, kc, kMR, Ap);
}

// B[k0 : k0 + kc, j0 : j0 + n] into panels of kNR columns: Bp[panel][k][kNR].
void PackB(const Operand& B, int64_t k0, int64_t kc, int64_t j0, int64_t n, float* Bp) {
  Pack(B, B.by_column, j0, n, k0, kc, kNR, Bp);
}

#ifdef SHADOWLLM_GEMM
AVX2_TARGET
void Tile(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, int64_t m, int64_t n) {
  static_assert(kMR == 6 && kNR == 16, "the tile below is written out for 6 x 16");
  // Twelve named accumulators, not an array: GCC keeps an array that is read after the loop in
  // memory and stores all twelve to the stack every step (4x slower, measured).
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp + k * kNR), b1 = _mm256_loadu_ps(Bp + k * kNR + 8);
    const float* a = Ap + k * kMR;
    __m256 ai = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(ai, b0, c00), c01 = _mm256_fmadd_ps(ai, b1, c01);
    ai = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ai, b0, c10), c11 = _mm256_fmadd_ps(ai, b1, c11);
    ai = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ai, b0, c20), c21 = _mm256_fmadd_ps(ai, b1, c21);
    ai = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ai, b0, c30), c31 = _mm256_fmadd_ps(ai, b1, c31);
    ai = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ai, b0, c40), c41 = _mm256_fmadd_ps(ai, b1, c41);
    ai = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ai, b0, c50), c51 = _mm256_fmadd_ps(ai, b1, c51);
  }
  const __m256 c[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (m == kMR && n == kNR) {
    for (int i = 0; i < kMR; ++i) {
      float* row = C + i * ldc;
      _mm256_storeu_ps(row, _mm256_add_ps(_mm256_loadu_ps(row), c[i][0]));
      _mm256_storeu_ps(row + 8, _mm256_add_ps(_mm256_loadu_ps(row + 8), c[i][1]));
    }
    return;
  }
  alignas(32) float tmp[kMR][kNR];
  for (int i = 0; i < kMR; ++i) {
    _mm256_store_ps(tmp[i], c[i][0]);
    _mm256_store_ps(tmp[i] + 8, c[i][1]);
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) C[i * ldc + j] += tmp[i][j];
}
#endif

}  // namespace

bool GemmAvailable() {
#ifdef SHADOWLLM_GEMM
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

void Gemm(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C, int64_t ldc,
          const Parallel& parallel) {
#ifdef SHADOWLLM_GEMM
  if (M <= 0 || N <= 0 || K <= 0) return;
  const int64_t n_padded = (N + kNR - 1) / kNR * kNR;
  float* Bp = Scratch(ScratchSlot::kPanel, static_cast<size_t>(kKC * n_padded));
  const int64_t m_tasks = (M + kMC - 1) / kMC, n_tasks = (N + kNC - 1) / kNC;
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    // B's panel for this depth, packed once and shared by every task (split over its columns)
    const int64_t panels = n_padded / kNR;
    parallel.For(std::min<int64_t>(panels, 8), [&](int64_t t) {
      const int64_t per = (panels + 7) / 8 * kNR, p0 = t * per, p1 = std::min(N, p0 + per);
      if (p0 < p1) PackB(B, k0, kc, p0, p1 - p0, Bp + p0 * kc);
    });
    parallel.For(m_tasks * n_tasks, [&](int64_t task) {
      const int64_t i0 = (task / n_tasks) * kMC, m = std::min(kMC, M - i0);
      const int64_t j0 = (task % n_tasks) * kNC, n = std::min(kNC, N - j0);
      thread_local std::vector<float> Ap;
      Ap.resize(static_cast<size_t>((kMC + kMR) * kKC));
      PackA(A, i0, m, k0, kc, Ap.data());
      for (int64_t j = 0; j < n; j += kNR)
        for (int64_t i = 0; i < m; i += kMR)
          Tile(kc, Ap.data() + i * kc, Bp + (j0 + j) * kc, C + (i0 + i) * ldc + j0 + j, ldc,
               std::min(kMR, m - i), std::min(kNR, n - j));
    });
  }
#else
  auto at = [](const Operand& o, int64_t i, int64_t j) { return o.by_column ? o.ptr[j][i] : o.ptr[i][j]; };
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += at(A, i, k) * at(B, k, j);
      C[i * ldc + j] += s;
    }
  (void)parallel;
#endif
}

}  // namespace shadowllm
