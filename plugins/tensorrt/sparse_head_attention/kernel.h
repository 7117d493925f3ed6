// SparseHeadAttention on the GPU (docs/export-format.md): q/o rows of kept heads only; k/v rows of every kv head
// (kv_policy=all) or of the kv heads some kept query head reads (kv_policy=active, others zero).
#pragma once

#include "../common/launch_types.h"

namespace shadowllm {
namespace cuda {

struct AttentionLaunch {
  const void* x;                                  // [B, S, D] dtype
  const void *w_q, *b_q, *w_k, *b_k, *w_v, *b_v;  // [H*E, D] / [G*E, D] row-major, biases may be null
  const void *w_o_t, *b_o;                        // [H*E, D], [D] or null
  // [B, G, past_rows, E], the past in its first P positions; or, in place (docs/design.md §4), the present
  // buffers themselves: the past is the first P positions of the cache and nothing is copied.
  const void *past_key, *past_value;
  const int64_t* attention_mask;  // [B, P+S]
  const int64_t* position_ids;    // [B, S] (clamped to the RoPE table)
  const void *cos, *sin;          // [rope_positions, rope_half] or null (no RoPE)
  const void *q_norm, *k_norm;    // [E] per-head RMSNorm weights applied to q and k before RoPE, or null
  const void* head_mask;          // [B, H] bool (or int32: mask_int32)
  const float *t_x, *t_o;         // device fp32 scalars or null: thresholds on x and on the context
  void *y, *present_key, *present_value;  // [B, S, D], [B, G, capacity, E] x2 (new rows at P..P+S-1)
  int64_t B, S, D, P, H, G, E;
  int64_t capacity;        // present's length axis, >= P + S (max(past_rows, P + S) for the ONNX contract)
  int64_t past_rows;       // past_key's length axis when it is not present (0: P); copied whole
  int64_t rope_positions;  // rows of cos / sin
  int64_t rope_half;       // cos / sin width: the first 2 * rope_half of a head's E entries rotate (0: E / 2)
  int64_t window;          // sliding window: the token at cache index i sees key j when i - j < window (0: all)
  float scale, qk_norm_eps;
  bool rope;
  bool kv_active;
  DType dtype;
  bool workspace_clean;  // the workspace is left as the previous launch of this op left it (or zeroed)
  // CUDA graphs (one captured decode step replayed at every length): the past length read on the
  // device (in place only; P then only bounds it for the checks, capacity bounds the keys), and
  // the attention mask as rows of mask_stride entries (0: P + S).
  const int64_t* past_length;
  int64_t mask_stride;
  bool mask_int32;  // head_mask holds int32 (TensorRT plugins), not bool
};

size_t AttentionWorkspaceBytes(int64_t B, int64_t S, int64_t D, int64_t H, int64_t G, int64_t E);

// Why a launch cannot run (null when it can): shapes the kernels do not cover.
const char* AttentionUnsupported(const AttentionLaunch& a);

// On `stream`, no host synchronisation: copy the past into the present unless in place; one
// row-dot kernel for q of kept heads and k/v of needed kv heads (a warp per RoPE pair of rows, k/v
// written straight into the cache; with q/k norms or a partial rotary table RoPE moves to a second
// kernel, a warp per head vector, that normalises and then rotates); flash-decoding over the keys (one CTA per token, kv head and
// key split: each needed group's K/V read once for all its kept heads; the last split combines);
// the split-K output projection over the kept heads' w_o_t rows.
cudaError_t LaunchSparseHeadAttention(const AttentionLaunch& a, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace shadowllm
