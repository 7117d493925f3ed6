// SparseHeadAttention on the CPU (docs/export-format.md): q/o rows of kept heads only; k/v rows of every kv head
// (kv_policy=all) or of the kv heads some kept query head reads (kv_policy=active, others zero).
// With activation thresholds, only the weights of the entries of x (t_x) and of the context (t_o)
// that count: channel-major q/k/v weights ([D, H*E], [D, G*E]) are read one kept channel at a time.
#pragma once

#include <cstdint>

#include "../common/kernel_utils.h"
#include "../common/parallel.h"
#include "../../common/weight_format.h"

namespace shadowllm {

struct AttentionArgs {
  const float* x;  // [B, S, D]
  Matrix w_q, w_k, w_v;                             // [H*E, D] / [G*E, D] (channel-major: transposed)
  const float *b_q, *b_k, *b_v;                     // biases, may be null
  Matrix w_o_t;                                     // [H*E, D], any weight format
  const float* b_o;                                 // [D] or null
  const float *past_key, *past_value;               // [B, G, C, E], the past in the first P positions
  const int64_t* attention_mask;                    // [B, T]
  const int64_t* position_ids;                      // [B, S]
  const float *cos, *sin;                           // [M, R/2] or null (no RoPE); R <= E dims rotate
  const float *q_norm, *k_norm;                     // [E] per-head RMSNorm weights before RoPE, or null
  const bool* head_mask;                            // [B, H]
  const float *t_x, *t_o;                           // thresholds on x and on the context, or null
  float *y, *present_key, *present_value;           // [B, S, D], [B, G, max(C, T), E] x2 (may alias past)
  int64_t B, S, D, P, C, H, G, E, max_positions;  // P = T - S past positions, C = past_key's length axis
  int64_t rope_half;  // R/2, the cos/sin tables' width
  int64_t window;     // sliding window (0: the whole cache): token at cache index i sees key j when i - j < window
  float scale, qk_norm_eps;
  bool rope;
  bool kv_active;      // kv_policy == "active"
  bool channel_major;  // weight_layout == "channel_major": w_q / w_k / w_v are [D, H*E] / [D, G*E]
  int activation_bits;  // 8: x and the context rounded to the int8 activation grid (activation_grid.h)
};

void SparseHeadAttention(const AttentionArgs& a, const Parallel& parallel);

}  // namespace shadowllm
