#include "kernel.h"

#include "../common/cuda_common.cuh"
#include "../common/sparse_projections.cuh"

namespace shadowllm {
namespace cuda {
namespace {

constexpr int kAttendThreads = 128;
constexpr int kAttendWarps = kAttendThreads / 32;
constexpr int kLaneElems = 8;                    // head-dim entries each lane holds
constexpr int kMaxHeadDim = 32 * kLaneElems;     // 256
constexpr int kMaxHeadsPerGroup = 8;
constexpr int64_t kMaxAttendCTAs = 4096;         // bounds the split partials in the workspace
constexpr int kMaxSplits = 64;                   // key splits per (token, kv head)
constexpr int kSliceHeads = 4;                   // heads whose slice sums share memory at once

struct Scratch {
  float* out_acc;            // [M, D]   } zero between launches
  unsigned* out_counters;    //          }
  unsigned* attend_counters; // [M, G]   }
  size_t zero_bytes;
  float* q;        // [M, H*E], RoPE applied
  float* context;  // [M, H*E], zero for heads a token does not keep
  float *part_max, *part_sum, *part_acc;  // per (token, group, split, head): softmax state
  static int64_t Partials(int64_t M, int64_t H, int64_t G) { return (kMaxAttendCTAs + M * G) * (H / G); }
  static Scratch Carve(void* base, int64_t M, int64_t D, int64_t H, int64_t G, int64_t E, size_t* bytes) {
    Carver c(base);
    Scratch s{};
    s.out_acc = c.Take<float>(M * D);
    s.out_counters = c.Take<unsigned>(GatherCounters(M, D));
    s.attend_counters = c.Take<unsigned>(M * G);
    s.zero_bytes = c.Bytes();
    s.q = c.Take<float>(M * H * E);
    s.context = c.Take<float>(M * H * E);
    s.part_max = c.Take<float>(Partials(M, H, G));
    s.part_sum = c.Take<float>(Partials(M, H, G));
    s.part_acc = c.Take<float>(Partials(M, H, G) * E);
    if (bytes) *bytes = c.Bytes();
    return s;
  }
};

// The shapes of one launch, as the device code reads them.
template <typename T>
struct Dims {
  MaskView head_mask;
  int64_t S, P, H, G, E, capacity;
  bool kv_active;
  const int64_t* past_length;  // device scalar, or null: P
  int64_t mask_stride;
  __device__ int64_t Past() const { return past_length ? *past_length : P; }
  __device__ int64_t PerGroup() const { return H / G; }
  __device__ bool HeadOn(int64_t b, int64_t h) const { return head_mask[b * H + h]; }
  __device__ bool GroupOn(int64_t b, int64_t g) const {
    if (!kv_active) return true;
    for (int64_t h = g * PerGroup(); h < (g + 1) * PerGroup(); ++h)
      if (HeadOn(b, h)) return true;
    return false;
  }
  // Start of cache row (b, g, position).
  __device__ int64_t CacheRow(int64_t b, int64_t g, int64_t position) const {
    return ((b * G + g) * capacity + position) * E;
  }
};

// Row-dot units: one RoPE pair of rows (i, i + E/2) of one head; q units of the H heads first, then
// k and v units of the G kv heads. Matrix 0 is row i, matrix 1 row i + E/2.
template <typename T>
struct ProjectOp {
  Dims<T> dims;
  const T *w_q, *b_q, *w_k, *b_k, *w_v, *b_v, *cos, *sin;
  const int64_t* position_ids;
  int64_t rope_positions, D;
  float* q;
  T *present_key, *present_value;
  struct Unit {
    int kind;  // 0 q, 1 k, 2 v
    int64_t head, i;
  };
  __device__ Unit Decode(int64_t u) const {
    const int64_t half = dims.E / 2, q_units = dims.H * half, kv_units = dims.G * half;
    if (u < q_units) return {0, u / half, u % half};
    u -= q_units;
    if (u < kv_units) return {1, u / half, u % half};
    u -= kv_units;
    return {2, u / half, u % half};
  }
  __device__ bool On(const Unit& unit, int64_t m) const {
    const int64_t b = m / dims.S;
    return unit.kind == 0 ? dims.HeadOn(b, unit.head) : dims.GroupOn(b, unit.head);
  }
  __device__ bool Wanted(int64_t u, int64_t m0, int mt) const {
    const Unit unit = Decode(u);
    for (int m = 0; m < mt; ++m)
      if (On(unit, m0 + m)) return true;
    return false;
  }
  __device__ const T* Row(int k, int64_t u) const {
    const Unit unit = Decode(u);
    const T* w = unit.kind == 0 ? w_q : unit.kind == 1 ? w_k : w_v;
    return w + (unit.head * dims.E + unit.i + k * (dims.E / 2)) * D;
  }
  template <int NMAT, int MT>
  __device__ void Emit(int64_t u, int64_t m0, int mt, const float (&dots)[NMAT][MT], bool) const {
    if (threadIdx.x % 32 != 0) return;
    const Unit unit = Decode(u);
    const int64_t half = dims.E / 2, r1 = unit.head * dims.E + unit.i, r2 = r1 + half;
    const T* bias = unit.kind == 0 ? b_q : unit.kind == 1 ? b_k : b_v;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= mt) break;
      const int64_t token = m0 + m, b = token / dims.S, s = token % dims.S;
      const bool on = On(unit, token);
      if (unit.kind == 0 && !on) continue;  // q of a dropped head is never read
      float v1 = on ? dots[0][m] + (bias ? ToFloat(bias[r1]) : 0.f) : 0.f;
      float v2 = on ? dots[NMAT - 1][m] + (bias ? ToFloat(bias[r2]) : 0.f) : 0.f;
      if (on && cos != nullptr && unit.kind != 2) {
        int64_t pos = position_ids[token];
        pos = pos < 0 ? 0 : pos >= rope_positions ? rope_positions - 1 : pos;
        const float c = ToFloat(cos[pos * half + unit.i]), sn = ToFloat(sin[pos * half + unit.i]);
        const float t1 = v1, t2 = v2;
        v1 = t1 * c - t2 * sn;
        v2 = t2 * c + t1 * sn;
      }
      if (unit.kind == 0) {
        float* dst = q + token * dims.H * dims.E;
        dst[r1] = v1;
        dst[r2] = v2;
      } else {
        T* dst = (unit.kind == 1 ? present_key : present_value) + dims.CacheRow(b, unit.head, dims.Past() + s) + unit.i;
        dst[0] = FromFloat<T>(v1);
        dst[half] = FromFloat<T>(v2);
      }
    }
  }
};

// q/k norms and partial rotary (qwen3, gemma3_text, phi3): the projection wrote q and k unrotated;
// a warp per (token, q head or k head) of the heads this token computes: RMSNorm over the head's E
// entries (fp32 sum, as transformers), then rotate-half RoPE on its first 2 * half entries.
template <typename T>
struct NormRopeArgs {
  Dims<T> dims;
  float* q;
  T* present_key;
  const T *q_norm, *k_norm, *cos, *sin;
  const int64_t* position_ids;
  int64_t rope_positions, half, M;
  float eps;
};

template <typename T>
__global__ void NormRopeKernel(NormRopeArgs<T> a) {
  const Dims<T>& d = a.dims;
  const int64_t units = d.H + d.G;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= a.M * units) return;
  const int64_t m = w / units, u = w % units, b = m / d.S, s = m % d.S;
  const bool is_q = u < d.H;
  const int64_t head = is_q ? u : u - d.H;
  if (is_q ? !d.HeadOn(b, head) : !d.GroupOn(b, head)) return;
  float* q_row = a.q + (m * d.H + head) * d.E;
  T* k_row = a.present_key + d.CacheRow(b, head, d.Past() + s);
  auto load = [&](int64_t e) { return is_q ? q_row[e] : ToFloat(k_row[e]); };
  auto store = [&](int64_t e, float v) {
    if (is_q) q_row[e] = v;
    else k_row[e] = FromFloat<T>(v);
  };
  const T* weight = is_q ? a.q_norm : a.k_norm;
  if (weight != nullptr) {
    float squares = 0.f;
    for (int64_t e = lane; e < d.E; e += 32) squares += load(e) * load(e);
    const float inv = rsqrtf(WarpSum(squares) / static_cast<float>(d.E) + a.eps);
    for (int64_t e = lane; e < d.E; e += 32) store(e, ToFloat(weight[e]) * (load(e) * inv));
    __syncwarp();  // the rotation below pairs entries other lanes wrote
  }
  if (a.cos == nullptr) return;
  int64_t pos = a.position_ids[m];
  pos = pos < 0 ? 0 : pos >= a.rope_positions ? a.rope_positions - 1 : pos;
  for (int64_t i = lane; i < a.half; i += 32) {
    const float c = ToFloat(a.cos[pos * a.half + i]), sn = ToFloat(a.sin[pos * a.half + i]);
    const float t1 = load(i), t2 = load(i + a.half);
    store(i, t1 * c - t2 * sn);
    store(i + a.half, t2 * c + t1 * sn);
  }
}

