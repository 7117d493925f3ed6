"""Does refining the bases at the greedy's own operating point beat the shipped sparse bases? (It does
not, within noise.)

The shipped refinement (models/rotation.py, kind="sparse") thresholds every residual input at the same
two sparsities (0.25, 0.40) with fixed weights. The greedy allocation then runs each input at its own
level, and an input's cost per unit of dropped energy differs by layer. This study takes a calibration
made the shipped way (128 wiki train windows, greedy costs on 16), reads off each input's greedy level
at rows 0.25 / 0.40 / 0.50 and its sensitivity there (greedy cost / energy fraction dropped), and
refits, from the calibration's bases, the residual basis and each layer's value-head bases (attention
context, per kv head, one threshold per layer) to minimise that cost model; then it calibrates again
in the new bases.

    .venv/bin/python research/operating_point_basis_study.py runs/op-shipped runs/op-refined
    .venv/bin/python research/threshold_rows.py runs/op-shipped runs/op-refined

~8 min for the first calibration (made when missing), ~3 min for the refit, ~5 min for the second,
then ~5 min of rows each on 2 cores. Results: docs/research/thresholds.md, "Tried and dropped".
"""
import sys
from pathlib import Path

import torch

import shadowllm.predictor.thresholds as thresholds
from shadowllm.models import adapter_for, corpus, sparse_forward
from shadowllm.models.loading import load
from shadowllm.models.rotation import level_thresholds

ROWS = (0.25, 0.40, 0.50)  # table rows whose per-input levels the refit targets
STEPS = 25


def dropped(y: torch.Tensor, s: float) -> float:
    """Energy fraction of y below its s-quantile of |y|."""
    t = level_thresholds(y, [s])[0]
    return float(torch.where(y.abs() >= t, 0.0, y).pow(2).sum()) / float(y.pow(2).sum())


def targets(calib, y, layer, k, levels_at):
    """[(level, weight)] of input k of `layer` at each row: weight = greedy cost / energy dropped."""
    out = []
    for lv in levels_at:
        j = int(lv[layer, k])
        if j:
            s = calib.levels[j]
            out.append((s, float(calib.costs[layer, k, j]) / max(dropped(y, s), 1e-12)))
    return out


def kept_weighted(y, terms):
    """y with each entry weighted by the sum of the weights of the levels that keep it."""
    ts = level_thresholds(y, [s for s, _ in terms])
    return y * sum(w * (y.abs() >= t).float() for (_, w), t in zip(terms, ts))


def main(shipped: str, out: str):
    model, tok = load()
    adapter = adapter_for(model)
    arch = adapter.arch
    L, G, H, E = arch.num_layers, arch.num_kv_heads, arch.num_heads, arch.head_dim
    if not Path(shipped).exists():
        thresholds.calibrate_thresholds(model, tok, shipped, samples=128, greedy_windows=16)
    calib = thresholds.load_calibration(shipped, model)
    levels_at = thresholds.greedy_levels(calib, arch, ROWS)

    seen = {}  # the normalised residual inputs and the attention context of the dense model

    def observe(layer, name, t):
        if name in ("attn_in", "mlp_in"):
            scale = (adapter.attn_norm(layer) if name == "attn_in" else adapter.mlp_norm(layer)).weight.double()
            seen.setdefault((layer, name), []).append(
                torch.where(scale != 0, t.double() / scale, 0.0).flatten(0, 1).float())
        elif name == "head_context":
            seen.setdefault((layer, "context"), []).append(t.float().reshape(-1, H, E))

    windows = corpus("wiki").windows(tok, "train", 256, limit=thresholds.ROTATION_WINDOWS)
    with torch.no_grad():
        for b in range(0, windows.shape[0], 4):
            sparse_forward(model, windows[b:b + 4], observer=observe)
    seen = {key: torch.cat(v) for key, v in seen.items()}

    # the residual basis: one [D, D] shared by every layer's attention and MLP input
    q = calib.rotation["residual"].float()
    groups = [(seen[(l, n)], targets(calib, seen[(l, n)] @ q, l, k, levels_at))
              for l in range(L) for n, k in (("attn_in", 0), ("mlp_in", 2))]
    groups = [(x, terms, float(x.double().pow(2).sum())) for x, terms in groups if terms]

    def residual_objective(q):
        return sum(w * dropped(x @ q, s) for x, terms, _ in groups for s, w in terms)

    before = residual_objective(q)
    for _ in range(STEPS):
        m = sum((x.T @ kept_weighted(x @ q, terms)).double() / e for x, terms, e in groups)
        u, _, vh = torch.linalg.svd(m)
        q = (u @ vh).float()
    print(f"residual cost model {before:.1f} -> {residual_objective(q):.1f}", flush=True)

    # the value bases: [E, E] per layer and kv head, one context threshold per layer
    values = calib.rotation["values"].float().clone()
    group = H // G
    for layer in range(L):
        context = seen[(layer, "context")]

        def rotate(v):
            return torch.stack([context[:, h] @ v[h // group] for h in range(H)], 1)

        terms = targets(calib, rotate(values[layer]), layer, 1, levels_at)
        if not terms:
            continue
        v = values[layer]
        cost = sum(w * dropped(rotate(v), s) for s, w in terms)
        for _ in range(STEPS):
            z = kept_weighted(rotate(v), terms)
            for g in range(G):
                heads = range(g * group, (g + 1) * group)
                u, _, vh = torch.linalg.svd(sum(context[:, h].T.double() @ z[:, h].double() for h in heads))
                v[g] = (u @ vh).float()
        print(f"layer {layer} context cost model {cost:.2f} -> "
              f"{sum(w * dropped(rotate(v), s) for s, w in terms):.2f}", flush=True)

    refined = {"residual": q, "values": values}
    thresholds.fit_rotation = lambda *args, **kwargs: refined  # calibrate in the refined bases
    thresholds.calibrate_thresholds(model, tok, out, samples=128, greedy_windows=16)


if __name__ == "__main__":
    main(*sys.argv[1:3])
