"""Sparsity allocation: turning importance scores into keep-masks.

scores [..., L, X] (X = heads or neurons; leading dims are batch and/or tokens) -> bool masks of the
same shape. `sparsity` is the fraction of units dropped among the layers that may be sparse; layer 0
(and any layer in `dense_layers`) is always kept whole.

- per_layer: drop the lowest-scoring `round(s * X)` units in each sparse layer;
- global:    one threshold over all sparse layers (scores compared across layers as they are);
- hybrid:    global, but each layer keeps at least `min_keep` of its units.
"""

from __future__ import annotations

import math

import torch

from shadowllm.models import ShadowError

ALLOCATIONS = ("per_layer", "global", "hybrid")


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    s = float(sparsity)
    if not 0.0 <= s < 1.0 or math.isnan(s):
        raise ShadowError(f"{name} must lie in [0, 1), got {sparsity}")
    return s


def _n_drop(sparsity: float, n: int) -> int:
    return min(n, int(math.floor(sparsity * n + 0.5)))


def keep_mask(scores: torch.Tensor, sparsity: float, allocation: str = "per_layer", min_keep: float = 0.25,
              dense_layers=(0,)) -> torch.Tensor:
    """Bool mask [..., L, X]: True for the units kept."""
    sparsity = check_sparsity(sparsity)
    if allocation not in ALLOCATIONS:
        raise ShadowError(f"allocation {allocation!r} is unknown (expected one of {', '.join(ALLOCATIONS)})")
    *lead, L, X = scores.shape
    sparse_layers = [l for l in range(L) if l not in set(dense_layers)]
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if sparsity == 0.0 or not sparse_layers:
        return mask
    s = scores[..., sparse_layers, :].float()  # [..., Ls, X]
    if allocation == "per_layer":
        k = _n_drop(sparsity, X)
        drop = torch.zeros_like(s, dtype=torch.bool)
        if k:
            idx = torch.topk(s, k, dim=-1, largest=False).indices
            drop.scatter_(-1, idx, True)
    else:
        flat = s.reshape(*lead, -1)
        k = _n_drop(sparsity, flat.shape[-1])
        if allocation == "hybrid":
            # Units a layer may lose at most; rank the rest so a layer's cap is never passed.
            cap = X - int(math.ceil(min_keep * X))
            rank_in_layer = torch.argsort(torch.argsort(s, dim=-1), dim=-1)  # 0 = least important
            eligible = (rank_in_layer < cap).reshape(*lead, -1)
            flat = flat.masked_fill(~eligible, float("inf"))
            k = min(k, int(eligible.sum(-1).min()))
        drop_flat = torch.zeros_like(flat, dtype=torch.bool)
        if k:
            drop_flat.scatter_(-1, torch.topk(flat, k, dim=-1, largest=False).indices, True)
        drop = drop_flat.reshape(s.shape)
    mask[..., sparse_layers, :] = ~drop
    return mask


def random_scores(num_layers: int, units: int, seed: int = 0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Uniform random scores: with `keep_mask` they give the `random` baseline masks."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*batch, num_layers, units, generator=g)
