// The two sparse projections every kernel of both ops is built from (decode is memory bound: what
// counts is reading each needed weight byte once, spread over every multiprocessor).
//
//  RowDotKernel   out[m, row] = x[m] . W[row]  for the rows some token of the group needs
//                 (gate/up rows of kept neurons, q/k/v rows of kept heads): one warp per row (or
//                 per pair of rows), 16-byte loads, up to 8 tokens from one read of the row.
//  GatherRowsKernel  acc[m, :] += sum over kept rows r of coef(m, r) * W[r, :]  (the output
//                 projections over kept neurons / heads, and the input projections of the
//                 threshold path over kept channels of a channel-major weight): split-K over the
//                 kept rows across all multiprocessors, each CTA compacting its own slice of rows,
//                 fp32 vector atomics, and the last CTA of a column tile applying the epilogue.
//
// What a row means and what happens to the result is an Op (a small struct of device functions)
// given by each op's kernel.cu.
#pragma once

#include "cuda_common.cuh"

namespace shadowllm {
namespace cuda {

// Is every row of a [*, n] array of T at `p` 16-byte aligned (so VEC = kVec16<T> loads are legal)?
template <typename T>
inline bool Aligned16(const void* p, int64_t n) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (n * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

constexpr int kRowDotThreads = 256;
constexpr int kGatherThreads = 128;
// Loads in flight per thread: deep for one token (decode is latency bound: a warp's row, or a
// thread's column slice, should take one or two memory round trips), shallower where each load
// already feeds many tokens and the registers hold their sums.
template <int MT, int RPW>
constexpr int kRowDotUnroll = MT * RPW == 1 ? 8 : MT * RPW == 2 ? 4 : 2;
template <int MT>
constexpr int kGatherUnroll = MT == 1 ? 16 : MT == 2 ? 8 : 4;

// Op: bool Wanted(row, m0, mt); const T* Row(mat, row); void Emit(row, m0, mt, dots, computed)
// (Emit is called by every lane with the warp-reduced dots; it writes from lane 0).
// Grid: (CTAs, token groups); x rows [M, D] (16-byte aligned rows when VEC > 1). A warp reads RPW
// consecutive rows at once, so each x vector it loads serves RPW rows (and MT tokens each row).
template <typename T, int MT, int NMAT, int VEC, int RPW, class Op>
__global__ void __launch_bounds__(kRowDotThreads) RowDotKernel(Op op, const T* x, const float* t_x, int64_t M,
                                                               int64_t D, int64_t R) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kRowDotThreads / 32);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int mt = static_cast<int>(M - m0 < MT ? M - m0 : MT);
  const bool thresholded = t_x != nullptr;
  const float tx = thresholded ? *t_x : 0.f;
  for (int64_t row0 = (static_cast<int64_t>(blockIdx.x) * (kRowDotThreads / 32) + threadIdx.x / 32) * RPW; row0 < R;
       row0 += warps * RPW) {
    float dots[RPW][NMAT][MT] = {};
    bool want[RPW];
    bool any = false;
    const T* w[RPW][NMAT];
#pragma unroll
    for (int q = 0; q < RPW; ++q) {
      want[q] = row0 + q < R && op.Wanted(row0 + q, m0, mt);
      any |= want[q];
#pragma unroll
      for (int k = 0; k < NMAT; ++k) w[q][k] = want[q] ? op.Row(k, row0 + q) : nullptr;
    }
    if (any) {
#pragma unroll(kRowDotUnroll<MT, RPW>)
      for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += 32 * VEC) {
        float wv[RPW][NMAT][VEC];
#pragma unroll
        for (int q = 0; q < RPW; ++q)
#pragma unroll
          for (int k = 0; k < NMAT; ++k) {
            if (want[q]) {
              LoadStream<VEC>(w[q][k] + i, wv[q][k]);
            } else {
#pragma unroll
              for (int v = 0; v < VEC; ++v) wv[q][k][v] = 0.f;
            }
          }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m >= mt) break;
          float xv[VEC];
          LoadReused<VEC>(x + (m0 + m) * D + i, xv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            if (thresholded && !(fabsf(xv[v]) >= tx)) xv[v] = 0.f;
#pragma unroll
            for (int q = 0; q < RPW; ++q)
#pragma unroll
              for (int k = 0; k < NMAT; ++k) dots[q][k][m] += wv[q][k][v] * xv[v];
          }
        }
      }
#pragma unroll
      for (int q = 0; q < RPW; ++q)
#pragma unroll
        for (int k = 0; k < NMAT; ++k)
#pragma unroll
          for (int m = 0; m < MT; ++m) dots[q][k][m] = WarpSum(dots[q][k][m]);
    }
