"""Float64 NumPy implementations of the two ops, written from the docs/export-format.md contract alone, with
explicit loops over batch rows, heads and neurons. The independent reference for op parity."""

import math

import numpy as np

MASKED = float(np.finfo(np.float32).min)


def activation(name, t):
    if name == "relu":
        return np.maximum(t, 0.0)
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * t * (1.0 + erf(t / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * t * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3)))
    if name == "silu":
        return t / (1.0 + np.exp(-t))
    raise ValueError(name)


def activation_magnitude(name, t):
    """The rounding scale of an activation's value. gelu, gelu_tanh and silu are t x gate(t) with the
    gate in [0, 1] computed to absolute, not relative, precision (erf, tanh, a logistic): far in the
    negative tail the value is tiny but its fp32 error is ~|t| x eps. relu is exact."""
    return np.abs(t) if name != "relu" else np.abs(activation(name, t))


GRID_BLOCK = 32
NEAR_HALF = 1e-2  # code units: an entry this close to a rounding boundary may round either way (fp32 vs float64)


def on_grid(v, flips=None, w=None):
    """v [S, N] (float64) on the int8 activation grid (activation_bits 8, docs/export-format.md): per
    block of 32 along N, d = max|v| / 127 and v -> round(v / d) * d, d and v / d in float32 as every
    backend computes them (ties to even). flips [S, D] (with w [N, D], the weight v multiplies): adds,
    for each entry within NEAR_HALF of a rounding boundary, d * |w row| — what an implementation whose
    fp32 value of that entry lies on the other side may differ by (internal values only: the op's own
    inputs are the same fp32 numbers on both sides)."""
    S, N = v.shape
    v32 = v.astype(np.float32).reshape(S, N // GRID_BLOCK, GRID_BLOCK)
    d = np.abs(v32).max(-1, keepdims=True) / np.float32(127)
    safe = np.where(d == 0, np.float32(1), d)
    out = (np.round(v32 / safe).astype(np.float64) * d.astype(np.float64)).reshape(S, N)
    if flips is not None:
        r = v.reshape(S, N // GRID_BLOCK, GRID_BLOCK) / safe.astype(np.float64)
        near = (np.abs(np.abs(r - np.floor(r)) - 0.5) < NEAR_HALF) & (d != 0)
        flips += (near * d.astype(np.float64)).reshape(S, N) @ np.abs(w)
    return out


def keep_large(v, t):
    """Entries of v whose magnitude is below the threshold t set to zero (|v| >= t counts; None: all)."""
    return v if t is None else np.where(np.abs(v) >= float(t), v, 0.0)


def sparse_neuron_mlp(x, w_in, b_in, w_gate, w_out_t, b_out, mask, act, magnitude=False, t_x=None, t_h=None,
                      seen=None, grid=False, flips=None):
    """y; with magnitude=True also the sum of |terms| added into each output (its rounding scale).
    t_x / t_h: activation thresholds on x and on the hidden h. seen: a list that receives every h
    of a kept neuron before t_h applies. grid: x and h on the int8 activation grid (on_grid); flips
    [B, S, D] receives the bound of h's boundary cases."""
    x = keep_large(x.astype(np.float64), t_x)
    B, S, D = x.shape
    F = mask.shape[1]
    y, mag = np.zeros((B, S, D)), np.zeros((B, S, D))
    for b in range(B):
        if grid:
            x[b] = on_grid(x[b])
        hidden = np.zeros((S, F))  # kept neurons' h after t_h; the rest zero
        for n in np.flatnonzero(mask[b]):
            up = x[b] @ w_in[n] + (b_in[n] if b_in is not None else 0.0)
            h = activation(act, x[b] @ w_gate[n]) * up if w_gate is not None else activation(act, up)
            if seen is not None:
                seen.extend(h.tolist())
            if t_h is not None and not (np.abs(h) >= float(t_h)).any():
                continue
            hidden[:, n] = h = keep_large(h, t_h)
            h_mag = (activation_magnitude(act, x[b] @ w_gate[n]) * np.abs(up) if w_gate is not None
                     else activation_magnitude(act, up))
            mag[b] += (h_mag * (h != 0))[:, None] * np.abs(w_out_t[n][None, :])
        if grid:
            hidden = on_grid(hidden, flips[b] if flips is not None else None, w_out_t)
        y[b] += hidden @ w_out_t
    if b_out is not None:
        y += b_out
        mag += np.abs(b_out)
    return (y, mag) if magnitude else y


def _rope(t, cos, sin):
    """Rotate-half on the first 2 * cos.shape[-1] entries (partial rotary when fewer than E); the rest pass."""
    half = cos.shape[-1]
    t1, t2, rest = t[..., :half], t[..., half:2 * half], t[..., 2 * half:]
    return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin, rest], axis=-1)


def _rope_magnitude(m, cos, sin):
    """The magnitude of RoPE's terms given the magnitude m of its input's terms."""
    half = cos.shape[-1]
    m1, m2, rest, c, s = m[..., :half], m[..., half:2 * half], m[..., 2 * half:], np.abs(cos), np.abs(sin)
    return np.concatenate([m1 * c + m2 * s, m2 * c + m1 * s, rest], axis=-1)


def _head_norm(t, m, weight, eps):
    """RMSNorm over a head's entries (q/k norms) of t [S, E], and the magnitude of its terms (m scaled by
    the same factor: the norm's own rounding is relative)."""
    if weight is None:
        return t, m
    inv = 1.0 / np.sqrt((t * t).mean(-1, keepdims=True) + eps)
    return t * inv * weight, m * inv * np.abs(weight)


