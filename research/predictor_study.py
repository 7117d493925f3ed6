"""What limits the per-token ShadowLLM predictor? Held-out metrics of predictor variants on one trace run.

The shipped per-token shadow predictor trails DejaVu on SmolLM2-135M (docs/results/eval-smollm2-135m.md).
This study trains variants side by side on the same traces and the same held-out windows, so the gap
can be pinned on one of: the loss / target scaling, the network's shape and capacity, the amount of
calibration data, or what the predictor reads. Every variant trains for the same epochs with the same
seed; only the named difference changes.

    .venv/bin/python research/predictor_study.py --traces DIR --out docs/results/predictor-study

Metrics per variant, on the held-out windows (the last 10% of the traces, as `shadowllm train` holds out):
- Spearman correlation of predicted vs true per-token L2 scores, mean over layers 1..L-1;
- top-k recall at 50% sparsity (kept by the prediction and by the truth / kept by the truth);
- captured mass at 50% sparsity: the true score summed over the units the prediction keeps, over the
  same sum for the truly kept units. Dropping a unit costs about its magnitude, so this weighs a miss
  by what it costs; recall counts every miss the same.
Held-out metrics rank variants; only perplexity (`shadowllm eval`) decides whether one is better.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shadowllm.predictor.allocation import keep_mask  # noqa: E402
from shadowllm.predictor.predictors import DejaVuPredictor, ShadowPredictor  # noqa: E402
from shadowllm.predictor.traces import load_traces  # noqa: E402
from shadowllm.predictor.train import fit, held_out_metrics, predict, scaled_targets, top_labels  # noqa: E402

CRITERION = "l2_norm"
SPARSITY = 0.5

# (name, input, target, network, fraction of the training windows)
VARIANTS = [
    ("shadow as shipped (layer-0 attention output)", "attn0", "linear", "shadow", 1.0),
    ("shadow, log targets before min-max", "attn0", "log", "shadow", 1.0),
    ("shadow, BCE on top-50% labels", "attn0", "labels", "shadow", 1.0),
    ("shadow read, DejaVu's network (one MLP per layer, BCE)", "attn0", "labels", "per_layer", 1.0),
    ("shadow + the token's embedding (residual after layer-0 attention)", "attn0+embedding", "linear", "shadow", 1.0),
    ("shadow + running mean of earlier sampled positions (context)", "attn0+context", "linear", "shadow", 1.0),
    ("shadow reading a mid-network residual instead (--mid-layer)", "residual-mid", "linear", "shadow", 1.0),
    ("shadow on 25% of the training windows", "attn0", "linear", "shadow", 0.25),
    ("shadow on 50% of the training windows", "attn0", "linear", "shadow", 0.5),
    ("dejavu as shipped (each layer reads the previous layer's residual)", "lookahead", "labels", "per_layer", 1.0),
    ("dejavu on 25% of the training windows", "lookahead", "labels", "per_layer", 0.25),
    ("dejavu on 50% of the training windows", "lookahead", "labels", "per_layer", 0.5),
]


def inputs(t: dict, name: str, layers: int, mid_layer: int) -> torch.Tensor:
    """[N, D'] (one read point) or [N, L-1, D] (a read point per layer) for N = windows x positions."""
    attn0 = t["shadow_tok"].float()  # [W, K, D]
    residual = t["dejavu_tok"]  # [W, K, L, D]: each layer's residual input
    W, K, D = attn0.shape
    if name == "lookahead":
        return residual[:, :, : layers - 1].float().reshape(W * K, layers - 1, D)
    if name == "residual-mid":
        return residual[:, :, mid_layer].float().reshape(W * K, D)
    parts = [attn0]
    if name == "attn0+embedding":
        parts.append(residual[:, :, 0].float())
    if name == "attn0+context":  # mean of attn0 over this and the earlier sampled positions
        order = t["positions"].argsort(1)
        sorted_ = attn0.gather(1, order[..., None].expand(-1, -1, D))
        running = sorted_.cumsum(1) / torch.arange(1, K + 1)[None, :, None]
        parts.append(running.gather(1, order.argsort(1)[..., None].expand(-1, -1, D)))
    return torch.cat(parts, -1).reshape(W * K, -1)


def targets(y: torch.Tensor, kind: str, heads: int) -> torch.Tensor:
    if kind == "labels":
        keep = 1 - SPARSITY  # label the units a mask at SPARSITY keeps, as DejaVu's training does
        return torch.cat([top_labels(y[..., :heads], keep), top_labels(y[..., heads:], keep)], -1)
    return scaled_targets(y, kind, CRITERION)


def network(kind: str, dim: int, arch: dict) -> nn.Module:
    L, H, F = arch["layers"], arch["heads"], arch["neurons"]
    if kind == "shadow":
        return ShadowPredictor(dim, L, H, F)
    return DejaVuPredictor(dim, L, H, F)


def captured_mass(pred: torch.Tensor, true: torch.Tensor) -> float:
    kept_pred = keep_mask(pred, SPARSITY, dense_layers=())
    kept_true = keep_mask(true, SPARSITY, dense_layers=())
    return float(((true * kept_pred).sum(-1) / (true * kept_true).sum(-1).clamp(min=1e-12)).mean())


def run_variant(arch, x, y, sample, n_train, target_kind, net_kind, fraction, epochs, seed):
    L, H = arch["layers"], arch["heads"]
    train_idx = (sample < max(1, int(n_train * fraction))).nonzero().flatten()
    val_idx = (sample >= n_train).nonzero().flatten()
    if net_kind == "per_layer" and x.dim() == 2:  # one read point feeding every layer's own MLP
        x = x[:, None].expand(-1, L - 1, -1)
    torch.manual_seed(seed)
    net = network(net_kind, x.shape[-1], arch)
    target = targets(y, target_kind, H)
    loss_fn = nn.BCEWithLogitsLoss() if target_kind == "labels" else nn.MSELoss()
    fit(net, x, target, train_idx, loss_fn, epochs, lr=1e-3, batch_size=64, seed=seed)
    pred = predict(net, x, val_idx)
    true = y[val_idx]
    m = held_out_metrics(pred, true, H, (SPARSITY,))
    return {
        "train_examples": len(train_idx),
        "heads": {"spearman": m["heads"]["spearman_mean"], "recall": m["heads"]["topk_recall"][str(SPARSITY)],
                  "mass": round(captured_mass(pred[..., :H], true[..., :H]), 4)},
        "neurons": {"spearman": m["neurons"]["spearman_mean"], "recall": m["neurons"]["topk_recall"][str(SPARSITY)],
                    "mass": round(captured_mass(pred[..., H:], true[..., H:]), 4)},
    }


def markdown(rows: list[dict], command: str, traces: str, epochs: int, mid_layer: int) -> str:
    out = [f"Command: `{command}`", "",
           f"Traces: `{traces}` ({CRITERION}, per-token scores); held-out windows as `shadowllm train`; "
           f"{epochs} epochs each; sparsity {SPARSITY} per layer; mid-network read: layer {mid_layer}'s "
           "residual input.", "",
           "| variant | input | target | network | train examples | heads ρ | heads recall | heads mass "
           "| neurons ρ | neurons recall | neurons mass |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h, n = r["heads"], r["neurons"]
        out.append(f"| {r['variant']} | {r['input']} | {r['target']} | {r['network']} | {r['train_examples']} "
                   f"| {h['spearman']:.3f} | {h['recall']:.3f} | {h['mass']:.3f} "
                   f"| {n['spearman']:.3f} | {n['recall']:.3f} | {n['mass']:.3f} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", required=True, help="a `shadowllm calibrate` folder holding l2_norm")
    ap.add_argument("--out", required=True, help="report prefix: writes PREFIX.json and PREFIX.md")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mid-layer", type=int, default=8, help="the layer whose residual input the mid-read variant uses")
    args = ap.parse_args()
    manifest, t = load_traces(args.traces)
    if CRITERION not in manifest["criteria"]:
        sys.exit(f"--traces {args.traces}: holds {', '.join(manifest['criteria'])}, the study needs {CRITERION}")
    arch = manifest["arch"]
    L = arch["layers"]
    if not 1 <= args.mid_layer < L:
        sys.exit(f"--mid-layer {args.mid_layer}: the traced model has layers 0..{L - 1}; expected 1..{L - 1}")
    W, K = t["positions"].shape
    y = torch.cat([t[f"tok.{CRITERION}.heads"], t[f"tok.{CRITERION}.neurons"].float()], -1)[:, :, 1:]
    y = y.reshape(W * K, L - 1, -1)
    sample = torch.arange(W).repeat_interleave(K)
    n_train = W - max(1, math.ceil(args.holdout * W))
    rows = []
    for name, inp, target_kind, net_kind, fraction in VARIANTS:
        t0 = time.time()
        r = run_variant(arch, inputs(t, inp, L, args.mid_layer), y, sample, n_train, target_kind, net_kind, fraction,
                        args.epochs, args.seed)
        rows.append({"variant": name, "input": inp, "target": target_kind, "network": net_kind, **r})
        print(f"{name:70s} neurons rho {r['neurons']['spearman']:.3f} mass {r['neurons']['mass']:.3f} "
              f"| heads rho {r['heads']['spearman']:.3f} mass {r['heads']['mass']:.3f}  ({time.time() - t0:.0f} s)",
              flush=True)
    command = "python research/predictor_study.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"command": command, "traces": args.traces, "epochs": args.epochs,
                                               "sparsity": SPARSITY, "mid_layer": args.mid_layer, "rows": rows}, indent=2) + "\n")
    Path(f"{out}.md").write_text(markdown(rows, command, args.traces, args.epochs, args.mid_layer))


if __name__ == "__main__":
    main()
