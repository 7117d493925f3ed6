"""Magnitude importance (DejaVu's target, the paper's `l2_norm`) aggregated over calibration windows.

Head h of layer l: mean over tokens of the L2 norm of its context slice (before o_proj);
neuron n: mean over tokens of |activation|. Forward only. Aggregated over windows, these give the
`static` policy's masks (one mask for every input).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from shadowllm.models import adapter_for, sparse_forward


@torch.no_grad()
def l2_scores(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True):
    """(head_scores [L, H], neuron_scores [L, F]) averaged over every token of `windows` [N, S]."""
    arch = adapter_for(model).arch
    heads = torch.zeros(arch.num_layers, arch.num_heads, dtype=torch.float64)
    neurons = torch.zeros(arch.num_layers, arch.ffn, dtype=torch.float64)

    def observe(layer, name, t):
        if name == "head_context":  # [B, S, H, E]
            heads[layer] += t.float().norm(dim=-1).sum(dim=(0, 1)).double()
        elif name == "neuron_act":  # [B, S, F]
            neurons[layer] += t.float().abs().sum(dim=(0, 1)).double()

    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc="l2 importance", unit="batch", disable=not progress):
        sparse_forward(model, windows[start:start + batch_size], observer=observe)
    tokens = windows.numel()
    return (heads / tokens).float(), (neurons / tokens).float()
