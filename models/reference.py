"""The sparse PyTorch reference forward: the oracle every deployed backend is compared with.

`sparse_forward` runs a HF causal LM from its own weights (through an adapter) with per-sequence
head and neuron masks, and *skips* what the masks switch off: for each distinct mask in the batch
it gathers only the active rows of q/k/v/o and of the MLP projections, so the work done shrinks
with the kept fraction, exactly as the custom ops of docs/export-format.md promise. Per-token masks
(`[B, S, L, ·]`, the DejaVu baseline) change every position, so they are applied by zeroing the
masked heads' context and neurons' activations instead.

The KV cache is a tuple over layers of `(key, value)` tensors `[B, G, T, E]` (HF's legacy layout).
Positions come from the attention mask (cumulative sum, as `generate` does), so left padding works.
"""

from __future__ import annotations

from typing import Callable

import torch

from .adapters import AttentionWeights, MLPWeights, activation_fn, adapter_for
from .errors import ShadowError
from .quant import round_activations

# observer(layer, name, tensor) -> tensor | None. Names: "residual" (layer input [B,S,D]),
# "attn_in" (the normalised attention input [B,S,D]), "attn_out" (attention block output [B,S,D]),
# "mlp_in" (the normalised MLP input [B,S,D]), "mlp_out" (MLP block output [B,S,D]),
# "head_context" (per-head context before o_proj [B,S,H,E]) and "neuron_act" (MLP intermediate
# [B,S,F]); the last two only where every head / neuron is computed (dense or per-token masks).
# A returned tensor replaces the observed one, which is how importance criteria attach gradients.
Observer = Callable[[int, str, torch.Tensor], "torch.Tensor | None"]

# Activation thresholds (docs/export-format.md), one per layer and projection input, in this order: the attention
# input x (before q/k/v), the attention context (before o), the MLP input x (before gate/up or fc1)
# and the MLP hidden h (before down/fc2). An entry v of that input counts only when |v| >= t.
THRESHOLD_INPUTS = ("attn_x", "attn_o", "mlp_x", "mlp_h")


def keep_large(t: torch.Tensor, threshold) -> torch.Tensor:
    """t with the entries whose magnitude lies below `threshold` set to zero (ties kept).

    threshold: None (nothing dropped), a 0-d tensor (one value for every token) or a tensor of t's
    leading dims ([B, S]: one value per token)."""
    if threshold is None:
        return t
    thr = threshold.to(t.dtype)
    thr = thr.reshape(*thr.shape, *([1] * (t.dim() - thr.dim())))
    return torch.where(t.abs() >= thr, t, torch.zeros((), dtype=t.dtype))


def _per_matrix(x, threshold, n: int) -> tuple:
    """x thresholded for each of the n matrices it feeds (q, k, v or gate, up): `threshold` one value
    (tensor or None) for all of them, or a tuple of n, one per matrix (a study of per-matrix thresholds)."""
    if isinstance(threshold, tuple):
        return tuple(keep_large(x, t) for t in threshold)
    return (keep_large(x, threshold),) * n


def _on_grid(t: torch.Tensor, activations: str, idx: torch.Tensor | None = None, size: int = 1,
             full: int = 0) -> torch.Tensor:
    """A projection's input on the activation grid (`--activations int8`: quant.round_activations),
    or as it is (fp32). t may hold only the units `idx` (each `size` entries wide) of an input `full`
    wide, the rest skipped: the blocks follow the full input (the skipped entries are zeros there)."""
    if activations == "fp32":
        return t
    if idx is None:
        return round_activations(t)
    cols = (idx[:, None] * size + torch.arange(size, device=t.device)).flatten()
    whole = t.new_zeros(*t.shape[:-1], full)
    whole[..., cols] = t
    return round_activations(whole)[..., cols]


