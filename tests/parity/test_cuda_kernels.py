"""The CUDA kernels of the TensorRT plugins against the float64 NumPy reference, through the
library's C ABI (ctypes, no TensorRT): the same random cases as the CPU op tests, plus decode-shaped
cases (batches of 1-8 with their own masks, GQA, long contexts split over the keys, 16-byte vector
paths), activation thresholds in both weight layouts, and the in-place KV cache. fp32 rel. error
< 1e-5; fp16 and bf16 storage within their rounding. They need a GPU and skip without one.

Every host-array call launches twice: once on an uncleared workspace and once, timed, on the
workspace the first launch left (the CUDA backend's path): both must give the returned outputs."""

import ctypes
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadowllm.export.onnx_ops import ATTENTION_INPUTS, AttentionVariant, MLPVariant
from tests.parity import numpy_reference as ref
from tests.parity.cases import (COMPUTED_MODES, INPUT_MODES, REL, SETTINGS, attention_args, attention_case,
                                attention_reference, attention_tensors, case_window, mlp_case, mlp_reference,
                                mlp_tensors, mlp_threshold_case, rel_error, threshold_for_computed, threshold_for_input)
from tests.parity.cases import channel_major as channel_major_copy
from tests.parity.trt_library import load

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
FP16_REL = 5e-3
# bf16 keeps 8 significant bits: outputs (and the new cache rows attention reads back) round at
# 2^-9 relative; judged against the reference on the same bf16-rounded inputs.
BF16_REL = 2e-2
DTYPES = {"fp32": 0, "fp16": 1, "bf16": 2}


@pytest.fixture(scope="module")
def lib():
    lib = load()
    if lib.shadowllm_cuda_device_count() < 1:
        pytest.skip("no CUDA device: the CUDA kernels did not run (they run where a GPU is lent)")
    lib.shadowllm_cuda_last_error.restype = ctypes.c_char_p
    return lib


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def rounded(t: dict, dtype: str) -> dict:
    """The float tensors as the kernels see them in `dtype`, back in float32 (for the reference)."""
    if dtype == "fp32":
        return t
    cast = (lambda a: from_bf16(to_bf16(a))) if dtype == "bf16" else (lambda a: a.astype(np.float16).astype(np.float32))
    return {k: (cast(a) if a.dtype == np.float32 and k not in ("t_x", "t_h", "t_o") else a) for k, a in t.items()}


def _stored(a, dtype):
    if a is None or a.dtype != np.float32:
        return a
    return {"fp32": a, "fp16": a.astype(np.float16), "bf16": to_bf16(a)}[dtype]


def _loaded(a, dtype):
    return from_bf16(a) if dtype == "bf16" else a.astype(np.float32)


def _ptr(a):
    return None if a is None else np.ascontiguousarray(a).ctypes.data_as(ctypes.c_void_p)


def _scalar(t):
    return None if t is None else ctypes.byref(ctypes.c_float(float(t)))


def run_mlp(lib, t, v, dtype="fp32", t_x=None, t_h=None, channel_major=False):
    s = {k: _stored(a, dtype) for k, a in t.items()}
    B, S, D = t["x"].shape
    F = t["w_out_t"].shape[0]
    y = np.empty((B, S, D), dtype=s["x"].dtype)
    ms = ctypes.c_float(0)
    i64 = ctypes.c_int64
    rc = lib.shadowllm_cuda_sparse_neuron_mlp(
        _ptr(s["x"]), _ptr(s["w_in"]), _ptr(s.get("b_in")), _ptr(s.get("w_gate")), _ptr(s["w_out_t"]),
        _ptr(s.get("b_out")), _ptr(t["mask"]), _scalar(t_x), _scalar(t_h), ctypes.c_int32(int(channel_major)),
        _ptr(y), i64(B), i64(S), i64(D), i64(F), ctypes.c_int32(ACTIVATIONS[v.activation]),
        ctypes.c_int32(DTYPES[dtype]), ctypes.byref(ms))
    assert rc == 0, lib.shadowllm_cuda_last_error().decode()
    return _loaded(y, dtype), ms.value