template <typename T>
__global__ void CopyPastKernel(const T* past, T* present, int64_t BG, int64_t P, int64_t capacity, int64_t E) {
  const int64_t total = BG * P * E;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bg = i / (P * E), rest = i % (P * E);
    present[bg * capacity * E + rest] = past[i];
  }
}

__device__ __forceinline__ float Rescale(float m, float to) { return m == -INFINITY ? 0.f : expf(m - to); }

template <typename T>
struct AttendArgs {
  Dims<T> dims;
  const T *keys, *values;
  const int64_t* attention_mask;
  const float* q;
  float scale;
  Scratch sc;
  int64_t splits;
  int lanes_per_key;
  int64_t window;  // 0: every key
};

// Flash-decoding: grid (M * G * splits), one CTA per (token, kv head, key split), 128 threads. The
// split's keys go in chunks of 128: (1) a thread per key scores it against every kept head of the
// group (q in shared memory, the K row read once for all of them); (2) a warp per head folds the
// chunk into that head's running maximum and sum; (3) lanes_per_key lanes per V row (16-byte loads,
// rows spread over the CTA's key slices) add p * V into per-thread sums. The slices, then the
// splits, are merged (the last split's CTA merges those). Hidden keys score the float minimum, so a
// token that sees nothing attends uniformly, as the reference does.
template <typename T, int VEC, int HPG>
__global__ void __launch_bounds__(kAttendThreads) AttendKernel(AttendArgs<T> a) {
  constexpr int kChunk = kAttendThreads;
  __shared__ float q_s[HPG][kMaxHeadDim];
  __shared__ float p_s[HPG][kChunk];
  __shared__ float run_max[HPG], run_sum[HPG], corr_s[HPG];
  // slices x E <= 1024 for every (lanes per key, VEC) the launcher picks: [slice, head, entry] flat
  __shared__ float slice_acc[kSliceHeads * 1024];
  const Dims<T>& d = a.dims;
  const int64_t split = blockIdx.x % a.splits, mg = blockIdx.x / a.splits, g = mg % d.G, m = mg / d.G;
  const int64_t b = m / d.S, s = m % d.S, hpg = d.PerGroup(), HE = d.H * d.E, P = d.Past(), T_ = P + d.S;
  float* ctx = a.sc.context + m * HE + g * hpg * d.E;
  unsigned kept = 0;  // bit hh: head g * hpg + hh is kept for this token's row
#pragma unroll
  for (int hh = 0; hh < HPG; ++hh)
    if (hh < hpg && d.HeadOn(b, g * hpg + hh)) kept |= 1u << hh;
  if (kept == 0) {
    if (split == 0)
      for (int64_t i = threadIdx.x; i < hpg * d.E; i += kAttendThreads) ctx[i] = 0.f;
    return;
  }
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int64_t t = tid; t < HPG * d.E; t += kAttendThreads) {
    const int64_t hh = t / d.E, e = t % d.E;
    q_s[hh][e] = (kept >> hh) & 1u ? a.q[m * HE + (g * hpg + hh) * d.E + e] * a.scale : 0.f;
  }
  if (tid < HPG) run_max[tid] = -INFINITY, run_sum[tid] = 0.f;
  const int lpk = a.lanes_per_key, slices = kAttendThreads / lpk, slice = tid / lpk, lk = tid % lpk;
  constexpr int NI = kLaneElems / VEC;
  auto entry = [&](int i, int v) { return (static_cast<int64_t>(i) * lpk + lk) * VEC + v; };
  float acc[HPG][kLaneElems];
