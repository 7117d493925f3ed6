#include "op.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace shadowllm {

SparseHeadAttentionKernel::SparseHeadAttentionKernel(const OrtKernelInfo* info)
    : num_heads(Attribute<int64_t>(info, "num_heads", 0)),
      num_kv_heads(Attribute<int64_t>(info, "num_kv_heads", 0)),
      head_dim(Attribute<int64_t>(info, "head_dim", 0)),
      sliding_window(Attribute<int64_t>(info, "sliding_window", 0)),
      scale(Attribute<float>(info, "scale", 0.f)),
      qk_norm_eps(Attribute<float>(info, "qk_norm_eps", 1e-6f)),
      rope(Attribute<int64_t>(info, "rope", 0) != 0),
      kv_active(Attribute<std::string>(info, "kv_policy", "all") == "active"),
      channel_major(ChannelMajor(info, "SparseHeadAttention")),
      activation_bits(ActivationBits(info, "SparseHeadAttention")) {
  CheckBlockSize(info, "SparseHeadAttention");
  if (num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || num_heads % num_kv_heads != 0)
    throw std::invalid_argument("SparseHeadAttention: num_heads, num_kv_heads, head_dim must be positive and "
                                "num_heads a multiple of num_kv_heads");
  if (sliding_window < 0)
    throw std::invalid_argument("SparseHeadAttention: sliding_window must be >= 0 (0: the whole cache), got " +
                                std::to_string(sliding_window));
}

void SparseHeadAttentionKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const std::vector<int64_t> x_shape = InputShape(ctx, 0), past_shape = InputShape(ctx, 9);
  AttentionArgs a{};
  a.B = x_shape[0];
  a.S = x_shape[1];
  a.D = x_shape[2];
  // The past is the first P = T - S positions of past_key's C (>= P) positions; present has
  // max(C, T). When the caller binds present to the memory of past (C >= T), only the new positions
  // are written: the KV cache is updated in place instead of copied every step.
  const int64_t T = InputShape(ctx, 11)[1];
  a.P = T - a.S;
  a.C = past_shape[2];
  a.H = num_heads;
  a.G = num_kv_heads;
  a.E = head_dim;
  a.scale = scale;
  a.rope = rope;
  a.kv_active = kv_active;
  a.x = InputData<float>(ctx, 0);
  const char* op = "SparseHeadAttention";
  a.w_q = WeightInput(ctx, 1, 18, 19, channel_major, op, "w_q");
  a.b_q = InputData<float>(ctx, 2);
  a.w_k = WeightInput(ctx, 3, 20, 21, channel_major, op, "w_k");
  a.b_k = InputData<float>(ctx, 4);
  a.w_v = WeightInput(ctx, 5, 22, 23, channel_major, op, "w_v");
  a.b_v = InputData<float>(ctx, 6);
  a.w_o_t = WeightInput(ctx, 7, 24, 25, true, op, "w_o_t");
  a.b_o = InputData<float>(ctx, 8);
  a.past_key = InputData<float>(ctx, 9);
  a.past_value = InputData<float>(ctx, 10);
  a.attention_mask = InputData<int64_t>(ctx, 11);
  a.position_ids = InputData<int64_t>(ctx, 12);
  a.cos = InputData<float>(ctx, 13);
  a.sin = InputData<float>(ctx, 14);
  a.head_mask = InputData<bool>(ctx, 15);
  a.t_x = ScalarInput(ctx, 16, "SparseHeadAttention", "t_x");
  a.t_o = ScalarInput(ctx, 17, "SparseHeadAttention", "t_o");
  a.channel_major = channel_major;
  a.activation_bits = activation_bits;
  if (activation_bits && a.D % kBlock)
    throw std::invalid_argument("SparseHeadAttention: activation_bits 8 needs an input width that is a multiple of 32");
  a.window = sliding_window;
  a.q_norm = InputData<float>(ctx, 26);
  a.k_norm = InputData<float>(ctx, 27);
  a.qk_norm_eps = qk_norm_eps;
  if ((a.q_norm == nullptr) != (a.k_norm == nullptr))
    throw std::invalid_argument("SparseHeadAttention: q_norm and k_norm come together (one of them is absent)");
  for (int i : {26, 27})
    if (InputData<float>(ctx, i) != nullptr && InputShape(ctx, i) != std::vector<int64_t>{a.E})
      throw std::invalid_argument(std::string("SparseHeadAttention: ") + (i == 26 ? "q_norm" : "k_norm") +
                                  " must have shape [head_dim] = [" + std::to_string(a.E) + "]");
  if (rope && (a.cos == nullptr || a.sin == nullptr))
    throw std::invalid_argument("SparseHeadAttention: rope=1 needs the cos and sin inputs");
  if (rope) {  // a position past the cos/sin table would read outside it
    const std::vector<int64_t> table = InputShape(ctx, 13);
    a.rope_half = table[1];  // R/2: the first R of a head's E dimensions rotate (partial rotary when R < E)
    if (2 * a.rope_half > a.E || a.rope_half <= 0)
      throw std::invalid_argument("SparseHeadAttention: cos/sin tables of width " + std::to_string(a.rope_half) +
                                  " rotate more than head_dim " + std::to_string(a.E) + " dimensions");
    const int64_t rows = table[0];
    for (int64_t i = 0; i < a.B * a.S; ++i)
      if (a.position_ids[i] < 0 || a.position_ids[i] >= rows)
        throw std::invalid_argument("SparseHeadAttention: position_ids holds " + std::to_string(a.position_ids[i]) +
                                    ", outside the cos/sin table of " + std::to_string(rows) +
                                    " positions (the model's maximum)");
  }
  if (a.P < 0 || a.C < a.P)
    throw std::invalid_argument("SparseHeadAttention: attention_mask covers " + std::to_string(T) + " positions for " +
                                std::to_string(a.S) + " new tokens, so the past holds " + std::to_string(a.P) +
                                "; past_key has room for " + std::to_string(a.C));
  const std::vector<int64_t> present{a.B, a.G, std::max(a.C, T), a.E};
  a.y = ctx.GetOutput(0, x_shape).GetTensorMutableData<float>();
  a.present_key = ctx.GetOutput(1, present).GetTensorMutableData<float>();
  a.present_value = ctx.GetOutput(2, present).GetTensorMutableData<float>();
  SparseHeadAttention(a, OrtParallel(ctx));
}

}  // namespace shadowllm
