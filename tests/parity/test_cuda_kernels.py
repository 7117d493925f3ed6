"""The CUDA kernels of the TensorRT plugins against the float64 NumPy reference, through the
library's C ABI (ctypes, no TensorRT): the same random cases as the CPU op tests, fp32 rel. error
< 1e-5 and fp16 storage within fp16's rounding. They need a GPU and skip without one."""

import ctypes

import numpy as np
import pytest
from hypothesis import given

from shadowllm.export.onnx_ops import ATTENTION_INPUTS
from tests.parity.cases import (REL, SETTINGS, attention_case, attention_reference, attention_tensors, mlp_case,
                                mlp_reference, mlp_tensors, rel_error)
from tests.parity.trt_library import load

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
FP16_REL = 5e-3


@pytest.fixture(scope="module")
def lib():
    lib = load()
    if lib.shadowllm_cuda_device_count() < 1:
        pytest.skip("no CUDA device: the CUDA kernels did not run (they run where a GPU is lent)")
    lib.shadowllm_cuda_last_error.restype = ctypes.c_char_p
    return lib


def _ptr(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def _cast(t: dict, dtype):
    return {k: (a.astype(dtype) if a.dtype == np.float32 else a) for k, a in t.items()}


def run_mlp(lib, t, v, dtype=np.float32):
    t = _cast(t, dtype)
    B, S, D = t["x"].shape
    F = t["w_in"].shape[0]
    y = np.empty((B, S, D), dtype=dtype)
    ms = ctypes.c_float(0)
    i64 = ctypes.c_int64
    rc = lib.shadowllm_cuda_sparse_neuron_mlp(
        _ptr(t["x"]), _ptr(t["w_in"]), _ptr(t.get("b_in")), _ptr(t.get("w_gate")), _ptr(t["w_out_t"]),
        _ptr(t.get("b_out")), _ptr(t["mask"]), _ptr(y), i64(B), i64(S), i64(D), i64(F),
        ctypes.c_int32(ACTIVATIONS[v.activation]), ctypes.c_int32(dtype == np.float16), ctypes.byref(ms))
    assert rc == 0, lib.shadowllm_cuda_last_error().decode()
    return y, ms.value


def run_attention(lib, t, v, dtype=np.float32):
    t = _cast(t, dtype)
    B, S, D = t["x"].shape
    P = t["past_key"].shape[2]
    H, G, E = v.num_heads, v.num_kv_heads, v.head_dim
    y = np.empty((B, S, D), dtype=dtype)
    pk = np.empty((B, G, P + S, E), dtype=dtype)
    pv = np.empty_like(pk)
    ms = ctypes.c_float(0)
    i64 = ctypes.c_int64
    max_positions = t["cos"].shape[0] if v.rope else 0
    args = [_ptr(t.get(k)) for k in ATTENTION_INPUTS[:15]]  # x .. sin
    rc = lib.shadowllm_cuda_sparse_head_attention(
        *args, i64(max_positions), _ptr(t["head_mask"]), _ptr(y), _ptr(pk), _ptr(pv), i64(B), i64(S), i64(D), i64(P),
        i64(H), i64(G), i64(E), ctypes.c_float(v.scale), ctypes.c_int32(int(v.rope)),
        ctypes.c_int32(v.kv_policy == "active"), ctypes.c_int32(dtype == np.float16), ctypes.byref(ms))
    assert rc == 0, lib.shadowllm_cuda_last_error().decode()
    return (y, pk, pv), ms.value


@given(mlp_case())
@SETTINGS
def test_cuda_sparse_neuron_mlp(lib, case):
    v = case[4]
    t = mlp_tensors(case)
    expect, magnitude = mlp_reference(t, v)
    y, _ = run_mlp(lib, t, v)
    assert rel_error(y, expect, magnitude) < REL
    y16, _ = run_mlp(lib, t, v, np.float16)
    assert rel_error(y16, expect, magnitude) < FP16_REL


@given(attention_case())
@SETTINGS
def test_cuda_sparse_head_attention(lib, case):
    v = case[4]
    t = attention_tensors(case)
    expect, magnitudes = attention_reference(t, v)
    got, _ = run_attention(lib, t, v)
    for ours, reference, mag in zip(got, expect, magnitudes):
        assert rel_error(ours, reference, mag) < REL
    got16, _ = run_attention(lib, t, v, np.float16)
    for ours, reference, mag in zip(got16, expect, magnitudes):
        assert rel_error(ours, reference, mag) < FP16_REL