def run_attention(lib, t, v, dtype="fp32", t_x=None, t_o=None, capacity=0, caches=None, window=0):
    """(y, present_key, present_value). capacity > 0: in place, caches = the [B, G, capacity, E]
    float32 key / value buffers holding the past in their first P positions (returned whole)."""
    s = {k: _stored(a, dtype) for k, a in t.items()}
    B, S, D = t["x"].shape
    P = t["past_key"].shape[2]
    H, G, E = v.num_heads, v.num_kv_heads, v.head_dim
    cap = capacity or P + S
    y = np.empty((B, S, D), dtype=s["x"].dtype)
    if capacity:
        pk, pv = (np.ascontiguousarray(_stored(c, dtype)) for c in caches)
    else:
        pk = np.empty((B, G, cap, E), dtype=s["x"].dtype)
        pv = np.empty_like(pk)
    ms = ctypes.c_float(0)
    i64 = ctypes.c_int64
    rope_positions = t["cos"].shape[0] if v.rope else 0
    args = [_ptr(s.get(k)) for k in ATTENTION_INPUTS[:15]]  # x .. sin
    rc = lib.shadowllm_cuda_sparse_head_attention(
        *args, i64(rope_positions), _ptr(t["head_mask"]), _scalar(t_x), _scalar(t_o), _ptr(y), _ptr(pk), _ptr(pv),
        i64(B), i64(S), i64(D), i64(P), i64(H), i64(G), i64(E), i64(capacity), ctypes.c_float(v.scale),
        ctypes.c_int32(int(v.rope)), ctypes.c_int32(v.kv_policy == "active"), ctypes.c_int32(DTYPES[dtype]),
        ctypes.byref(ms), _ptr(s.get("q_norm")), _ptr(s.get("k_norm")), ctypes.c_float(v.qk_norm_eps or 1e-6),
        i64(window), i64(t["cos"].shape[1] if v.rope else 0))
    assert rc == 0, lib.shadowllm_cuda_last_error().decode()
    return (_loaded(y, dtype), _loaded(pk, dtype), _loaded(pv, dtype)), ms.value


# ---------------------------------------------------------------- the shared random cases
@given(mlp_case())
@SETTINGS
def test_cuda_sparse_neuron_mlp(lib, case):
    v = case[4]
    t = mlp_tensors(case)
    expect, magnitude = mlp_reference(t, v)
    y, _ = run_mlp(lib, t, v)
    assert rel_error(y, expect, magnitude) < REL
    y16, _ = run_mlp(lib, t, v, "fp16")
    assert rel_error(y16, expect, magnitude) < FP16_REL
    expect_bf16, magnitude_bf16 = mlp_reference(rounded(t, "bf16"), v)
    ybf, _ = run_mlp(lib, t, v, "bf16")
    assert rel_error(ybf, expect_bf16, magnitude_bf16) < BF16_REL


@given(attention_case())
@SETTINGS
def test_cuda_sparse_head_attention(lib, case):
    v = case[4]
    t = attention_tensors(case)
    window = case_window(case)
    expect, magnitudes = attention_reference(t, v, window)
    got, _ = run_attention(lib, t, v, window=window)
    for ours, reference, mag in zip(got, expect, magnitudes):
        assert rel_error(ours, reference, mag) < REL
    got16, _ = run_attention(lib, t, v, "fp16", window=window)
    for ours, reference, mag in zip(got16, expect, magnitudes):
        assert rel_error(ours, reference, mag) < FP16_REL
    expect_bf16, magnitudes_bf16 = attention_reference(rounded(t, "bf16"), v, window)
    gotbf, _ = run_attention(lib, t, v, "bf16", window=window)
    for ours, reference, mag in zip(gotbf, expect_bf16, magnitudes_bf16):
        assert rel_error(ours, reference, mag) < BF16_REL


# ---------------------------------------------------------------- thresholds
@given(mlp_case(), st.sampled_from(INPUT_MODES), st.sampled_from(COMPUTED_MODES), st.booleans())
@SETTINGS
def test_cuda_mlp_with_thresholds(lib, case, x_mode, h_mode, channel_major):
    """t_x / t_h on top of the mask (ties kept, all kept, none kept), in both weight layouts."""
    v = case[4]
    t, t_x, t_h, expect, magnitude = mlp_threshold_case(case, x_mode, h_mode)
    if channel_major:
        t = channel_major_copy(t, ("w_in", "w_gate"))
    y, _ = run_mlp(lib, t, v, t_x=t_x, t_h=t_h, channel_major=channel_major)
    assert rel_error(y, expect, magnitude) < REL


@given(attention_case(), st.sampled_from(INPUT_MODES), st.sampled_from(COMPUTED_MODES))
@SETTINGS
def test_cuda_attention_with_thresholds(lib, case, x_mode, o_mode):
    v, seed = case[4], case[5]
    t = attention_tensors(case)
    t_x = threshold_for_input(t["x"], x_mode, seed)
    args = [t.get(k) for k in ATTENTION_INPUTS[:16]] + [v.num_heads, v.num_kv_heads, v.head_dim, v.scale, v.rope,
                                                         v.kv_policy]
    window = case_window(case)
    extra = attention_args(t, v, window)
    seen = []
    ref.sparse_head_attention(*args, t_x=t_x, seen=seen, **extra)
    t_o = threshold_for_computed(seen, o_mode)
    *expect, magnitude = ref.sparse_head_attention(*args, magnitude=True, t_x=t_x, t_o=t_o, **extra)
    got, _ = run_attention(lib, t, v, t_x=t_x, t_o=t_o, window=window)
    for ours, reference, mag in zip(got, expect, [magnitude, None, None]):
        assert rel_error(ours, reference, mag) < REL