def _project_magnitude(x, w, bias):
    return np.abs(x) @ np.abs(w).T + (np.abs(bias) if bias is not None else 0.0)


def sparse_head_attention(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o_t, b_o, past_key, past_value, attention_mask,
                          position_ids, cos, sin, head_mask, H, G, E, scale, rope, kv_policy, magnitude=False,
                          t_x=None, t_o=None, seen=None, q_norm=None, k_norm=None, eps=1e-6, window=0,
                          grid=False, flips=None):
    """(y, present_key, present_value); with magnitude=True also the rounding scale of y: the sum of
    |terms| added into it, plus the rounding of the scores (from the q and k projections) carried
    through the softmax: sum_j p_j |score error scale_j| |v_j - context| + sum_j p_j |v_j terms|.
    t_x / t_o: activation thresholds on x and on the context before o. seen: a list that receives
    every context entry of a kept head before t_o applies. q_norm / k_norm: per-head RMSNorm weights
    (eps) before RoPE; window > 0: token i (cache index P + i) sees key j only when P + i - j < window.
    grid: x and the context on the int8 activation grid (on_grid); flips [B, S, D] receives the bound
    of the context's boundary cases."""
    x = keep_large(x.astype(np.float64), t_x)
    B, S, D = x.shape
    if grid:
        x = np.stack([on_grid(x[b]) for b in range(B)])
    T = attention_mask.shape[1]
    P = T - S  # the past: past_key's first P positions; positions T.. of a larger one are carried over
    tail_k, tail_v = past_key[:, :, T:], past_value[:, :, T:]
    past_key, past_value = past_key[:, :, :P], past_value[:, :, :P]
    per_group = H // G
    y, mag = np.zeros((B, S, D)), np.zeros((B, S, D))
    new_k, new_v = np.zeros((B, G, S, E)), np.zeros((B, G, S, E))
    mag_k, mag_v = np.zeros((B, G, T, E)), np.zeros((B, G, T, E))  # past entries are exact inputs
    for b in range(B):
        for g in range(G):
            used = head_mask[b, g * per_group:(g + 1) * per_group].any()
            if kv_policy == "active" and not used:
                continue
            k = x[b] @ w_k[g * E:(g + 1) * E].T + (b_k[g * E:(g + 1) * E] if b_k is not None else 0.0)
            v = x[b] @ w_v[g * E:(g + 1) * E].T + (b_v[g * E:(g + 1) * E] if b_v is not None else 0.0)
            mk = _project_magnitude(x[b], w_k[g * E:(g + 1) * E], b_k[g * E:(g + 1) * E] if b_k is not None else None)
            mag_v[b, g, P:] = _project_magnitude(x[b], w_v[g * E:(g + 1) * E],
                                                 b_v[g * E:(g + 1) * E] if b_v is not None else None)
            k, mk = _head_norm(k, mk, k_norm, eps)
            if rope:
                k = _rope(k, cos[position_ids[b]], sin[position_ids[b]])
                mk = _rope_magnitude(mk, cos[position_ids[b]], sin[position_ids[b]])
            new_k[b, g], new_v[b, g], mag_k[b, g, P:] = k, v, mk
    present_k = np.concatenate([past_key, new_k], axis=2)
    present_v = np.concatenate([past_value, new_v], axis=2)
    for b in range(B):
        contexts = np.zeros((S, H * E))  # kept heads' context after t_o; the rest zero
        for h in np.flatnonzero(head_mask[b]):
            g = h // per_group
            q = x[b] @ w_q[h * E:(h + 1) * E].T + (b_q[h * E:(h + 1) * E] if b_q is not None else 0.0)
            mq = _project_magnitude(x[b], w_q[h * E:(h + 1) * E], b_q[h * E:(h + 1) * E] if b_q is not None else None)
            q, mq = _head_norm(q, mq, q_norm, eps)
            if rope:
                q = _rope(q, cos[position_ids[b]], sin[position_ids[b]])
                mq = _rope_magnitude(mq, cos[position_ids[b]], sin[position_ids[b]])
            scores = q @ present_k[b, g].T * scale  # [S, T]
            score_mag = (mq @ np.abs(present_k[b, g]).T + np.abs(q) @ mag_k[b, g].T) * scale
            for i in range(S):
                for j in range(T):
                    if j > P + i or not attention_mask[b, j] or (window and P + i - j >= window):
                        scores[i, j] = MASKED
            scores = scores - scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            context = probs @ present_v[b, g]
            if seen is not None:
                seen.extend(context.ravel().tolist())
            context = keep_large(context, t_o)
            spread = np.abs(present_v[b, g][None, :, :] - context[:, None, :])  # [S, T, E]
            context_mag = (np.abs(context) + np.einsum("st,st,ste->se", probs, score_mag, spread)
                           + probs @ mag_v[b, g]) * (context != 0)
            contexts[:, h * E:(h + 1) * E] = context
            mag[b] += context_mag @ np.abs(w_o_t[h * E:(h + 1) * E])
        if grid:
            contexts = on_grid(contexts, flips[b] if flips is not None else None, w_o_t)
        y[b] += contexts @ w_o_t
    if b_o is not None:
        y += b_o
        mag += np.abs(b_o)
    present_k, present_v = np.concatenate([present_k, tail_k], axis=2), np.concatenate([present_v, tail_v], axis=2)
    return (y, present_k, present_v, mag) if magnitude else (y, present_k, present_v)