def _rows(w: torch.Tensor | None, idx: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """Rows of blocks `idx` (each `size` rows) of a [N*size, ...] tensor; all of it when idx is None."""
    if w is None or idx is None:
        return w
    blocks = w.reshape(-1, size, *w.shape[1:])
    return blocks.index_select(0, idx).reshape(-1, *w.shape[1:])


def _linear(x, w, b):
    y = x @ w.t()
    return y if b is None else y + b


def _project_out(t, w_t, b):
    """Output projection with a transposed (row-per-head / row-per-neuron) weight."""
    y = t @ w_t
    return y if b is None else y + b


def _apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on t[b, n, S, E] with cos/sin [b, S, R/2]: the first R dimensions rotate (R = E
    unless the rotary embedding is partial), the rest pass through."""
    half = cos.shape[-1]
    t1, t2, rest = t[..., :half], t[..., half:2 * half], t[..., 2 * half:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s, rest], dim=-1)


def in_window(allowed: torch.Tensor, window: int) -> torch.Tensor:
    """allowed [B, S, T] restricted to a sliding window: new token i (cache index T - S + i) sees key j
    only when i's index - j < window (its own key included: transformers' sliding_window_overlay, on
    cache indices). window 0: unchanged."""
    if not window:
        return allowed
    S, T = allowed.shape[-2], allowed.shape[-1]
    query = torch.arange(T - S, T, device=allowed.device)[:, None]
    return allowed & (query - torch.arange(T, device=allowed.device)[None, :] < window)


def _observe(observer, layer, name, t):
    if observer is None:
        return t
    out = observer(layer, name, t)
    return t if out is None else out


def _row_groups(mask: torch.Tensor | None, batch: int):
    """Split a per-sequence mask [B, X] into groups of rows sharing the same mask.

    Yields (rows, active) with rows a LongTensor of batch indices (None = the whole batch) and
    active the kept indices (None = all). One group per distinct mask keeps a batch that shares a
    mask (the common case) a single batched computation.
    """
    if mask is None:
        yield None, None
        return
    uniq, inverse = torch.unique(mask, dim=0, return_inverse=True)
    for u in range(uniq.shape[0]):
        active = uniq[u].nonzero().flatten()
        rows = (inverse == u).nonzero().flatten()
        yield (None if rows.numel() == batch else rows), (None if active.numel() == mask.shape[1] else active)


def attention_rows(arch, w: AttentionWeights, x, past, allowed, rope, heads, token_mask, kv_policy,
                   observer, layer, t_x=None, t_o=None, activations: str = "fp32"):
    """Attention for rows sharing `heads` (None = all). Returns (y, key, value) for those rows.
    activations: int8 rounds every projection's input to the activation grid (after the thresholds).

    `arch` needs only head_dim, num_heads, num_kv_heads, heads_per_group and scale (an Arch or the
    attributes of a SparseHeadAttention node).
    """
    b, S, _ = x.shape
    E, H, G = arch.head_dim, arch.num_heads, arch.num_kv_heads
    per_group = arch.heads_per_group
    if heads is None:
        groups = None
    elif kv_policy == "active":
        groups = torch.unique(heads // per_group)
    else:
        groups = None
    n_heads = H if heads is None else heads.numel()
    n_groups = G if groups is None else groups.numel()
    xq, xk, xv = (_on_grid(t, activations) for t in _per_matrix(x, t_x, 3))
    q = _linear(xq, _rows(w.w_q, heads, E), _rows(w.b_q, heads, E)).view(b, S, n_heads, E).transpose(1, 2)
    k = _linear(xk, _rows(w.w_k, groups, E), _rows(w.b_k, groups, E)).view(b, S, n_groups, E).transpose(1, 2)
    v = _linear(xv, _rows(w.w_v, groups, E), _rows(w.b_v, groups, E)).view(b, S, n_groups, E).transpose(1, 2)
    if w.q_norm is not None:  # per-head RMSNorm over head_dim, before RoPE (qwen3, gemma3_text)
        q, k = w.q_norm(q), w.k_norm(k)
    if rope is not None:
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
    if groups is not None:
        # kv_policy=active: kv heads no active query head reads stay uncomputed, zeros in the cache.
        k_full, v_full = x.new_zeros(b, G, S, E), x.new_zeros(b, G, S, E)
        k_full[:, groups], v_full[:, groups] = k, v
        k, v = k_full, v_full
    past_k, past_v = past
    key, value = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)

    head_ids = torch.arange(H, device=x.device) if heads is None else heads
    kv_of_head = head_ids // per_group
    keys, values = key.index_select(1, kv_of_head), value.index_select(1, kv_of_head)
    scores = (q @ keys.transpose(-1, -2)) * arch.scale
    # Hidden keys score float32's minimum (the ops' contract): a row that sees no key attends uniformly
    # instead of producing NaN, in any dtype. Softmax runs in fp32, as HF computes it.
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    context = (probs @ values).transpose(1, 2)  # [b, S, n_heads, E]
    if heads is None:
        context = _observe(observer, layer, "head_context", context)
    if token_mask is not None:
        context = context * token_mask[..., None].to(context.dtype)
    context = _on_grid(keep_large(context, t_o).reshape(b, S, n_heads * E), activations, heads, E, H * E)
    return _project_out(context, _rows(w.w_o_t, heads, E), w.b_o), key, value


def mlp_rows(activation: str, w: MLPWeights, x, neurons, token_mask, observer, layer, t_x=None, t_h=None,
             activations: str = "fp32"):
    act = activation_fn(activation)
    x_gate, x_in = (_on_grid(t, activations) for t in _per_matrix(x, t_x, 2))
    w_in, b_in = _rows(w.w_in, neurons, 1), _rows(w.b_in, neurons, 1)
    if w.w_gate is not None:
        hidden = act(x_gate @ _rows(w.w_gate, neurons, 1).t()) * _linear(x_in, w_in, b_in)
    else:
        hidden = act(_linear(x_in, w_in, b_in))
    if neurons is None:
        hidden = _observe(observer, layer, "neuron_act", hidden)
    if token_mask is not None:
        hidden = hidden * token_mask.to(hidden.dtype)
    hidden = _on_grid(keep_large(hidden, t_h), activations, neurons, 1, w.w_out_t.shape[0])
    return _project_out(hidden, _rows(w.w_out_t, neurons, 1), w.b_out)


def _check_mask(name, mask, B, S, L, X):
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ShadowError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) == (B, L, X):
        return mask, None
    if tuple(mask.shape) == (B, S, L, X):
        return None, mask
    raise ShadowError(f"{name} has shape {tuple(mask.shape)}; expected [B, L, {X}] = {(B, L, X)} "
                      f"(per sequence) or [B, S, L, {X}] = {(B, S, L, X)} (per token)")


def _check_thresholds(thresholds, B, S, L):
    if thresholds is None:
        return None
    if not isinstance(thresholds, torch.Tensor) or not thresholds.is_floating_point():
        raise ShadowError(f"thresholds must be a float tensor, got {getattr(thresholds, 'dtype', type(thresholds).__name__)}")
    n = len(THRESHOLD_INPUTS)
    if tuple(thresholds.shape) not in ((L, n), (B, S, L, n)):
        raise ShadowError(f"thresholds have shape {tuple(thresholds.shape)}; expected [L, {n}] = {(L, n)} or "
                          f"[B, S, L, {n}] = {(B, S, L, n)}")
    return thresholds


def _by_rows(groups_out, B, like):
    """Reassemble per-group outputs [(rows, tensor)] into one batch-major tensor."""
    if len(groups_out) == 1 and groups_out[0][0] is None:
        return groups_out[0][1]
    out = like.new_zeros((B,) + groups_out[0][1].shape[1:])
    for rows, t in groups_out:
        out = out.index_copy(0, rows, t)
    return out


def _selector(rows):
    """Selects batch rows `rows` (None = all) of a tensor; None and 0-d tensors pass through."""
    def sel(t):
        return t if rows is None or t is None or t.dim() == 0 else t.index_select(0, rows)
    return sel


def attention_block(arch, w: AttentionWeights, x, past, allowed, rope, head_mask=None, token_mask=None,
                    kv_policy: str = "all", observer: Observer | None = None, layer: int = 0, t_x=None, t_o=None,
                    activations: str = "fp32"):
    """One attention block over a batch: x [B,S,D], past (key, value) [B,G,P,E], allowed [B,S,T] bool,
    rope (cos, sin) [B,S,E/2] or None, head_mask [B,H] (per sequence: skipped) or None, token_mask
    [B,S,H] (zeroed) or None, thresholds t_x (on x) and t_o (on the context before o): None, 0-d or
    [B,S]. Returns (y [B,S,D], key, value [B,G,T,E])."""
    B = x.shape[0]
    ys, keys, values = [], [], []
    for rows, heads in _row_groups(head_mask, B):
        sel = _selector(rows)
        y, k, v = attention_rows(arch, w, sel(x), (sel(past[0]), sel(past[1])), sel(allowed),
                             None if rope is None else (sel(rope[0]), sel(rope[1])), heads,
                             sel(token_mask), kv_policy, observer, layer, sel(t_x), sel(t_o), activations)
        ys.append((rows, y)), keys.append((rows, k)), values.append((rows, v))
    return _by_rows(ys, B, x), _by_rows(keys, B, x), _by_rows(values, B, x)


def mlp_block(activation: str, w: MLPWeights, x, neuron_mask=None, token_mask=None,
              observer: Observer | None = None, layer: int = 0, t_x=None, t_h=None, activations: str = "fp32"):
    """One MLP block over a batch: x [B,S,D]; neuron_mask [B,F] (per sequence: skipped) or None;
    token_mask [B,S,F] (zeroed) or None; thresholds t_x (on x) and t_h (on the hidden h): None, 0-d
    or [B,S]. Returns y [B,S,D]."""
    B = x.shape[0]
    ys = []
    for rows, neurons in _row_groups(neuron_mask, B):
        sel = _selector(rows)
        ys.append((rows, mlp_rows(activation, w, sel(x), neurons, sel(token_mask), observer, layer, sel(t_x), sel(t_h),
                                  activations)))
    return _by_rows(ys, B, x)


def post_norm(norm, t):
    """A block's output through its post-norm (gemma3_text), or as it is."""
    return t if norm is None else norm(t)


