"""Float64 NumPy implementations of the two ops, written from the DESIGN §3 contract alone, with
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


def sparse_neuron_mlp(x, w_in, b_in, w_gate, w_out_t, b_out, mask, act, magnitude=False):
    """y; with magnitude=True also the sum of |terms| added into each output (its rounding scale)."""
    x = x.astype(np.float64)
    B, S, D = x.shape
    y, mag = np.zeros((B, S, D)), np.zeros((B, S, D))
    for b in range(B):
        for n in np.flatnonzero(mask[b]):
            up = x[b] @ w_in[n] + (b_in[n] if b_in is not None else 0.0)
            h = activation(act, x[b] @ w_gate[n]) * up if w_gate is not None else activation(act, up)
            y[b] += h[:, None] * w_out_t[n][None, :]
            h_mag = (activation_magnitude(act, x[b] @ w_gate[n]) * np.abs(up) if w_gate is not None
                     else activation_magnitude(act, up))
            mag[b] += h_mag[:, None] * np.abs(w_out_t[n][None, :])
    if b_out is not None:
        y += b_out
        mag += np.abs(b_out)
    return (y, mag) if magnitude else y


def _rope(t, cos, sin):
    half = t.shape[-1] // 2
    t1, t2 = t[..., :half], t[..., half:]
    return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1)


def sparse_head_attention(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o_t, b_o, past_key, past_value, attention_mask,
                          position_ids, cos, sin, head_mask, H, G, E, scale, rope, kv_policy, magnitude=False):
    """(y, present_key, present_value); with magnitude=True also the sum of |terms| added into y."""
    x = x.astype(np.float64)
    B, S, D = x.shape
    P = past_key.shape[2]
    T = P + S
    per_group = H // G
    y, mag = np.zeros((B, S, D)), np.zeros((B, S, D))
    new_k, new_v = np.zeros((B, G, S, E)), np.zeros((B, G, S, E))
    for b in range(B):
        for g in range(G):
            used = head_mask[b, g * per_group:(g + 1) * per_group].any()
            if kv_policy == "active" and not used:
                continue
            k = x[b] @ w_k[g * E:(g + 1) * E].T + (b_k[g * E:(g + 1) * E] if b_k is not None else 0.0)
            v = x[b] @ w_v[g * E:(g + 1) * E].T + (b_v[g * E:(g + 1) * E] if b_v is not None else 0.0)
            if rope:
                k = _rope(k, cos[position_ids[b]], sin[position_ids[b]])
            new_k[b, g], new_v[b, g] = k, v
    present_k = np.concatenate([past_key, new_k], axis=2)
    present_v = np.concatenate([past_value, new_v], axis=2)
    for b in range(B):
        for h in np.flatnonzero(head_mask[b]):
            g = h // per_group
            q = x[b] @ w_q[h * E:(h + 1) * E].T + (b_q[h * E:(h + 1) * E] if b_q is not None else 0.0)
            if rope:
                q = _rope(q, cos[position_ids[b]], sin[position_ids[b]])
            scores = q @ present_k[b, g].T * scale  # [S, T]
            for i in range(S):
                for j in range(T):
                    if j > P + i or not attention_mask[b, j]:
                        scores[i, j] = MASKED
            scores = scores - scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            context = probs @ present_v[b, g]
            y[b] += context @ w_o_t[h * E:(h + 1) * E]
            mag[b] += np.abs(context) @ np.abs(w_o_t[h * E:(h + 1) * E])
    if b_o is not None:
        y += b_o
        mag += np.abs(b_o)
    return (y, present_k, present_v, mag) if magnitude else (y, present_k, present_v)
