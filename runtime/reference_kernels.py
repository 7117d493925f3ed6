"""The CUDA backend's two kernels on any device, from the ops' torch eager kernels (export/ops.py).

Same calls and contract as runtime/cuda_kernels.py (the caches [B, G, capacity, E] written in place at
positions past..past+S-1), so everything the CUDA backend does around its kernels — policies and
their predictors, the preallocated cache and its growth, batches, thresholds — runs and is tested
where no GPU is (`CudaBackend(..., device="cpu")` in CI). It is the reference the GPU kernels are
held to, not a fast path.
"""

from __future__ import annotations

import torch

from shadowllm.export import ops  # noqa: F401  (registers torch.ops.shadowllm.*)


def mlp_workspace(tokens: int, hidden: int, ffn: int, channel_major: bool, device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.uint8, device=device)


def attention_workspace(tokens: int, hidden: int, heads: int, kv_heads: int, head_dim: int, device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.uint8, device=device)


def sparse_neuron_mlp(x, w, mask, y, workspace, *, activation: str, t_x=None, t_h=None, channel_major=False,
                      clean=True):
    y.copy_(torch.ops.shadowllm.sparse_neuron_mlp(x, w.w_in, w.b_in, w.w_gate, w.w_out_t, w.b_out, mask, t_x, t_h,
                                                  activation, "channel_major" if channel_major else "row_major"))


def sparse_head_attention(x, w, k_cache, v_cache, attention_mask, position_ids, cos, sin, head_mask, y, workspace, *,
                          past: int, heads: int, kv_heads: int, head_dim: int, scale: float, kv_active: bool,
                          t_x=None, t_o=None, past_length=None, clean=True, window: int = 0):
    if past_length is not None:
        raise ValueError("the reference kernels take the past length on the host (no CUDA graphs)")
    T = past + x.shape[1]
    out, keys, values = torch.ops.shadowllm.sparse_head_attention(
        x, w.w_q, w.b_q, w.w_k, w.b_k, w.w_v, w.b_v, w.w_o_t, w.b_o, k_cache, v_cache, attention_mask[:, :T],
        position_ids, cos, sin, head_mask, t_x, t_o, None if w.q_norm is None else w.q_norm.weight,
        None if w.k_norm is None else w.k_norm.weight, heads, kv_heads, head_dim, scale, int(cos is not None),
        "active" if kv_active else "all", "row_major", window, 1e-6 if w.q_norm is None else float(w.q_norm.eps))
    k_cache.copy_(keys)  # the op's present: the cache with positions past..T-1 written
    v_cache.copy_(values)
    y.copy_(out)
