"""Random op cases shared by the op-parity tests of every backend (ONNX function bodies, the C++
kernels, the CUDA kernels): hypothesis strategies, the tensors they stand for, the float64 NumPy
reference of each, and the relative error all of them are judged by."""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from shadowllm.export.onnx_ops import ATTENTION_INPUTS, AttentionVariant, MLPVariant
from tests.parity import numpy_reference as ref

REL = 1e-5
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Hidden sizes: small ones, and ones that reach the kernels' 16-wide vector loops and 64-column tiles
# with a remainder (the native kernels switch to column tiles from 4 tokens on).
WIDTHS = st.one_of(st.integers(2, 12), st.integers(60, 150))


def rel_error(ours, reference, magnitude=None):
    reference = np.asarray(reference, dtype=np.float64)
    scale = max(np.abs(reference).max(), 0.0 if magnitude is None else float(np.max(magnitude)), 1e-30)
    return float(np.abs(np.asarray(ours, dtype=np.float64) - reference).max() / scale)


@st.composite
def mlp_case(draw):
    B, S, D, F = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(WIDTHS), draw(st.one_of(st.integers(1, 16),
                                                                                             st.integers(60, 140)))
    v = MLPVariant(activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"])), gated=draw(st.booleans()),
                   bias_in=draw(st.booleans()), bias_out=draw(st.booleans()))
    seed = draw(st.integers(0, 2**31 - 1))
    keep = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    return B, S, D, F, v, seed, keep


def mlp_tensors(case) -> dict:
    B, S, D, F, v, seed, keep = case
    r = np.random.default_rng(seed)
    f = lambda *shape: r.standard_normal(shape).astype(np.float32)  # noqa: E731
    t = dict(x=f(B, S, D), w_in=f(F, D), w_out_t=f(F, D), mask=r.random((B, F)) < keep)
    if v.gated:
        t["w_gate"] = f(F, D)
    if v.bias_in:
        t["b_in"] = f(F)
    if v.bias_out:
        t["b_out"] = f(D)
    return t


def mlp_reference(t: dict, v: MLPVariant):
    """(y, magnitude of y's terms) in float64."""
    return ref.sparse_neuron_mlp(t["x"], t["w_in"], t.get("b_in"), t.get("w_gate"), t["w_out_t"], t.get("b_out"),
                                 t["mask"], v.activation, magnitude=True)


@st.composite
def attention_case(draw):
    G = draw(st.integers(1, 3))
    H = G * draw(st.integers(1, 3))
    E = draw(st.sampled_from([2, 4, 8]))
    B, S, P, D = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(0, 4)), draw(WIDTHS)
    rope = draw(st.booleans())
    v = AttentionVariant(num_heads=H, num_kv_heads=G, head_dim=E, scale=E ** -0.5, rope=rope,
                         bias_qkv=draw(st.booleans()), bias_o=draw(st.booleans()),
                         kv_policy=draw(st.sampled_from(["all", "active"])),
                         # revision 6: q/k norms, a sliding window, partial rotary (qwen3, gemma3_text, phi3)
                         qk_norm_eps=draw(st.sampled_from([None, 1e-6])), windowed=draw(st.booleans()),
                         rotary_dim=E // 2 if rope and E >= 4 and draw(st.booleans()) else 0)
    return B, S, P, D, v, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.0, 0.4, 0.8, 1.0]))


def case_window(case) -> int:
    """The sliding window of a windowed case's node (1..4, so that it cuts into P + S of up to 10
    positions), drawn from its seed; 0 (every key) for the others."""
    v, seed = case[4], case[5]
    return 1 + seed % 4 if v.windowed else 0


# Positions past_key holds beyond the past (C = P + spare): 0 = present is past + new; 7 (> any S) = a
# preallocated cache updated in place, its tail beyond T carried over; 1 = new positions overwrite
# part of it and present grows to T.
SPARE = st.sampled_from([0, 0, 1, 7])


def attention_tensors(case, spare: int = 0) -> dict:
    B, S, P, D, v, seed, keep = case
    H, G, E = v.num_heads, v.num_kv_heads, v.head_dim
    T = P + S
    r = np.random.default_rng(seed)
    f = lambda *shape: r.standard_normal(shape).astype(np.float32)  # noqa: E731
    attention_mask = np.ones((B, T), dtype=np.int64)
    for b in range(1, B):  # left padding on later rows
        attention_mask[b, : r.integers(0, T)] = 0
    positions = np.clip(np.cumsum(attention_mask, -1) - 1, 0, None)[:, P:]
    t = dict(x=f(B, S, D), w_q=f(H * E, D), w_k=f(G * E, D), w_v=f(G * E, D), w_o_t=f(H * E, D),
             past_key=f(B, G, P + spare, E), past_value=f(B, G, P + spare, E), attention_mask=attention_mask,
             position_ids=positions.astype(np.int64), head_mask=r.random((B, H)) < keep)
    if v.bias_qkv:
        t.update(b_q=f(H * E), b_k=f(G * E), b_v=f(G * E))
    if v.bias_o:
        t["b_o"] = f(D)
    if v.rope:
        R = v.rotary_dim or E
        inv = 1.0 / (10000 ** (np.arange(0, R, 2) / R))
        angles = np.arange(16)[:, None] * inv[None, :]
        t.update(cos=np.cos(angles).astype(np.float32), sin=np.sin(angles).astype(np.float32))
    if v.qk_norm_eps is not None:
        t.update(q_norm=(1 + 0.3 * r.standard_normal(E)).astype(np.float32),
                 k_norm=(1 + 0.3 * r.standard_normal(E)).astype(np.float32))
    return t


