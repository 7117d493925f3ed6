"""Magnitude importance (DejaVu's target, the paper's `l2_norm`) aggregated over calibration windows.

Head h of layer l: mean over tokens of the L2 norm of its context slice (before o_proj);
neuron n: mean over tokens of |activation|. Forward only. Aggregated over windows, these give the
`static` policy's masks (one mask for every input).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from shadowllm.models import adapter_for

from .criteria import importance


def l2_scores(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True):
    """(head_scores [L, H], neuron_scores [L, F]) averaged over every token of `windows` [N, S]:
    the `l2_norm` criterion's per-window sums, added over windows and divided by the tokens."""
    arch = adapter_for(model).arch
    heads = torch.zeros(arch.num_layers, arch.num_heads, dtype=torch.float64)
    neurons = torch.zeros(arch.num_layers, arch.ffn, dtype=torch.float64)
    last = torch.tensor([windows.shape[1] - 1])  # token scores are not needed: keep one position
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc="l2 importance", unit="batch", disable=not progress):
        imp = importance(model, windows[start:start + batch_size], ["l2_norm"], positions=last)
        heads += imp.heads["l2_norm"].double().sum(0)
        neurons += imp.neurons["l2_norm"].double().sum(0)
    tokens = windows.numel()
    return (heads / tokens).float(), (neurons / tokens).float()
