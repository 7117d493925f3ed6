"""The bound beside every benchmark figure: how many bytes one decode step must read, and how many
tokens/s the machine's memory bandwidth (a large copy, measured in the same run) would then allow.

Bytes per decode step: the weight rows the step reads (at the export's weight format: fp32 4 bytes
a weight, int8 1 + 2/32 with its block's fp16 scale, int4 0.5 + 4/32 with scale and minimum; a
thresholded channel is counted at the same rate, its block's scales shared by the block) (q and o rows of kept heads; k and v
rows of the kv heads computed; w_in / w_gate / w_out_t rows of kept neurons; the LM head, int8 in a quantized
export; one embedding row) plus the KV cache the attention reads, at the run's mean context length. Backends
that compute densely (HF eager, ORT's own GEMMs, the ops' function bodies) read every row whatever
the masks say, so their bound is the dense one. Norm weights and biases (< 0.1%) are left out.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from shadowllm.models.quant import BYTES_PER_WEIGHT, head_format

FLOAT = 4


def _weight_bytes(arch: dict, projection_weights, context: int) -> int:
    """Projections at the export's format, the LM head at its own (int8 in a quantized export), one
    embedding row and the cache in fp32."""
    fmt = arch.get("weights", "fp32")
    L, G, E, D, V = arch["layers"], arch["kv_heads"], arch["head_dim"], arch["hidden"], arch["vocab"]
    head = BYTES_PER_WEIGHT[head_format(fmt)] * V * D
    return int(BYTES_PER_WEIGHT[fmt] * projection_weights + head + FLOAT * (D + 2 * L * G * context * E))


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of `repeats`, on torch's threads."""
    n = int(gib * 2**30) // FLOAT
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # first touch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * n * FLOAT / best


def threshold_bytes(arch: dict, kept, context: int = 0) -> int:
    """Bytes one decode step with activation thresholds reads. kept [4, L]: mean entries kept per token
    of each layer's inputs (attn_x, attn_o, mlp_x, mlp_h); a kept entry of x reads its channel's q, k
    and v weights (gate and up for the MLP), one of the context or of h its w_o_t / w_out_t row."""
    from shadowllm.predictor.thresholds import entry_weights

    kept = np.asarray(kept, dtype=np.float64).reshape(4, arch["layers"]).sum(-1)
    per_entry = entry_weights(arch["heads"], arch["kv_heads"], arch["head_dim"], arch["hidden"], arch["neurons"],
                              arch["gated"])
    return _weight_bytes(arch, sum(kept[k] * per_entry[k] for k in range(4)), context)


def decode_bytes(arch: dict, head_mask=None, neuron_mask=None, context: int = 0, kv_policy: str = "all") -> int:
    """Bytes one decode step reads. arch: the export manifest's `arch` (+ hidden, gated); masks
    [L, H] / [L, F] bool (None: all kept); context: cached tokens attended to."""
    L, H, G, E, F = arch["layers"], arch["heads"], arch["kv_heads"], arch["head_dim"], arch["neurons"]
    D = arch["hidden"]
    heads = np.ones((L, H), bool) if head_mask is None else np.asarray(head_mask, bool).reshape(L, H)
    neurons = np.ones((L, F), bool) if neuron_mask is None else np.asarray(neuron_mask, bool).reshape(L, F)
    groups = heads.reshape(L, G, H // G).any(-1) if kv_policy == "active" else np.ones((L, G), bool)
    rows = 2 * heads.sum() * E + 2 * groups.sum() * E + (3 if arch["gated"] else 2) * neurons.sum()
    return _weight_bytes(arch, rows * D, context)