def attention_args(t: dict, v: AttentionVariant, window: int = 0) -> dict:
    """The keyword arguments of revision 6 for the NumPy reference."""
    return dict(q_norm=t.get("q_norm"), k_norm=t.get("k_norm"), eps=v.qk_norm_eps or 1e-6, window=window)


def attention_reference(t: dict, v: AttentionVariant, window: int = 0):
    """([y, present_key, present_value] in float64, the magnitude of each output's terms)."""
    *expect, magnitude = ref.sparse_head_attention(*[t.get(k) for k in ATTENTION_INPUTS[:16]], v.num_heads, v.num_kv_heads,
                                                   v.head_dim, v.scale, v.rope, v.kv_policy, magnitude=True,
                                                   **attention_args(t, v, window))
    return expect, [magnitude, None, None]  # the caches are plain projections, no long sums


def eager_attention(tt: dict, v: AttentionVariant, layout: str = "row_major", window: int = 0):
    """The torch op (export/ops.py) on torch tensors `tt` named as the contract names its inputs."""
    import torch

    from shadowllm.export.onnx_ops import ATTENTION_BASE_INPUTS

    return torch.ops.shadowllm.sparse_head_attention(
        *[tt.get(k) for k in ATTENTION_BASE_INPUTS], tt.get("q_norm"), tt.get("k_norm"), v.num_heads, v.num_kv_heads,
        v.head_dim, v.scale, int(v.rope), v.kv_policy, layout, window, v.qk_norm_eps or 1e-6)


# ---------------------------------------------------------------- activation thresholds
# How a test picks a threshold: "zero" keeps every entry, "above" none, "tie" (inputs: x) an entry's
# own magnitude (kept: |v| >= t), "gap" (computed values: h, the context) the middle of a wide gap
# between computed magnitudes, so that fp32 and float64 rounding cannot decide differently.
INPUT_MODES = ("zero", "tie", "above")
COMPUTED_MODES = ("zero", "gap", "above")


def threshold_for_input(v: np.ndarray, mode: str, seed: int) -> np.float32:
    mags = np.sort(np.abs(v).ravel())
    if mode == "zero":
        return np.float32(0.0)
    if mode == "above":
        return np.float32(mags[-1] * 2 + 1)
    return np.float32(mags[np.random.default_rng(seed).integers(0, mags.size)])  # tie: an entry's own magnitude


def threshold_for_computed(values, mode: str) -> np.float32:
    """A threshold on values the op computes itself (h, the attention context). fp32 and float64 round
    those differently, so "gap" must sit clear of every value: the midpoint of the widest gap in the
    middle half of the sorted magnitudes (else anywhere), a gap counting only when it is wider than
    1e-3 of the largest magnitude; when the values are all equal within that (every x thresholded
    away leaves act(b_in) in every token), half the smallest one, which keeps them all."""
    mags = np.sort(np.abs(np.asarray(values, dtype=np.float64)).ravel())
    if mode == "zero" or mags.size == 0:
        return np.float32(0.0)
    if mode == "above":
        return np.float32(mags[-1] * 2 + 1)
    gaps = np.diff(mags)
    wide = gaps > 1e-3 * mags[-1]
    lo, hi = mags.size // 4, max(mags.size // 4 + 1, 3 * mags.size // 4)
    middle = np.zeros_like(wide)
    middle[lo:hi] = True
    for allowed in (wide & middle, wide):
        if allowed.any():
            i = int(np.argmax(np.where(allowed, gaps, -1.0)))
            return np.float32((mags[i] + mags[i + 1]) / 2)
    return np.float32(mags[0] / 2)


def mlp_threshold_case(case, x_mode: str, h_mode: str):
    """(tensors, t_x, t_h, y float64, magnitude of y's terms) of an MLP case with thresholds picked
    by the modes: t_x from x, t_h from the h the reference computes once t_x applies."""
    v, seed = case[4], case[5]
    t = mlp_tensors(case)
    t_x = threshold_for_input(t["x"], x_mode, seed)
    args = (t["x"], t["w_in"], t.get("b_in"), t.get("w_gate"), t["w_out_t"], t.get("b_out"), t["mask"], v.activation)
    seen = []
    ref.sparse_neuron_mlp(*args, t_x=t_x, seen=seen)
    t_h = threshold_for_computed(seen, h_mode)
    expect, magnitude = ref.sparse_neuron_mlp(*args, True, t_x, t_h)
    return t, t_x, t_h, expect, magnitude


def channel_major(t: dict, names) -> dict:
    """The tensors with the input projections `names` transposed to [in, out] (weight_layout=channel_major)."""
    return {k: (np.ascontiguousarray(a.T) if k in names else a) for k, a in t.items()}