#pragma unroll
  for (int hh = 0; hh < HPG; ++hh)
#pragma unroll
    for (int k = 0; k < kLaneElems; ++k) acc[hh][k] = 0.f;
  const int64_t per = (T_ + a.splits - 1) / a.splits, j0 = split * per, j1 = j0 + per < T_ ? j0 + per : T_;
  const T* keys = a.keys + d.CacheRow(b, g, 0);
  const T* values = a.values + d.CacheRow(b, g, 0);
  const int64_t* visible_mask = a.attention_mask + b * (d.mask_stride ? d.mask_stride : T_);
  __syncthreads();
  for (int64_t base = j0; base < j1; base += kChunk) {
    // (1) scores: thread tid owns key base + tid
    {
      const int64_t j = base + tid;
      float dot[HPG] = {};
      if (j < j1) {
        const T* row = keys + j * d.E;
        if constexpr (VEC > 1) {
#pragma unroll 4
          for (int64_t e0 = 0; e0 < d.E; e0 += VEC) {
            float kv[VEC];
            LoadStream<VEC>(row + e0, kv);
#pragma unroll
            for (int hh = 0; hh < HPG; ++hh)
#pragma unroll
              for (int v = 0; v < VEC; ++v) dot[hh] += q_s[hh][e0 + v] * kv[v];
          }
        } else {
#pragma unroll 4
          for (int64_t e = 0; e < d.E; ++e) {
            const float kv = ToFloat(row[e]);
#pragma unroll
            for (int hh = 0; hh < HPG; ++hh) dot[hh] += q_s[hh][e] * kv;
          }
        }
      }
      const bool visible = j < j1 && j <= P + s && visible_mask[j] != 0 && (a.window == 0 || P + s - j < a.window);
#pragma unroll
      for (int hh = 0; hh < HPG; ++hh) p_s[hh][tid] = j >= j1 ? -INFINITY : visible ? dot[hh] : -FLT_MAX;
    }
    __syncthreads();
    // (2) a warp per head: fold the chunk into the running maximum and sum; p_s becomes p
    for (int hh = warp; hh < HPG; hh += kAttendWarps) {
      if (!((kept >> hh) & 1u)) continue;
      float top = -INFINITY;
      for (int k = lane; k < kChunk; k += 32) top = fmaxf(top, p_s[hh][k]);
      top = fmaxf(WarpMax(top), run_max[hh]);
      float total = 0.f;
      for (int k = lane; k < kChunk; k += 32) {
        const float p = p_s[hh][k] == -INFINITY ? 0.f : expf(p_s[hh][k] - top);
        p_s[hh][k] = p;
        total += p;
      }
      total = WarpSum(total);
      if (lane == 0) {
        const float c = Rescale(run_max[hh], top);
        corr_s[hh] = c;
        run_sum[hh] = run_sum[hh] * c + total;
        run_max[hh] = top;
      }
    }
    __syncthreads();
    // (3) p * V: this thread's slice of the chunk's keys, its entries of each V row
#pragma unroll
    for (int hh = 0; hh < HPG; ++hh) {
      const float c = (kept >> hh) & 1u ? corr_s[hh] : 0.f;
#pragma unroll
      for (int k = 0; k < kLaneElems; ++k) acc[hh][k] *= c;
    }
    const int64_t count = j1 - base < kChunk ? j1 - base : kChunk;
#pragma unroll 4
    for (int64_t k = slice; k < count; k += slices) {
      float vr[kLaneElems];
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int64_t e0 = entry(i, 0);
        float vv[VEC];
        if (e0 < d.E) {
          LoadStream<VEC>(values + (base + k) * d.E + e0, vv);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) vv[v] = 0.f;
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) vr[i * VEC + v] = vv[v];
      }
