// SparseHeadAttention on the CPU (DESIGN §3): q/o rows of kept heads only; k/v rows of every kv head
// (kv_policy=all) or of the kv heads some kept query head reads (kv_policy=active, others zero).
#pragma once

#include <cstdint>

#include "../common/kernel_utils.h"
#include "../common/parallel.h"

namespace shadowllm {

struct AttentionArgs {
  const float* x;  // [B, S, D]
  const float *w_q, *b_q, *w_k, *b_k, *w_v, *b_v;  // [H*E, D] / [G*E, D], biases may be null
  const float *w_o_t, *b_o;                         // [H*E, D], [D] or null
  const float *past_key, *past_value;               // [B, G, P, E]
  const int64_t* attention_mask;                    // [B, T]
  const int64_t* position_ids;                      // [B, S]
  const float *cos, *sin;                           // [M, E/2] or null (no RoPE)
  const bool* head_mask;                            // [B, H]
  float *y, *present_key, *present_value;           // [B, S, D], [B, G, T, E] x2
  int64_t B, S, D, P, H, G, E, max_positions;
  float scale;
  bool rope;
  bool kv_active;  // kv_policy == "active"
};

void SparseHeadAttention(const AttentionArgs& a, const Parallel& parallel);

}  // namespace shadowllm
