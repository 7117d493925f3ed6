"""Would a low-rank branch for the dropped entries beat spending its bytes on a lower threshold? (No.)

R-Sparse-style compensation: a projection reads the kept entries of its input exactly and multiplies
the dropped (small) entries by the best rank-r approximation of its weights, W_r = U_r S_r V_r^T,
which costs r * (inputs + outputs) more weights per token. The same bytes could instead lower that
input's threshold by dS = r * (inputs + outputs) / (inputs * outputs). This compares the two by the
energy of the output error they leave, sum over tokens of |W x_dropped|^2 (relative to thresholding
alone), for each input kind at the greedy allocation's mean level of row 0.40 (docs/research/thresholds.md: attention
input 0.40, context 0.60, MLP input 0.31, h 0.51), over every layer of SmolLM2-135M (Llama family),
on the second half of 8 wiki train windows (16..23), in the bases of `rotate` (none | pca | sparse,
fitted on windows 0..15).

    .venv/bin/python research/lowrank_compensation_study.py sparse     # ~3 min on 2 cores (none: ~1 min)

Results: docs/research/thresholds.md, "Tried and dropped".
"""
import sys

import torch

from shadowllm.models import corpus, sparse_forward
from shadowllm.models.loading import load
from shadowllm.models.rotation import fit_rotation, rotated

LEVELS = {"attn_in": 0.40, "head_context": 0.60, "mlp_in": 0.31, "neuron_act": 0.51}
RANKS = (4, 8, 16)


def readers(layer, name) -> torch.Tensor:
    """The weights [outputs, inputs] that read input `name` of a Llama-family layer."""
    a, m = layer.self_attn, layer.mlp
    return {"attn_in": lambda: torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            "head_context": lambda: a.o_proj.weight,
            "mlp_in": lambda: torch.cat([m.gate_proj.weight, m.up_proj.weight]),
            "neuron_act": lambda: m.down_proj.weight}[name]().detach().float()


def dropped(x: torch.Tensor, s: float) -> torch.Tensor:
    """The entries of x below its s-quantile of |x| (the ones a threshold at sparsity s drops)."""
    t = torch.quantile(x.abs().flatten()[::7], s) if s > 0 else 0.0
    return torch.where(x.abs() < t, x, torch.zeros_like(x))


def main(rotate: str):
    torch.manual_seed(0)
    model, tok = load()
    windows = corpus("wiki").windows(tok, "train", 256, limit=24)
    if rotate != "none":
        model = rotated(model, fit_rotation(model, windows[:16], 4, kind=rotate))
    inputs = {}

    def observe(layer, name, t):
        if name in LEVELS:
            inputs.setdefault((layer, name), []).append(t.detach()[:, t.shape[1] // 2:])  # the decode half
    with torch.no_grad():
        sparse_forward(model, windows[16:24], observer=observe)
    totals = {name: torch.zeros(1 + 2 * len(RANKS), dtype=torch.float64) for name in LEVELS}
    for (l, name), parts in sorted(inputs.items()):
        W = readers(model.model.layers[l], name)
        x = torch.cat(parts).float().reshape(-1, W.shape[1])
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        out, D = W.shape
        s = LEVELS[name]
        xd = dropped(x, s)
        row = [float(((xd @ W.T) ** 2).sum())]
        for r in RANKS:
            residual = W - (U[:, :r] * S[:r]) @ Vh[:r]
            row.append(float(((xd @ residual.T) ** 2).sum()))
            row.append(float(((dropped(x, max(s - r * (D + out) / (D * out), 0.0)) @ W.T) ** 2).sum()))
        totals[name] += torch.tensor(row, dtype=torch.float64)
    print(f"output error energy relative to thresholding alone ({rotate} bases): rank-r branch vs its bytes "
          "spent on a lower threshold")
    for name, row in totals.items():
        cells = "  ".join(f"r={r}: {row[1 + 2 * i] / row[0]:.3f} vs {row[2 + 2 * i] / row[0]:.3f}"
                          for i, r in enumerate(RANKS))
        print(f"{name:13s} s={LEVELS[name]:.2f}  {cells}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sparse")
