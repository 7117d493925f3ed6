"""Study: one threshold per weight matrix (q, k, v, o, gate, up, down) instead of one per input
(the shipped four: q/k/v share the attention input's, gate/up the MLP input's). TEAL's greedy gives
each of the seven projections its own sparsity; this measures whether the extra freedom moves our
greedy rows. Same calibration (histograms, rotations), same Fisher cost, measured per matrix.

    .venv/bin/python research/per_matrix_study.py CALIB [--windows 16] [--other | --only-other] [--shipped]
        [--sparsities 0.26,0.41] [--costs CALIB-costs7.pt]

Prints the per-matrix (and, with --shipped, the shipped four-input) greedy rows at the six
sparsities of research/threshold_rows.py on the eval protocol's 16 windows (and, with --other, 64
other windows). The costs (saved as CALIB-costs7.pt) took 31 min on 2 cores for 16 windows, each
16-window row ~1.5 min, each 64-window row ~3.5 min. Result (docs/research/thresholds.md, "Tried and dropped"): better at
0.50 of the bytes, the same at 0.60 and 0.75.
"""
import argparse
import json

import torch

from shadowllm.models import adapter_for, corpus
from shadowllm.models import reference
from shadowllm.models.loading import load
from shadowllm.predictor.evaluation import Threshold, evaluate_method
from shadowllm.predictor.thresholds import (decode_probes, greedy_schedule, levels_at, load_calibration,
                                            threshold_table)

SPARSITIES = [0.25, 0.26, 0.4, 0.41, 0.5, 0.51]
MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
INPUT_OF = (0, 0, 0, 1, 2, 2, 3)  # the THRESHOLD_INPUTS entry each matrix reads


def matrix_weights(arch):
    """Parameters one kept entry of its input reads, per matrix."""
    E, H, G, D, F = arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.hidden, arch.ffn
    return [H * E, G * E, G * E, D, F, F, D]


def matrix_sizes(arch):
    return [arch.hidden] * 3 + [arch.num_heads * arch.head_dim, arch.hidden, arch.hidden, arch.ffn]


def thresholds7(calib, levels7):
    """[L, 7] thresholds for per-matrix sparsities [L, 7]."""
    return calib.thresholds(levels7, INPUT_OF)


@torch.no_grad()
def costs7(model, calib, windows, batch_size=4):
    """As thresholds._greedy_costs, one threshold applied to one matrix's copy of the input at a time."""
    L, levels = adapter_for(model).arch.num_layers, calib.levels
    costs = torch.zeros(L, 7, len(levels), dtype=torch.float64)
    thr = [thresholds7(calib, torch.full((L, 7), s)) for s in levels]
    for layer, p in decode_probes(model, windows, batch_size, True, "per-matrix costs"):
        for i in range(1, len(levels)):
            t = thr[i][layer]
            for m in range(3):
                costs[layer, m, i] += p.fisher("attn_out", p.attention(tuple(t[m] if j == m else None for j in range(3))))
            costs[layer, 3, i] += p.fisher("attn_out", p.context(t[3]))
            costs[layer, 4, i] += p.fisher("mlp_out", p.mlp((t[4], None)))
            costs[layer, 5, i] += p.fisher("mlp_out", p.mlp((None, t[5])))
            costs[layer, 6, i] += p.fisher("mlp_out", p.hidden(t[6]))
    return costs


def greedy7(costs, arch, levels, sparsities):
    """Per-matrix levels [L, 7] at each of `sparsities` (increasing): the shipped greedy over seven
    inputs, each level of a matrix skipping its own bytes."""
    per_level = torch.tensor(matrix_weights(arch), dtype=torch.float64) * torch.tensor(matrix_sizes(arch),
                                                                                       dtype=torch.float64)
    total = float(arch.block_parameters)
    assert abs(float(per_level.sum()) * arch.num_layers - total) < 1e-6 * total, "bytes per matrix do not add up"
    lv = torch.tensor(levels, dtype=torch.float32)
    return [lv[level] for level in levels_at(greedy_schedule(costs, arch, levels, per_level), sparsities)]


ROW7 = {}  # the per-matrix row the patched kernels apply: {"t": [L, 7]}
_attention, _mlp = reference.attention_rows, reference.mlp_rows