#pragma unroll
      for (int hh = 0; hh < HPG; ++hh) {
        const float p = p_s[hh][k];
#pragma unroll
        for (int e = 0; e < kLaneElems; ++e) acc[hh][e] += p * vr[e];
      }
    }
    __syncthreads();  // p_s is rewritten by the next chunk
  }
  // Merge the key slices (each holds the same entries for different keys) into this split's partial.
  const int64_t first = ((m * d.G + g) * a.splits) * hpg;  // this (token, group)'s partials
  float* part_acc = a.sc.part_acc;
#pragma unroll
  for (int hh0 = 0; hh0 < HPG; hh0 += kSliceHeads) {
#pragma unroll
    for (int h = 0; h < kSliceHeads; ++h) {
      const int hh = hh0 + h;
      if (hh >= HPG) break;
#pragma unroll
      for (int i = 0; i < NI; ++i)
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          if (entry(i, v) < d.E) slice_acc[(slice * kSliceHeads + h) * d.E + entry(i, v)] = acc[hh][i * VEC + v];
    }
    __syncthreads();
    for (int64_t t = tid; t < kSliceHeads * d.E; t += kAttendThreads) {
      const int h = static_cast<int>(t / d.E), hh = hh0 + h;
      const int64_t e = t % d.E;
      if (hh >= hpg) continue;
      if (!((kept >> hh) & 1u)) {
        if (a.splits == 1) ctx[hh * d.E + e] = 0.f;
        continue;
      }
      float value = 0.f;
      for (int sl = 0; sl < slices; ++sl) value += slice_acc[(sl * kSliceHeads + h) * d.E + e];
      if (a.splits == 1) {  // one split: this CTA has the whole softmax, no partials to merge
        ctx[hh * d.E + e] = value / run_sum[hh];
        continue;
      }
      const int64_t p = first + split * hpg + hh;
      if (e == 0) a.sc.part_max[p] = run_max[hh], a.sc.part_sum[p] = run_sum[hh];
      part_acc[p * d.E + e] = value;
    }
    __syncthreads();
  }
  if (a.splits == 1) return;
  if (!LastToArrive(a.sc.attend_counters + m * d.G + g, static_cast<unsigned>(a.splits))) return;
  // The last split's CTA merges all splits: per head (a warp each) the softmax maximum and each
  // split's weight, then every context entry as one weighted sum whose loads are all independent.
  __shared__ float split_weight[HPG][kMaxSplits];
  for (int64_t hh = warp; hh < hpg; hh += kAttendWarps) {
    if (!d.HeadOn(b, g * hpg + hh)) continue;
    float top = -INFINITY;
    for (int64_t sp = lane; sp < a.splits; sp += 32) top = fmaxf(top, __ldcg(a.sc.part_max + first + sp * hpg + hh));
    top = WarpMax(top);
    float total = 0.f;
    for (int64_t sp = lane; sp < a.splits; sp += 32) {
      const int64_t p = first + sp * hpg + hh;
      const float c = Rescale(__ldcg(a.sc.part_max + p), top);
      split_weight[hh][sp] = c;
      total += __ldcg(a.sc.part_sum + p) * c;
    }
    total = WarpSum(total);
    for (int64_t sp = lane; sp < a.splits; sp += 32) split_weight[hh][sp] /= total;
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < hpg * d.E; t += kAttendThreads) {
    const int64_t hh = t / d.E, e = t % d.E;
    float value = 0.f;
    if (d.HeadOn(b, g * hpg + hh)) {
      const float* part = a.sc.part_acc + (first + hh) * d.E + e;
#pragma unroll 16
      for (int64_t sp = 0; sp < a.splits; ++sp) value += __ldcg(part + sp * hpg * d.E) * split_weight[hh][sp];
    }
    ctx[t] = value;
  }
}