#pragma unroll
    for (int q = 0; q < RPW; ++q)
      if (row0 + q < R) op.Emit(row0 + q, m0, mt, dots[q], want[q]);
  }
}

// Op: bool Keep(row, m0, mt); float Coef(m, row); const T* Matrix(mat) ([R, C] row-major);
// void Finish(m, col0, vals[NMAT][VEC]) for the VEC columns col0.. of token m (the full sums).
// Grid: (ceil(C / (128 VEC)) column tiles, splits of the R rows, token groups).
// acc: [NMAT, M, C] fp32, zero on entry, left zero; counters: one per (token group, column tile),
// zero on entry, left zero.
template <typename T, int MT, int NMAT, int VEC, class Op>
__global__ void __launch_bounds__(kGatherThreads) GatherRowsKernel(Op op, int64_t M, int64_t R, int64_t C,
                                                                   float* acc_buf, unsigned* counters) {
  __shared__ int32_t rows[kGatherThreads];
  __shared__ float coef[MT][kGatherThreads];
  __shared__ int32_t warp_counts[kGatherThreads / 32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * kGatherThreads + tid) * VEC;
  const bool in_range = col0 < C;
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * MT;
  const int mt = static_cast<int>(M - m0 < MT ? M - m0 : MT);
  const int64_t lo = R * blockIdx.y / gridDim.y, hi = R * (blockIdx.y + 1) / gridDim.y;
  float acc[NMAT][MT][VEC] = {};
  const T* w[NMAT];
#pragma unroll
  for (int k = 0; k < NMAT; ++k) w[k] = op.Matrix(k) + col0;
  for (int64_t base = lo; base < hi; base += kGatherThreads) {
    // Compact this slice's kept rows (and their coefficients) into shared memory, in row order.
    const int64_t r = base + tid;
    const bool keep = r < hi && op.Keep(r, m0, mt);
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, count = 0;
#pragma unroll
    for (int k = 0; k < kGatherThreads / 32; ++k) {
      before += k < warp ? warp_counts[k] : 0;
      count += warp_counts[k];
    }
    if (keep) {
      const int pos = before + __popc(ballot & ((1u << lane) - 1u));
      rows[pos] = static_cast<int32_t>(r);
#pragma unroll
      for (int m = 0; m < MT; ++m) coef[m][pos] = m < mt ? op.Coef(m0 + m, r) : 0.f;
    }
    __syncthreads();
    if (in_range) {
#pragma unroll(kGatherUnroll<MT>)
      for (int k = 0; k < count; ++k) {
        const int64_t offset = static_cast<int64_t>(rows[k]) * C;
        float wv[NMAT][VEC];
#pragma unroll
        for (int j = 0; j < NMAT; ++j) LoadStream<VEC>(w[j] + offset, wv[j]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float c = coef[m][k];
#pragma unroll
          for (int j = 0; j < NMAT; ++j)
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[j][m][v] += c * wv[j][v];
        }
      }
    }
    __syncthreads();  // rows / coef are rewritten by the next slice
  }
  if (in_range) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < mt)
#pragma unroll
        for (int j = 0; j < NMAT; ++j) AtomicAddVec(acc_buf + (j * M + m0 + m) * C + col0, acc[j][m]);
  }
  if (!LastToArrive(counters + static_cast<int64_t>(blockIdx.z) * gridDim.x + blockIdx.x, gridDim.y)) return;
  if (!in_range) return;
  for (int m = 0; m < mt; ++m) {
    float vals[NMAT][VEC];
#pragma unroll
    for (int j = 0; j < NMAT; ++j) {
      float* p = acc_buf + (j * M + m0 + m) * C + col0;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        vals[j][v] = __ldcg(p + v);
        __stcg(p + v, 0.f);
      }
    }
    op.Finish(m0 + m, col0, vals);
  }
}

// The output projection both ops end with: y[m] = sum over rows r kept for some token of the group
// of coef[m, r] * w_t[r] + bias, coef = the neurons' h or the heads' context (|coef| >= t, if given).
template <typename T>
struct OutputProjectionOp {
  const float* coeff;  // [M, R]
  const float* threshold;
  const T *w_t, *bias;
  T* y;  // [M, C]
  int64_t R, C;
  __device__ float Coef(int64_t m, int64_t r) const {
    const float c = coeff[m * R + r];
    return KeepLarge(c, threshold) ? c : 0.f;
  }
  __device__ bool Keep(int64_t r, int64_t m0, int mt) const {
    for (int m = 0; m < mt; ++m)
      if (Coef(m0 + m, r) != 0.f) return true;
    return false;
  }
  __device__ const T* Matrix(int) const { return w_t; }
  template <int NMAT, int VEC>
  __device__ void Finish(int64_t m, int64_t col0, const float (&vals)[NMAT][VEC]) const {
#pragma unroll
    for (int v = 0; v < VEC; ++v) y[m * C + col0 + v] = FromFloat<T>(vals[0][v] + (bias ? ToFloat(bias[col0 + v]) : 0.f));
  }
};

