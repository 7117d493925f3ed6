"""Predictor training (`shadowllm train`) and held-out metrics.

shadow: MSE on per-layer min-max normalised scores of one criterion;
  --granularity sequence: input = layer-0 attention output at the window's last token, target =
  scores aggregated over the window; --granularity token: input and target at sampled tokens.
dejavu: BCE on top-k labels (the top `label_keep` fraction of each layer's per-token scores), input =
  the residual input of the previous layer at that token (token granularity only, as DejaVu runs).
The last `holdout` fraction of the trace samples (by window) is held out for the metrics: per layer
Spearman correlation between predicted and true scores and top-k recall at each evaluated
sparsity, plus the predictor's parameters and FLOPs as a fraction of the model's.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from shadowllm.models import ShadowError
from shadowllm.models.adapters import block_parameters

from .allocation import keep_mask
from .criteria import SEQUENCE_ONLY
from .predictors import (FORMAT, DejaVuPredictor, Predictor, ShadowPredictor, flops_per_prediction,
                         parameter_count)
from .traces import load_traces

KINDS = ("shadow", "dejavu")
GRANULARITIES = ("sequence", "token")
DEFAULT_CRITERION = {"shadow": "plainact", "dejavu": "l2_norm"}


def minmax_per_layer(scores: torch.Tensor) -> torch.Tensor:
    """Scale each layer's scores (last dim) to [0, 1] per example."""
    lo = scores.amin(-1, keepdim=True)
    hi = scores.amax(-1, keepdim=True)
    return (scores - lo) / (hi - lo).clamp(min=1e-12)


SCALES = ("linear", "log")


def scaled_targets(scores: torch.Tensor, scale: str, criterion: str) -> torch.Tensor:
    """The shadow regression target: per-layer min-max normalised scores, after an optional log.

    Magnitude scores are heavy-tailed (a few units per layer are 10-100x the median), so linear
    min-max squeezes most units into a sliver near 0 and the MSE is spent on the outliers; the mask
    is a top-k of each layer, decided around the median. log spreads that region out and keeps the
    order. On SmolLM2-135M it ranks better (held-out recall up) but masks worse (per-token perplexity
    up: the few large units it now weighs less are the costly ones to miss), so the default stays
    linear (docs/research/predictors.md)."""
    if scale == "log":
        if bool((scores < 0).any()):
            raise ShadowError(f"--target-scale log needs non-negative scores; criterion {criterion!r} has negative ones")
        scores = torch.log(scores.float().clamp(min=1e-8))
    return minmax_per_layer(scores)


