"""Accuracy through the sparse reference: perplexity of windows under fixed masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shadowllm.models import sparse_forward


def _rows(mask, start, n):
    """The masks of windows start..start+n: a shared [L, X] mask is broadcast to every row."""
    if mask is None:
        return None
    return mask.expand(n, *mask.shape) if mask.dim() == 2 else mask[start:start + n]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, head_mask=None, neuron_mask=None, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every position of `windows` [N, S]; masks [L, ·] or [N, L, ·]."""
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        w = windows[start:start + batch_size]
        logits, _ = sparse_forward(model, w, _rows(head_mask, start, len(w)), _rows(neuron_mask, start, len(w)))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                               reduction="sum")
        nll += float(loss)
        count += w[:, 1:].numel()
    return math.exp(nll / count)