// Launch shapes, shared by the launchers and the workspace sizing.
struct GatherShape {
  dim3 grid;
  int64_t tiles;  // column tiles x token groups: the counters needed
};

// CTAs of `kernel` (with `threads` threads) one multiprocessor holds at once, cached per kernel.
int ResidentBlocks(const void* kernel, int threads);

// One wave: at most as many CTAs as the multiprocessors hold at once (a second, partial wave
// would run at a fraction of the bandwidth), capped by the knob.
inline GatherShape GatherGrid(const void* kernel, int64_t M, int64_t R, int64_t C, int vec, int mt) {
  const int64_t tiles = (C + kGatherThreads * vec - 1) / (kGatherThreads * vec), groups = (M + mt - 1) / mt;
  int64_t per_sm = ResidentBlocks(kernel, kGatherThreads);
  per_sm = GlobalTuning().gather_ctas_per_sm < per_sm ? GlobalTuning().gather_ctas_per_sm : per_sm;
  const int64_t target = per_sm * Multiprocessors();
  int64_t splits = target / (tiles * groups);
  const int64_t most = (R + 31) / 32;  // a split gets at least ~32 candidate rows
  splits = splits < 1 ? 1 : splits > most ? most : splits;
  return {dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits), static_cast<unsigned>(groups)),
          tiles * groups};
}

// y = OutputProjectionOp over the kept rows, vector loads where the rows allow them.
template <typename T, int MT>
void LaunchOutputProjection(const OutputProjectionOp<T>& op, int64_t M, float* acc, unsigned* counters,
                            cudaStream_t stream) {
  WithVector<T>(Aligned16<T>(op.w_t, op.C), [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    auto kernel = GatherRowsKernel<T, MT, 1, VEC, OutputProjectionOp<T>>;
    const GatherShape shape = GatherGrid(reinterpret_cast<const void*>(kernel), M, op.R, op.C, VEC, MT);
    kernel<<<shape.grid, kGatherThreads, 0, stream>>>(op, M, op.R, op.C, acc, counters);
  });
}

// Enough warps to cover the multiprocessors, each with the same whole number of row groups (a warp
// with one group more than the others would set the kernel's time).
inline dim3 RowDotGrid(const void* kernel, int64_t M, int64_t R, int mt, int rpw) {
  const int64_t per_cta = kRowDotThreads / 32, groups = (R + rpw - 1) / rpw;
  int64_t per_sm = static_cast<int64_t>(ResidentBlocks(kernel, kRowDotThreads)) * per_cta;
  per_sm = GlobalTuning().rowdot_warps_per_sm < per_sm ? GlobalTuning().rowdot_warps_per_sm : per_sm;
  const int64_t warps = per_sm < 1 ? 1 : per_sm * Multiprocessors();
  const int64_t per_warp = (groups + warps - 1) / warps;
  const int64_t ctas = (groups + per_cta * per_warp - 1) / (per_cta * per_warp);
  return dim3(static_cast<unsigned>(ctas < 1 ? 1 : ctas), static_cast<unsigned>((M + mt - 1) / mt));
}

// RowDotKernel, one row per warp at a time: on an H200 two or four rows per warp (RPW, each x load
// serving more rows) measured slower at batch 1 and 8 alike (register pressure), so RPW stays 1.
template <typename T, int MT, int NMAT, int VEC, class Op>
void LaunchRowDot(const Op& op, const T* x, const float* t_x, int64_t M, int64_t D, int64_t R, cudaStream_t stream) {
  auto kernel = RowDotKernel<T, MT, NMAT, VEC, 1, Op>;
  const dim3 grid = RowDotGrid(reinterpret_cast<const void*>(kernel), M, R, MT, 1);
  kernel<<<grid, kRowDotThreads, 0, stream>>>(op, x, t_x, M, D, R);
}

// Counters the gather kernels may need for M tokens and C columns (the smallest vector, 1).
inline int64_t GatherCounters(int64_t M, int64_t C) { return (C + kGatherThreads - 1) / kGatherThreads * M; }

}  // namespace cuda
}  // namespace shadowllm