def sparse_forward(model, input_ids, head_mask=None, neuron_mask=None, attention_mask=None, past=None,
                   *, kv_policy: str = "all", observer: Observer | None = None, thresholds=None,
                   last_only: bool = False):
    """Run `model` on `input_ids` [B, S] with head / neuron masks; returns (logits [B,S,V], past)
    (logits [B, 1, V] of the last position with last_only: the LM head runs on that row only).

    head_mask: bool [B, L, H] (per sequence: masked heads are skipped) or [B, S, L, H] (per token:
    zeroed); neuron_mask likewise with F. None means dense. attention_mask: [B, P+S] with 1 = attend
    (left padding allowed), all ones when None. past: the tuple returned by the previous call.
    kv_policy: "all" computes K/V for every kv head; "active" only for kv heads some active query
    head uses (the others' new cache positions hold zeros), valid when masks stay fixed per sequence.
    thresholds: activation thresholds (THRESHOLD_INPUTS order), [L, 4] for every position or
    [B, S, L, 4] per position (0 keeps everything); None = none. Masks still apply on top.
    Gradients are not disabled here: wrap in torch.no_grad() / inference_mode() for inference.
    """
    adapter = adapter_for(model)
    arch = adapter.arch
    activations = getattr(model, "_shadowllm_activations", "fp32")  # quant.fake_quantize_ sets it
    if kv_policy not in ("all", "active"):
        raise ShadowError(f"kv_policy {kv_policy!r}: expected 'all' or 'active'")
    if input_ids.dim() != 2:
        raise ShadowError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    L = arch.num_layers
    if past is not None and len(past) != L:
        raise ShadowError(f"past has {len(past)} layers; the model has {L}")
    P = 0 if past is None else past[0][0].shape[2]
    T = P + S
    if S and (int(input_ids.min()) < 0 or int(input_ids.max()) >= arch.vocab):
        raise ShadowError(f"token ids must lie in [0, {arch.vocab}); got {int(input_ids.min())}..{int(input_ids.max())}")
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
    if tuple(attention_mask.shape) != (B, T):
        raise ShadowError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B, past+new] = {(B, T)}")
    seq_heads, tok_heads = _check_mask("head_mask", head_mask, B, S, L, arch.num_heads)
    seq_neurons, tok_neurons = _check_mask("neuron_mask", neuron_mask, B, S, L, arch.ffn)
    thr = _check_thresholds(thresholds, B, S, L)

    attention_mask = attention_mask.to(input_ids.device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
    if T and int(position_ids.max()) >= arch.max_positions:
        raise ShadowError(f"position {int(position_ids.max())} exceeds the model's {arch.max_positions} positions")
    causal = torch.arange(T, device=input_ids.device)[None, :] <= (P + torch.arange(S, device=input_ids.device))[:, None]
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # [B, S, T]

    h = adapter.embed(input_ids, position_ids)
    ropes = adapter.ropes(position_ids)
    if past is None:
        empty = h.new_zeros(B, arch.num_kv_heads, 0, arch.head_dim)
        past = [(empty, empty)] * L
    presents = []
    for layer in range(L):
        h = _observe(observer, layer, "residual", h)
        t = [None] * 4 if thr is None else [thr[..., layer, k] for k in range(4)]
        # --- attention block ---
        w = adapter.attention(layer)
        x = _observe(observer, layer, "attn_in", adapter.attn_norm(layer)(h) if arch.pre_norm else h)
        y, key, value = attention_block(arch, w, x, past[layer], in_window(allowed, arch.window(layer)),
                                        ropes.get(arch.rope_kind(layer)),
                                        None if seq_heads is None else seq_heads[:, layer],
                                        None if tok_heads is None else tok_heads[:, :, layer], kv_policy,
                                        observer, layer, t[0], t[1], activations)
        a = _observe(observer, layer, "attn_out", y)  # the op's output (before a post-norm)
        presents.append((key, value))
        h = h + post_norm(adapter.post_attn_norm(layer), a)
        if not arch.pre_norm:
            h = adapter.attn_norm(layer)(h)
        # --- MLP block ---
        w = adapter.mlp(layer)
        x = _observe(observer, layer, "mlp_in", adapter.mlp_norm(layer)(h) if arch.pre_norm else h)
        m = _observe(observer, layer, "mlp_out", mlp_block(
            arch.activation, w, x, None if seq_neurons is None else seq_neurons[:, layer],
            None if tok_neurons is None else tok_neurons[:, :, layer], observer, layer, t[2], t[3], activations))
        h = h + post_norm(adapter.post_mlp_norm(layer), m)
        if not arch.pre_norm:
            h = adapter.mlp_norm(layer)(h)
    return adapter.logits(h[:, -1:] if last_only else h), tuple(presents)