// Lanes per key and vector width of the attend kernel: a key row's E entries over E / 8 lanes with
// 16-byte loads where E allows it, else over 32 lanes one entry at a time.
template <typename T>
bool AttendVector(const AttentionLaunch& a) {
  const int64_t lanes = a.E / kLaneElems;
  return a.E % kLaneElems == 0 && lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0 &&
         kLaneElems % kVec16<T> == 0 && Aligned16<T>(a.present_key, a.E) && Aligned16<T>(a.present_value, a.E);
}

int64_t AttendSplits(int64_t M, int64_t G, int64_t T_, int keys_per_step) {
  const int64_t units = M * G;
  const int64_t target = static_cast<int64_t>(GlobalTuning().attend_ctas_per_sm) * Multiprocessors();
  int64_t splits = (target + units - 1) / units;
  const int64_t min_keys = GlobalTuning().attend_min_keys > keys_per_step ? GlobalTuning().attend_min_keys : keys_per_step;
  const int64_t most_keys = (T_ + min_keys - 1) / min_keys;
  const int64_t most_space = kMaxAttendCTAs / units;
  splits = splits > kMaxSplits ? kMaxSplits : splits;
  splits = splits > most_keys ? most_keys : splits;
  splits = splits > most_space ? most_space : splits;
  return splits < 1 ? 1 : splits;
}