# ---------------------------------------------------------------- decode shapes, batches, in place
def _decode_mlp_tensors(B, S, D, F, keep, seed, gated=True):
    r = np.random.default_rng(seed)
    f = lambda *shape: (r.standard_normal(shape) * 0.5).astype(np.float32)  # noqa: E731
    t = dict(x=f(B, S, D), w_in=f(F, D), w_out_t=f(F, D), mask=r.random((B, F)) < keep, b_in=f(F), b_out=f(D))
    if gated:
        t["w_gate"] = f(F, D)
    return t


@pytest.mark.parametrize("B,S", [(1, 1), (4, 1), (8, 1), (3, 5), (2, 9)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_mlp_batches_of_own_masks(lib, B, S, dtype):
    """Rows with independent masks (the kernels read the union once and mask per row), token groups
    of 1-8 and more than one group, widths on the 16-byte vector path."""
    v = MLPVariant(activation="silu", gated=True, bias_in=True, bias_out=True)
    t = _decode_mlp_tensors(B, S, 256, 640, 0.5, seed=B * 100 + S)
    expect, magnitude = mlp_reference(rounded(t, dtype), v)
    y, _ = run_mlp(lib, t, v, dtype)
    assert rel_error(y, expect, magnitude) < {"fp32": REL, "fp16": FP16_REL, "bf16": BF16_REL}[dtype]


def _decode_attention(B, S, P, H, G, E, D, keep, seed, rope=True):
    v = AttentionVariant(num_heads=H, num_kv_heads=G, head_dim=E, scale=E ** -0.5, rope=rope, bias_qkv=True,
                         bias_o=True, kv_policy="active")
    case = (B, S, P, D, v, seed, keep)
    t = attention_tensors(case)
    if rope:  # a table long enough for the positions of a long past
        inv = 1.0 / (10000 ** (np.arange(0, E, 2) / E))
        angles = np.arange(P + S + 1)[:, None] * inv[None, :]
        t.update(cos=np.cos(angles).astype(np.float32), sin=np.sin(angles).astype(np.float32))
    return t, v


@pytest.mark.parametrize("B,S,P", [(1, 1, 700), (4, 1, 300), (8, 1, 64), (2, 6, 40)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_attention_decode_shapes(lib, B, S, P, dtype):
    """GQA (4 query heads per kv head), head_dim 64 on the vector path, contexts split over the keys."""
    t, v = _decode_attention(B, S, P, H=8, G=2, E=64, D=256, keep=0.5, seed=B * 1000 + P)
    expect, magnitudes = attention_reference(rounded(t, dtype), v)
    got, _ = run_attention(lib, t, v, dtype)
    for ours, reference, mag in zip(got, expect, magnitudes):
        assert rel_error(ours, reference, mag) < (REL if dtype == "fp32" else BF16_REL)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_attention_in_place_cache(lib, dtype):
    """present aliases past in a preallocated cache: new rows land at P..P+S-1, the past is not
    copied and every position past P+S is left untouched (NaN there would poison any read)."""
    B, S, P, G, E, capacity = 3, 2, 37, 2, 64, 64
    t, v = _decode_attention(B, S, P, H=6, G=G, E=E, D=128, keep=0.6, seed=7)
    expect, magnitudes = attention_reference(rounded(t, dtype), v)
    caches = []
    for name in ("past_key", "past_value"):
        c = np.full((B, G, capacity, E), np.nan, dtype=np.float32)
        c[:, :, :P] = t[name]
        caches.append(c)
    (y, pk, pv), _ = run_attention(lib, t, v, dtype, capacity=capacity, caches=caches)
    tol = REL if dtype == "fp32" else BF16_REL
    assert rel_error(y, expect[0], magnitudes[0]) < tol
    for got, reference in ((pk, expect[1]), (pv, expect[2])):
        assert rel_error(got[:, :, :P + S], reference) < tol
        assert np.isnan(got[:, :, P + S:]).all()


def test_cuda_attention_refuses_what_it_cannot_run(lib):
    t, v = _decode_attention(1, 1, 4, H=4, G=2, E=8, D=16, keep=1.0, seed=1)
    with pytest.raises(AssertionError, match="capacity"):
        run_attention(lib, t, v, capacity=3, caches=[np.zeros((1, 2, 3, 8), np.float32)] * 2)
    odd = replace(v, head_dim=7)
    t_odd, _ = _decode_attention(1, 1, 4, H=4, G=2, E=8, D=16, keep=1.0, seed=1, rope=False)
    with pytest.raises(AssertionError, match="head_dim"):
        run_attention(lib, t_odd, replace(odd, rope=False))
