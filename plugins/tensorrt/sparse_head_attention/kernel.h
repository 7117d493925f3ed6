// SparseHeadAttention on the GPU (DESIGN §3): q/o rows of kept heads only; k/v rows of every kv head
// (kv_policy=all) or of the kv heads some kept query head reads (kv_policy=active, others zero).
#pragma once

#include "../common/launch_types.h"

namespace shadowllm {
namespace cuda {

struct AttentionLaunch {
  const void* x;                                    // [B, S, D] dtype
  const void *w_q, *b_q, *w_k, *b_k, *w_v, *b_v;    // [H*E, D] / [G*E, D], biases may be null
  const void *w_o_t, *b_o;                          // [H*E, D], [D] or null
  const void *past_key, *past_value;                // [B, G, P, E]
  const int64_t* attention_mask;                    // [B, T]
  const int64_t* position_ids;                      // [B, S]
  const void *cos, *sin;                            // [M, E/2] or null (no RoPE)
  const bool* head_mask;                            // [B, H]
  void *y, *present_key, *present_value;            // [B, S, D], [B, G, T, E] x2
  int64_t B, S, D, P, H, G, E;
  float scale;
  bool rope;
  bool kv_active;
  DType dtype;
};

size_t AttentionWorkspaceBytes(int64_t B, int64_t S, int64_t T, int64_t H, int64_t G, int64_t E);

// Kernels on `stream`: compact the head mask; copy the past cache; project q (kept heads) and the
// new k/v (needed kv heads) one warp per output row; RoPE; one block per (token, kept head) for
// scores, softmax and context; the output projection over the kept heads' w_o_t rows.
cudaError_t LaunchSparseHeadAttention(const AttentionLaunch& a, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace shadowllm