template <typename T>
cudaError_t Launch(const AttentionLaunch& a, void* workspace, cudaStream_t stream) {
  const int64_t M = a.B * a.S, T_ = a.past_length ? a.capacity : a.P + a.S;  // keys at most
  const Scratch sc = Scratch::Carve(workspace, M, a.D, a.H, a.G, a.E, nullptr);
  if (!a.workspace_clean) {
    const cudaError_t err = cudaMemsetAsync(workspace, 0, sc.zero_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  T* present_key = static_cast<T*>(a.present_key);
  T* present_value = static_cast<T*>(a.present_value);
  // Not in place: present = past_key's rows (the past and any tail beyond P + S), then the new rows
  // P..P+S-1 written over them by the projection below (same stream, so after the copy).
  const int64_t past_rows = a.past_rows ? a.past_rows : a.P;
  if (a.past_length == nullptr && past_rows > 0 && a.past_key != a.present_key) {
    const int64_t n = a.B * a.G * past_rows * a.E;
    const unsigned blocks = Blocks(n, 256) < 4096 ? Blocks(n, 256) : 4096;
    CopyPastKernel<T><<<blocks, 256, 0, stream>>>(static_cast<const T*>(a.past_key), present_key, a.B * a.G,
                                                  past_rows, a.capacity, a.E);
    CopyPastKernel<T><<<blocks, 256, 0, stream>>>(static_cast<const T*>(a.past_value), present_value, a.B * a.G,
                                                  past_rows, a.capacity, a.E);
  }
  const Dims<T> dims{MaskView{a.head_mask, a.mask_int32}, a.S, a.P, a.H, a.G, a.E, a.capacity, a.kv_active, a.past_length, a.mask_stride};
  const int mt_size = TokenGroup(M);
  const int64_t half = a.rope_half ? a.rope_half : a.E / 2;
  // RoPE fused into the projection's pairs (i, i + E/2) unless a norm must see the whole head first or
  // the table rotates fewer entries: then a second kernel normalises and rotates.
  const bool separate = a.q_norm != nullptr || (a.rope && half != a.E / 2);
  WithTokenGroup(mt_size, [&](auto mt_c) {
    constexpr int MT = decltype(mt_c)::value;
    const ProjectOp<T> project{dims,
                               static_cast<const T*>(a.w_q), static_cast<const T*>(a.b_q),
                               static_cast<const T*>(a.w_k), static_cast<const T*>(a.b_k),
                               static_cast<const T*>(a.w_v), static_cast<const T*>(a.b_v),
                               a.rope && !separate ? static_cast<const T*>(a.cos) : nullptr,
                               a.rope && !separate ? static_cast<const T*>(a.sin) : nullptr,
                               a.position_ids, a.rope_positions, a.D, sc.q, present_key, present_value};
    const int64_t units = (a.H + 2 * a.G) * (a.E / 2);
    const bool vec = Aligned16<T>(a.x, a.D) && Aligned16<T>(a.w_q, a.D) && Aligned16<T>(a.w_k, a.D) &&
                     Aligned16<T>(a.w_v, a.D);
    WithVector<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      LaunchRowDot<T, MT, 2, VEC>(project, static_cast<const T*>(a.x), a.t_x, M, a.D, units, stream);
    });
  });
  if (separate) {
    const NormRopeArgs<T> norm{dims, sc.q, present_key, static_cast<const T*>(a.q_norm),
                               static_cast<const T*>(a.k_norm), a.rope ? static_cast<const T*>(a.cos) : nullptr,
                               a.rope ? static_cast<const T*>(a.sin) : nullptr, a.position_ids, a.rope_positions,
                               half, M, a.qk_norm_eps};
    const int64_t threads = M * (a.H + a.G) * 32;
    NormRopeKernel<T><<<Blocks(threads, 256), 256, 0, stream>>>(norm);
  }
  const bool vec = AttendVector<T>(a);
  const int lanes_per_key = vec ? static_cast<int>(a.E / kLaneElems) : 32;
  const int64_t splits = AttendSplits(M, a.G, T_, kAttendThreads);
  const AttendArgs<T> args{dims, present_key, present_value, a.attention_mask, sc.q, a.scale, sc, splits, lanes_per_key,
                           a.window};
  const int64_t per_group = a.H / a.G;
  const unsigned grid = static_cast<unsigned>(M * a.G * splits);
  WithVector<T>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (per_group <= 1)
      AttendKernel<T, VEC, 1><<<grid, kAttendThreads, 0, stream>>>(args);
    else if (per_group <= 2)
      AttendKernel<T, VEC, 2><<<grid, kAttendThreads, 0, stream>>>(args);
    else if (per_group <= 4)
      AttendKernel<T, VEC, 4><<<grid, kAttendThreads, 0, stream>>>(args);
    else
      AttendKernel<T, VEC, 8><<<grid, kAttendThreads, 0, stream>>>(args);
  });
  WithTokenGroup(mt_size, [&](auto mt_c) {
    constexpr int MT = decltype(mt_c)::value;
    const OutputProjectionOp<T> out{sc.context, a.t_o, static_cast<const T*>(a.w_o_t), static_cast<const T*>(a.b_o),
                                    static_cast<T*>(a.y), a.H * a.E, a.D};
    LaunchOutputProjection<T, MT>(out, M, sc.out_acc, sc.out_counters, stream);
  });
  return cudaGetLastError();
}

}  // namespace

