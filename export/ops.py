"""The two sparse ops of docs/export-format.md as `torch.library` custom ops (eager kernel + fake kernel).

The eager kernels are the sparse reference's own blocks (`models.reference.attention_block` /
`mlp_block`): for each distinct mask row they gather only the active heads' and neurons' rows, so the
op and the reference forward cannot drift apart. The fake kernels give shapes for tracing.

shadowllm::sparse_neuron_mlp(x[B,S,D], w_in[F,D], b_in[F]?, w_gate[F,D]?, w_out_t[F,D], b_out[D]?,
                             mask[B,F] bool, t_x[]?, t_h[]?, activation, weight_layout) -> y[B,S,D]
shadowllm::sparse_head_attention(x, w_q, b_q?, w_k, b_k?, w_v, b_v?, w_o_t, b_o?, past_key[B,G,C,E],
                             past_value, attention_mask[B,T], position_ids[B,S], cos[M,E/2]?,
                             sin[M,E/2]?, head_mask[B,H] bool, t_x[]?, t_o[]?, q_norm[E]?, k_norm[E]?,
                             num_heads, num_kv_heads, head_dim, scale, rope, kv_policy, weight_layout,
                             sliding_window, qk_norm_eps)
                             -> (y, present_key[B,G,max(C,T),E], present_value)
The past is the first P = T - S positions of past_key (C >= P); present is past_key with the new
positions P..T-1 written (C = P: present = past + new; C >= T: a cache updated in place).
t_*: activation thresholds (fp32 scalars; an entry v counts only when |v| >= t). weight_layout
"row_major" keeps the input projections [out, in]; "channel_major" hands them in transposed ([D, F],
[D, H*E], ...), the layout in which a kernel reads only the kept input channels' weights.
q_norm / k_norm: per-head RMSNorm weights (eps qk_norm_eps) applied to q and k before RoPE; cos/sin
[M, R/2] with R < E rotate the first R dimensions of a head only (partial rotary); sliding_window > 0:
new token i (cache index P + i) sees key j only when P + i - j < sliding_window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from shadowllm.models.adapters import AttentionWeights, MLPWeights, Norm
from shadowllm.models.reference import attention_block, in_window, mlp_block

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
WEIGHT_LAYOUTS = ("row_major", "channel_major")


def _row_major(w: Optional[Tensor], weight_layout: str) -> Optional[Tensor]:
    """An input projection in PyTorch's [out, in] layout, whichever layout the node carries it in."""
    if w is None or weight_layout == "row_major":
        return w
    if weight_layout == "channel_major":
        return w.t()
    raise ValueError(f"weight_layout {weight_layout!r}: expected one of {WEIGHT_LAYOUTS}")


@dataclass(frozen=True)
class HeadShape:
    """The attributes of a SparseHeadAttention node that the attention kernel needs."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@torch.library.custom_op("shadowllm::sparse_neuron_mlp", mutates_args=())
def sparse_neuron_mlp(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_gate: Optional[Tensor], w_out_t: Tensor,
                      b_out: Optional[Tensor], mask: Tensor, t_x: Optional[Tensor], t_h: Optional[Tensor],
                      activation: str, weight_layout: str) -> Tensor:
    w = MLPWeights(w_in=_row_major(w_in, weight_layout), w_out_t=w_out_t, w_gate=_row_major(w_gate, weight_layout),
                   b_in=b_in, b_out=b_out)
    return mlp_block(activation, w, x, mask.bool(), t_x=t_x, t_h=t_h).clone()


@sparse_neuron_mlp.register_fake
def _(x, w_in, b_in, w_gate, w_out_t, b_out, mask, t_x, t_h, activation, weight_layout):
    return torch.empty_like(x)


def _allowed(attention_mask: Tensor, past_len: int, S: int) -> Tensor:
    """[B, S, T] bool: key j is visible to new token i when j <= past_len + i and attention_mask[b, j]."""
    T = attention_mask.shape[1]
    causal = torch.arange(T, device=attention_mask.device)[None, :] <= (
        past_len + torch.arange(S, device=attention_mask.device))[:, None]
    return causal[None] & attention_mask.bool()[:, None, :]


@torch.library.custom_op("shadowllm::sparse_head_attention", mutates_args=())
def sparse_head_attention(x: Tensor, w_q: Tensor, b_q: Optional[Tensor], w_k: Tensor, b_k: Optional[Tensor],
                          w_v: Tensor, b_v: Optional[Tensor], w_o_t: Tensor, b_o: Optional[Tensor],
                          past_key: Tensor, past_value: Tensor, attention_mask: Tensor, position_ids: Tensor,
                          cos: Optional[Tensor], sin: Optional[Tensor], head_mask: Tensor, t_x: Optional[Tensor],
                          t_o: Optional[Tensor], q_norm: Optional[Tensor], k_norm: Optional[Tensor], num_heads: int,
                          num_kv_heads: int, head_dim: int, scale: float, rope: int, kv_policy: str,
                          weight_layout: str, sliding_window: int, qk_norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    shape = HeadShape(num_heads, num_kv_heads, head_dim, scale)
    norm = (lambda t: None if t is None else Norm("rmsnorm", t, None, qk_norm_eps))
    w = AttentionWeights(w_q=_row_major(w_q, weight_layout), w_k=_row_major(w_k, weight_layout),
                         w_v=_row_major(w_v, weight_layout), w_o_t=w_o_t, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
                         q_norm=norm(q_norm), k_norm=norm(k_norm))
    tables = (cos[position_ids], sin[position_ids]) if rope else None
    T = attention_mask.shape[1]
    P = T - x.shape[1]
    allowed = in_window(_allowed(attention_mask, P, x.shape[1]), sliding_window)
    y, key, value = attention_block(shape, w, x, (past_key[:, :, :P], past_value[:, :, :P]), allowed, tables,
                                    head_mask.bool(), kv_policy=kv_policy, t_x=t_x, t_o=t_o)
    # positions T.. of a larger past_key are kept as they are (a preallocated cache's unused tail)
    return y.clone(), torch.cat([key, past_key[:, :, T:]], 2), torch.cat([value, past_value[:, :, T:]], 2)


@sparse_head_attention.register_fake
def _(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o_t, b_o, past_key, past_value, attention_mask, position_ids, cos, sin,
      head_mask, t_x, t_o, q_norm, k_norm, num_heads, num_kv_heads, head_dim, scale, rope, kv_policy, weight_layout,
      sliding_window, qk_norm_eps):
    B, G, C, E = past_key.shape
    N = torch.sym_max(C, attention_mask.shape[1])
    return torch.empty_like(x), past_key.new_empty(B, G, N, E), past_value.new_empty(B, G, N, E)
