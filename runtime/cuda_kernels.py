"""The CUDA kernels of both ops from PyTorch: the device-pointer C ABI of libshadowllm_trt_plugins.so
(plugins/tensorrt/c_api.cu) on torch CUDA tensors, launched on torch's current stream with no host
synchronisation, so that a whole decode step can be captured as a CUDA graph.

Workspaces come from `mlp_workspace` / `attention_workspace`: zeroed once; every launch leaves the
part that must be zero as it found it, so later launches pass clean=True and skip the memset. A
launch with more tokens than the workspace's last ones must pass clean=False (its zeroed region is
larger); the backend does that for every prefill.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from shadowllm.models import ShadowError

from shadowllm.compiler.native import trt_plugins_library

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


def cuda_available() -> str | None:
    """None when the CUDA kernels can run here, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)"
    if trt_plugins_library() is None:
        return "the CUDA kernels are not built (build/libshadowllm_trt_plugins.so): run scripts/setup.sh where nvcc is"
    return None


def require_cuda(what: str = "--backend cuda") -> ctypes.CDLL:
    why = cuda_available()
    if why:
        raise ShadowError(f"{what}: {why}")
    return library()


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(trt_plugins_library()))
    lib.shadowllm_cuda_last_error.restype = ctypes.c_char_p
    lib.shadowllm_cuda_mlp_workspace_bytes.restype = _I64
    lib.shadowllm_cuda_mlp_workspace_bytes.argtypes = [_I64, _I64, _I64, _I64, _I32]
    lib.shadowllm_cuda_mlp_launch.argtypes = [_P] * 9 + [_I32, _P, _I64, _I64, _I64, _I64, _I32, _I32, _P, _I32, _P]
    lib.shadowllm_cuda_attention_workspace_bytes.restype = _I64
    lib.shadowllm_cuda_attention_workspace_bytes.argtypes = [_I64] * 6
    lib.shadowllm_cuda_attention_launch.argtypes = ([_P] * 15 + [_I64] + [_P] * 6 + [_I64] * 8 + [_F32, _I32, _I32, _I32]
                                                    + [_P, _I32, _P, _P, _I64] + [_P, _P, _F32, _I64, _I64])
    if lib.shadowllm_cuda_device_count() < 1:
        raise ShadowError("the CUDA kernels see no CUDA device")
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def _check(rc: int, what: str):
    if rc != 0:
        raise ShadowError(f"{what}: {library().shadowllm_cuda_last_error().decode()}")


def mlp_workspace(tokens: int, hidden: int, ffn: int, channel_major: bool, device) -> torch.Tensor:
    n = library().shadowllm_cuda_mlp_workspace_bytes(tokens, 1, hidden, ffn, int(channel_major))
    return torch.zeros(n, dtype=torch.uint8, device=device)


def attention_workspace(tokens: int, hidden: int, heads: int, kv_heads: int, head_dim: int, device) -> torch.Tensor:
    n = library().shadowllm_cuda_attention_workspace_bytes(tokens, 1, hidden, heads, kv_heads, head_dim)
    return torch.zeros(n, dtype=torch.uint8, device=device)


def sparse_neuron_mlp(x, w, mask, y, workspace, *, activation: str, t_x=None, t_h=None, channel_major=False,
                      clean=True):
    """y [B, S, D] = SparseNeuronMLP(x [B, S, D]); w: MLPWeights (w_in / w_gate [D, F] when channel_major);
    mask [B, F] bool; t_x / t_h: fp32 device scalars (0-d tensors or views) or None."""
    B, S, D = x.shape
    F = w.w_out_t.shape[0]
    _check(library().shadowllm_cuda_mlp_launch(
        _ptr(x), _ptr(w.w_in), _ptr(w.b_in), _ptr(w.w_gate), _ptr(w.w_out_t), _ptr(w.b_out), _ptr(mask), _ptr(t_x),
        _ptr(t_h), int(channel_major), _ptr(y), B, S, D, F, ACTIVATIONS[activation], DTYPES[x.dtype],
        _ptr(workspace), int(clean), _stream()), "SparseNeuronMLP")


def sparse_head_attention(x, w, k_cache, v_cache, attention_mask, position_ids, cos, sin, head_mask, y, workspace, *,
                          past: int, heads: int, kv_heads: int, head_dim: int, scale: float, kv_active: bool,
                          t_x=None, t_o=None, past_length=None, clean=True, window: int = 0):
    """y [B, S, D] = SparseHeadAttention(x) with the new K/V written in place into k_cache / v_cache
    [B, G, capacity, E] at positions past..past+S-1. attention_mask [B, >= past+S] int64 (its row
    length is the stride); position_ids [B, S] int64; cos / sin [M, R/2] (R <= E rotated) or None;
    head_mask [B, H] bool; w.q_norm / w.k_norm: per-head RMSNorms or None; window: sliding window (0:
    every key). past_length: an int64 device scalar holding `past` (CUDA graphs), or None."""
    B, S, D = x.shape
    capacity = k_cache.shape[2]
    rope = cos is not None
    _check(library().shadowllm_cuda_attention_launch(
        _ptr(x), _ptr(w.w_q), _ptr(w.b_q), _ptr(w.w_k), _ptr(w.b_k), _ptr(w.w_v), _ptr(w.b_v), _ptr(w.w_o_t),
        _ptr(w.b_o), _ptr(k_cache), _ptr(v_cache), _ptr(attention_mask), _ptr(position_ids), _ptr(cos), _ptr(sin),
        cos.shape[0] if rope else 0, _ptr(head_mask), _ptr(t_x), _ptr(t_o), _ptr(y), _ptr(k_cache), _ptr(v_cache),
        B, S, D, past, heads, kv_heads, head_dim, capacity, scale, int(rope), int(kv_active), DTYPES[x.dtype],
        _ptr(workspace), int(clean), _stream(), _ptr(past_length), attention_mask.shape[1],
        _ptr(None if w.q_norm is None else w.q_norm.weight), _ptr(None if w.k_norm is None else w.k_norm.weight),
        float(w.q_norm.eps) if w.q_norm is not None else 1e-6, int(window), cos.shape[1] if rope else 0),
        "SparseHeadAttention")