def top_labels(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """1 for the top `keep` fraction of each layer's units, else 0."""
    k = max(1, int(round(keep * scores.shape[-1])))
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(-1, idx, 1.0)


def _dataset(kind, granularity, criterion, manifest, t):
    """(inputs, targets [N, L-1, H+F], sample ids [N]) with layers 1..L-1."""
    a = manifest["arch"]
    L = a["layers"]
    n = t["window_index"].shape[0]
    if granularity == "sequence":
        x = t["shadow_last"]
        y = torch.cat([t[f"seq.{criterion}.heads"], t[f"seq.{criterion}.neurons"]], dim=-1)[:, 1:]
        sample = torch.arange(n)
    else:
        if criterion in SEQUENCE_ONLY:
            raise ShadowError(f"criterion {criterion!r} has no per-token form; use --granularity sequence")
        K = t["positions"].shape[1]
        y = torch.cat([t[f"tok.{criterion}.heads"], t[f"tok.{criterion}.neurons"].float()], dim=-1)[:, :, 1:]
        y = y.reshape(n * K, L - 1, -1)
        if kind == "shadow":
            x = t["shadow_tok"].reshape(n * K, -1)
        else:
            x = t["dejavu_tok"][:, :, : L - 1].float().reshape(n * K, L - 1, -1)
        sample = torch.arange(n).repeat_interleave(K)
    return x, y, sample


def spearman(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dim (no tie correction)."""
    def ranks(v):
        return v.argsort(-1).argsort(-1).float()
    rp, rt = ranks(pred), ranks(true)
    rp, rt = rp - rp.mean(-1, keepdim=True), rt - rt.mean(-1, keepdim=True)
    return (rp * rt).sum(-1) / (rp.norm(dim=-1) * rt.norm(dim=-1)).clamp(min=1e-12)


def held_out_metrics(pred: torch.Tensor, true: torch.Tensor, heads: int, sparsities) -> dict:
    """Per-layer Spearman and top-k recall of predictions [N, L-1, H+F] against true scores."""
    out = {}
    for name, sl in (("heads", slice(0, heads)), ("neurons", slice(heads, None))):
        p, t = pred[..., sl].float(), true[..., sl].float()
        rho = spearman(p, t).mean(0)  # per layer
        rec = {}
        for s in sparsities:
            keep_true = keep_mask(t, s, dense_layers=())
            keep_pred = keep_mask(p, s, dense_layers=())
            rec[str(s)] = float((keep_true & keep_pred).sum() / keep_true.sum().clamp(min=1))
        out[name] = {"spearman_per_layer": [round(float(r), 4) for r in rho], "spearman_mean": round(float(rho.mean()), 4),
                     "topk_recall": {k: round(v, 4) for k, v in rec.items()}}
    return out


def fit(net: nn.Module, x: torch.Tensor, target: torch.Tensor, train_idx: torch.Tensor, loss_fn: nn.Module,
        epochs: int, lr: float, batch_size: int, seed: int, desc: str = "train", progress: bool = False):
    """Standardise the inputs, start from the prior (each unit's mean training target; for BCE its
    logit), then Adam with a cosine schedule over shuffled mini-batches of `train_idx`."""
    xt = x[train_idx]
    net.mean.copy_(xt.mean(0))
    net.std.copy_(xt.std(0).clamp(min=1e-6))
    prior = target[train_idx].float().mean(0)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):  # BCE logits: start from each unit's label rate
        prior = torch.logit(prior.clamp(1e-4, 1 - 1e-4))
    net.prior.copy_(prior)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * max(1, math.ceil(len(train_idx) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    net.train()
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = loss_fn(net(x[idx]), target[idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    net.eval()


def predict(net: nn.Module, x: torch.Tensor, idx: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The trained net's outputs for the examples `idx`, in chunks."""
    with torch.no_grad():
        return torch.cat([net(x[idx[i:i + chunk]]) for i in range(0, len(idx), chunk)])


def train(traces: str, kind: str = "shadow", granularity: str = "sequence", criterion: str | None = None,
          rank: int | None = None, width: int = 512, epochs: int = 40, lr: float = 1e-3, batch_size: int = 64,
          holdout: float = 0.1, label_keep: float = 0.5, sparsities=(0.1, 0.2, 0.3, 0.5), seed: int = 0,
          model=None, progress: bool = True, target_scale: str = "linear") -> Predictor:
    if kind not in KINDS:
        raise ShadowError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if granularity not in GRANULARITIES:
        raise ShadowError(f"--granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    if kind == "dejavu" and granularity != "token":
        raise ShadowError("--kind dejavu predicts per token (lookahead); use --granularity token")
    if target_scale not in SCALES:
        raise ShadowError(f"--target-scale {target_scale!r}: expected one of {', '.join(SCALES)}")
    if not 0.0 < holdout < 1.0:
        raise ShadowError(f"--holdout must lie in (0, 1), got {holdout}")
    manifest, t = load_traces(traces, model)
    criterion = criterion or DEFAULT_CRITERION[kind]
    if criterion not in manifest["criteria"]:
        raise ShadowError(f"--criterion {criterion!r}: the traces in {traces} hold {', '.join(manifest['criteria'])}")
    a = manifest["arch"]
    L, D, H, Fn = a["layers"], a["hidden"], a["heads"], a["neurons"]
    x, y, sample = _dataset(kind, granularity, criterion, manifest, t)
    n = int(sample.max()) + 1
    n_val = max(1, int(math.ceil(holdout * n)))
    if n - n_val < 1:
        raise ShadowError(f"--traces {traces}: {n} samples are too few to hold out {holdout:.0%}")
    train_idx = (sample < n - n_val).nonzero().flatten()
    val_idx = (sample >= n - n_val).nonzero().flatten()

    torch.manual_seed(seed)
    if kind == "shadow":
        rank = rank or 64
        net = ShadowPredictor(D, L, H, Fn, width, rank)
        target = scaled_targets(y, target_scale, criterion)
        loss_fn = nn.MSELoss()
    else:
        rank = rank or 128
        net = DejaVuPredictor(D, L, H, Fn, rank)
        target = torch.cat([top_labels(y[..., :H], label_keep), top_labels(y[..., H:], label_keep)], dim=-1)
        loss_fn = nn.BCEWithLogitsLoss()
    fit(net, x, target, train_idx, loss_fn, epochs, lr, batch_size, seed, f"train {kind}/{granularity}", progress)
    pred = predict(net, x, val_idx)
    with torch.no_grad():
        final_loss = float(loss_fn(pred, target[val_idx].float()))
    metrics = held_out_metrics(pred, y[val_idx], H, sparsities)
    metrics["held_out_loss"] = round(final_loss, 6)
    metrics["held_out_samples"] = n_val
    metrics["train_examples"] = len(train_idx)

    params = parameter_count(net)
    flops = flops_per_prediction(net)
    model_params = block_parameters(L, D, H, a["kv_heads"], a.get("head_dim", D // H), Fn,
                                    a.get("gated", a["family"] != "opt"))  # traces before head_dim was recorded
    result = Predictor(net, {
        "format": FORMAT, "kind": kind, "granularity": granularity, "criterion": criterion,
        "model_fingerprint": manifest["model_fingerprint"], "model": manifest.get("model"),
        "sizes": {"hidden": D, "layers": L, "heads": H, "neurons": Fn, "width": width, "rank": rank},
        "training": {"traces": str(traces), "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                     "label_keep": label_keep if kind == "dejavu" else None, "holdout": holdout,
                     "target_scale": target_scale if kind == "shadow" else None},
        "normalisation": "inputs standardised with mean/std from the training split (tensors mean, std)",
        "cost": {"parameters": params, "flops_per_prediction": flops,
                 "model_block_parameters": model_params,
                 "parameter_fraction": round(params / model_params, 5),
                 "flops_fraction_per_token": round(flops / (2 * model_params), 5),
                 "runs": "once per sequence" if granularity == "sequence" else
                         ("every token" if kind == "shadow" else "every token, per layer")},
        "metrics": metrics,
    })
    return result