def _attention7(arch, w, x, past, allowed, rope, heads, token_mask, kv_policy, observer, layer, t_x=None, t_o=None):
    if "t" in ROW7 and t_x is not None:  # t_x, t_o: 1 at thresholded positions (the study's indicator)
        row = ROW7["t"][layer]
        t_x, t_o = tuple(t_x * row[m] for m in range(3)), t_o * row[3]
    return _attention(arch, w, x, past, allowed, rope, heads, token_mask, kv_policy, observer, layer, t_x, t_o)


def _mlp7(activation, w, x, neurons, token_mask, observer, layer, t_x=None, t_h=None):
    if "t" in ROW7 and t_x is not None:
        row = ROW7["t"][layer]
        t_x, t_h = (t_x * row[4], t_x * row[5]), t_h * row[6]
    return _mlp(activation, w, x, neurons, token_mask, observer, layer, t_x, t_h)


reference.attention_rows, reference.mlp_rows = _attention7, _mlp7


class PerMatrix(Threshold):
    """Threshold with a [L, 7] row; bytes counted per matrix from each token's kept entries."""

    def __init__(self, row7, sparsity):
        L = row7.shape[0]
        super().__init__(torch.ones(91, L, 4), "greedy", "both", sparsity, "per_layer")
        self.row7 = row7

    def thresholds(self, model, ids, prompt):
        ROW7["t"] = self.row7
        return super().thresholds(model, ids, prompt)  # ones at continuation positions: the indicator

    def _counter(self, arch, prompt, head_keep):
        L = arch.num_layers
        self.kept = {}
        names = {"attn_in": (0, 1, 2), "head_context": (3,), "mlp_in": (4, 5), "neuron_act": (6,)}

        def observe(layer, name, t):
            for m in names.get(name, ()):
                kept = (t[:, prompt:].abs() >= self.row7[layer, m]).flatten(2)
                self.kept.setdefault(m, torch.zeros(*kept.shape[:2], L))[..., layer] = kept.sum(-1).float()
            return None
        return observe

    def weights_read(self, arch, heads, neurons, prompt):
        w = matrix_weights(arch)
        return sum(self.kept[m] * w[m] for m in range(7)).sum(-1).mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows the per-matrix costs use")
    ap.add_argument("--other", action="store_true", help="also the 64 other test windows")
    ap.add_argument("--shipped", action="store_true", help="also the shipped four-input rows")
    ap.add_argument("--only-other", action="store_true", help="the 64 other test windows only")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--costs", help="per-matrix costs saved by an earlier run (CALIB-costs7.pt)")
    a = ap.parse_args()
    model, tok = load()
    calib = load_calibration(a.calib, model)
    work = calib.model_for(model)
    arch = adapter_for(work).arch
    train = corpus("wiki").windows(tok, "train", 256, limit=a.windows)
    if a.costs:
        costs = torch.load(a.costs)
    else:
        costs = costs7(work, calib, train)
        torch.save(costs, f"{a.calib.rstrip('/')}-costs7.pt")
    sparsities = sorted(float(v) for v in a.sparsities.split(","))  # greedy7 walks the schedule upwards
    rows = greedy7(costs, arch, calib.levels, sparsities)
    table = threshold_table(calib, arch, "greedy")[1]
    test = corpus("wiki").windows(tok, "test", 256, limit=80)
    sets = ([] if a.only_other else [("protocol", test[:16])]) + ([("other", test[16:])] if a.other or a.only_other else [])
    for name, windows in sets:
        for s, lv in zip(sparsities, rows):
            mean = {m: round(float(lv[:, i].mean()), 3) for i, m in enumerate(MATRICES)}
            ppl, frac, _ = evaluate_method(work, PerMatrix(thresholds7(calib, lv), s), windows, 128)
            print(json.dumps({"windows": name, "s": s, "per_matrix_ppl": round(ppl, 3), "bytes": round(frac, 4),
                              "mean_levels": mean}), flush=True)
            if a.shipped:
                ROW7.clear()
                ppl, frac, _ = evaluate_method(work, Threshold(table, "greedy", "both", s, "per_layer"), windows, 128)
                print(json.dumps({"windows": name, "s": s, "shipped_ppl": round(ppl, 3), "bytes": round(frac, 4)}),
                      flush=True)


if __name__ == "__main__":
    main()