size_t AttentionWorkspaceBytes(int64_t B, int64_t S, int64_t D, int64_t H, int64_t G, int64_t E) {
  size_t bytes = 0;
  Scratch::Carve(nullptr, B * S, D, H, G, E, &bytes);
  return bytes;
}

const char* AttentionUnsupported(const AttentionLaunch& a) {
  if (a.G <= 0 || a.H % a.G != 0) return "num_heads must be a multiple of num_kv_heads";
  if (a.H / a.G > kMaxHeadsPerGroup) return "more than 8 query heads per kv head";
  if (a.E % 2 != 0 || a.E > kMaxHeadDim) return "head_dim must be even and at most 256";
  if (a.capacity < a.P + a.S) return "the cache capacity is below past + new positions";
  if (a.past_rows != 0 && (a.past_rows < a.P || a.past_rows > a.capacity))
    return "past_key's positions must lie between the past length and the present capacity";
  if (a.past_length != nullptr && a.past_key != a.present_key)
    return "a device-side past length needs the in-place cache (past aliasing present)";
  if (a.mask_stride != 0 && a.mask_stride < a.P + a.S) return "the attention mask's row stride is below past + new";
  if (a.rope && a.rope_positions <= 0) return "RoPE without a cos/sin table";
  if (a.rope_half < 0 || 2 * a.rope_half > a.E) return "the cos/sin table is wider than half of head_dim";
  if ((a.q_norm == nullptr) != (a.k_norm == nullptr)) return "q_norm and k_norm come together";
  if (a.window < 0) return "sliding_window must be >= 0";
  if (a.past_key == a.present_key ? a.past_value != a.present_value : a.past_value == a.present_value)
    return "past key and value must both alias the present caches or neither";
  return nullptr;
}

cudaError_t LaunchSparseHeadAttention(const AttentionLaunch& a, void* workspace, cudaStream_t stream) {
  if (a.B == 0 || a.S == 0) return cudaSuccess;
  if (AttentionUnsupported(a) != nullptr) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat16: return Launch<__half>(a, workspace, stream);
    case DType::kBFloat16: return Launch<__nv_bfloat16>(a, workspace, stream);
    default: return Launch<float>(a, workspace, stream);
  }
}

}  // namespace cuda
}  // namespace shadowllm
