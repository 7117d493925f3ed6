"""Input-independent masks: `random` (the floor) and `static` (aggregated magnitude importance).

Both give one mask per model, [L, H] for heads and [L, F] for neurons, layer 0 dense.
"""

from __future__ import annotations

import torch

from shadowllm.models import ShadowError, adapter_for, corpus

from .allocation import check_sparsity, keep_mask, random_scores
from .magnitude import l2_scores

KINDS = ("random", "static")


def fixed_masks(kind: str, model, tokenizer=None, head_sparsity: float = 0.0, neuron_sparsity: float = 0.0,
                seed: int = 0, allocation: str = "per_layer", calibration_windows: int = 8,
                window_length: int = 256, progress: bool = True, scores=None):
    """(head_mask [L, H] | None, neuron_mask [L, F] | None); None where that sparsity is 0.

    `scores` = (head_scores, neuron_scores) from `static_scores` reuses one calibration for several
    sparsities.
    """
    check_sparsity(head_sparsity, "head sparsity")
    check_sparsity(neuron_sparsity, "neuron sparsity")
    if kind not in KINDS:
        raise ShadowError(f"mask kind {kind!r} is unknown (expected one of {', '.join(KINDS)})")
    arch = adapter_for(model).arch
    if head_sparsity == 0.0 and neuron_sparsity == 0.0:
        return None, None
    if kind == "random":
        head_scores = random_scores(arch.num_layers, arch.num_heads, seed)
        neuron_scores = random_scores(arch.num_layers, arch.ffn, seed + 1)
    else:
        head_scores, neuron_scores = scores or static_scores(model, tokenizer, calibration_windows, window_length,
                                                             progress)
    heads = keep_mask(head_scores, head_sparsity, allocation) if head_sparsity else None
    neurons = keep_mask(neuron_scores, neuron_sparsity, allocation) if neuron_sparsity else None
    return heads, neurons


def static_scores(model, tokenizer, calibration_windows: int = 8, window_length: int = 256, progress: bool = True):
    """L2 magnitude importance aggregated over the first windows of the wiki train split (windows no
    longer than the model's context)."""
    if tokenizer is None:
        raise ShadowError("static masks need the model's tokenizer (for the calibration corpus)")
    window_length = min(window_length, adapter_for(model).arch.max_positions)
    windows = corpus("wiki").windows(tokenizer, "train", window_length, limit=calibration_windows)
    return l2_scores(model, windows, progress=progress)


def static_from_traces(traces, model, criterion: str = "l2_norm"):
    """((head_scores [L, H], neuron_scores [L, F]), source): per-window min-max normalised scores of
    a calibrate run, averaged over its windows. Falls back (and says so) to the run's first criterion."""
    import sys

    from .traces import load_traces
    from .train import minmax_per_layer

    manifest, t = load_traces(traces, model)
    crit = criterion
    if crit not in manifest["criteria"]:
        crit = manifest["criteria"][0]
        print(f"[shadowllm] static scores: {traces} holds no {criterion!r}; using {crit!r}", file=sys.stderr)
    scores = (minmax_per_layer(t[f"seq.{crit}.heads"]).mean(0), minmax_per_layer(t[f"seq.{crit}.neurons"]).mean(0))
    return scores, {"traces": str(traces), "criterion": crit, "samples": manifest["samples"]}


def describe(mask: torch.Tensor | None) -> str:
    if mask is None:
        return "dense"
    return f"{int(mask.sum())}/{mask.numel()} kept ({mask.float().mean().item():.0%})"
