"""Activation thresholds (TEAL-class, training-free): calibration and allocation.

For each layer and each projection input (`THRESHOLD_INPUTS`: the attention input x before q/k/v,
the attention context before o, the MLP input x before gate/up, the MLP hidden h before down), an
entry v counts only when |v| >= t; the weights it would multiply are never read. A threshold is the
s-quantile of |v| on calibration text, so a sparsity s on one input skips about s of the weight bytes
that input feeds.

Calibration (`calibrate_thresholds`, `shadowllm calibrate --criterion activations`):
- first (rotate="sparse", the default) the PCA bases of the residual stream and of each kv head's value
  space, the residual's then refined so that each token's vector is sparsest (models/rotation.py;
  rotate="pca": PCA only), folded into a copy of the model: the same function, but each input's
  energy sits in a few coordinates that are large for every token, so a threshold at the same bytes
  drops less (by how much on SmolLM2: docs/research/thresholds.md).
  Everything below is measured on, and applies to, that rotated model (`Calibration.model_for`);
- histograms of log10|v| per layer and input over every calibration token (fixed bins, so memory is
  flat in the number of samples), from which any quantile is read;
- for the greedy allocation, the cost of each sparsity level of each input: the loss increase that
  thresholding that input alone causes, estimated with the Fisher information at its block's output
  (labels drawn from the model itself, so E[(g . dy)^2] is twice the output KL to second order), on a
  few calibration windows, the way the policy is used: the first half of each window is a dense
  prompt (a prefill), thresholds apply to the second half (decode tokens, whose keys and values the
  later tokens read). (Measured against the alternatives on the eval protocol: the empirical Fisher
  with true labels, |dy|^2 / |h|^2 relative to the residual stream, |g|^2 |dy|^2, |dy|^2, each
  rescaled by a directly measured output KL, and costs taken at the operating point (every other
  input already thresholded); this was the best or tied at every target. Against the previous version
  — every position thresholded, levels of 0.05, one-level greedy steps — its allocation scored lower
  or equal perplexity at five of six budgets on 64 held-out windows (docs/research/thresholds.md).)

Allocation (`threshold_table`): for every sparsity of `GRID` (the fraction of block weight bytes
skipped), a table [L, 4] of thresholds:
- uniform: the same s on every input;
- greedy: from all inputs dense, raise the sparsity level of the input whose next step adds the
  least error per weight byte saved, until the target fraction of block weight bytes is skipped.
  An input that feeds q+k+v or gate+up saves more bytes per level than one that feeds one matrix.
  The steps of an input run along the lower convex hull of its cost curve (a level whose cost is
  not below the line to a later one is jumped over), so the greedy order is also the optimum of the
  additive cost model at every byte budget, not only where the curves are convex.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from shadowllm.models import ShadowError, adapter_for, corpus, fingerprint, sparse_forward
from shadowllm.models.reference import THRESHOLD_INPUTS, attention_block, in_window, keep_large, mlp_block
from shadowllm.models.rotation import (ROTATIONS, check_rotation, fit_rotation, fit_steps, residual_refusal, rotated,
                                      rotation_from_tensors, rotation_tensors)

from .artifacts import check_model, read_manifest

MANIFEST = "thresholds.json"
TENSORS = "thresholds.safetensors"
FORMAT = "shadowllm-thresholds/1"
ALLOCATIONS = ("uniform", "greedy")
GRID = tuple(round(0.01 * i, 2) for i in range(91))  # sparsities a table holds a row for: 0.00 .. 0.90
LEVELS = tuple(round(0.025 * i, 3) for i in range(39))  # greedy steps per input: 0.000 .. 0.950
ROTATION_WINDOWS = 32  # calibration windows the rotations are fitted on (fixed: memory flat in --samples)
LOG_LO, LOG_HI, BINS = -8.0, 4.0, 4096  # log10|v| histogram range: 1e-8 .. 1e4, ~0.7% per bin
# what each input is observed as in the reference forward (models/reference.py observer names)
OBSERVED = {"attn_in": 0, "head_context": 1, "mlp_in": 2, "neuron_act": 3}


def entry_weights(heads, kv_heads: int, head_dim: int, hidden: int, ffn: int, gated: bool) -> list:
    """Weights (parameters) one kept entry of each input reads, in THRESHOLD_INPUTS order: an entry of
    x its channel of q (of the `heads` computed), k and v; one of the context its w_o_t row; one of the
    MLP input its channel of gate and up (fc1 alone when ungated); one of h its w_out_t row."""
    return [(heads + 2 * kv_heads) * head_dim, hidden, (2 if gated else 1) * ffn, hidden]


def input_weights(arch) -> list:
    """entry_weights of a model's shape, every query head computed."""
    return entry_weights(arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden, arch.ffn, arch.gated)


def input_sizes(arch) -> list[int]:
    """Entries of each input, per token: D, H*E, D, F."""
    return [arch.hidden, arch.num_heads * arch.head_dim, arch.hidden, arch.ffn]


def check_grid_sparsity(sparsity: float, flag: str = "--sparsity") -> int:
    """The table row of `sparsity`; one clear line when it is not on the calibrated grid."""
    s = float(sparsity)
    row = int(round(s * 100))
    if not (0 <= row < len(GRID)) or abs(GRID[row] - s) > 1e-6:
        raise ShadowError(f"{flag} {sparsity}: the threshold table holds rows for sparsities 0.00, 0.01, ..., "
                          f"{GRID[-1]:.2f} (multiples of 0.01); give one of those")
    return row


# ---------------------------------------------------------------- calibration
def _histogram(v: torch.Tensor) -> torch.Tensor:
    """Counts of log10|v| over BINS fixed bins; |v| below 1e-8 (zeros included) falls in the first."""
    logs = v.detach().abs().float().clamp(min=10 ** LOG_LO).log10().clamp(max=LOG_HI - 1e-6)
    return torch.histc(logs, bins=BINS, min=LOG_LO, max=LOG_HI).double()


def _quantile(counts: torch.Tensor, s: float) -> float:
    """The value below which a fraction s of the histogram's entries lie (0 for s = 0)."""
    if s <= 0:
        return 0.0
    cum = counts.cumsum(0) / counts.sum()
    i = int(torch.searchsorted(cum, torch.tensor(s, dtype=cum.dtype)).clamp(max=BINS - 1))
    below = float(cum[i - 1]) if i else 0.0
    inside = float(cum[i]) - below
    frac = 0.5 if inside <= 0 else min(max((s - below) / inside, 0.0), 1.0)
    width = (LOG_HI - LOG_LO) / BINS
    return 10 ** (LOG_LO + (i + frac) * width)


@dataclass
class Calibration:
    """Histograms [L, 4, BINS] and greedy costs [L, 4, len(levels)] (None: not measured) of one model,
    with its manifest."""

    manifest: dict
    histograms: torch.Tensor
    costs: torch.Tensor | None
    levels: tuple = LEVELS  # the per-input sparsities the costs were measured at
    # {"residual": [D, D] | None, "values": [L, G, E, E]}: the bases the thresholds are of (None: the model's own)
    rotation: dict | None = None

    def model_for(self, model):
        """The model these thresholds apply to: `model` itself, or its rotated copy (made once and kept
        on the calibration) when the calibration rotated it."""
        if self.rotation is None:
            return model
        cached = getattr(self, "_rotated", None)
        if cached is None or cached[0] is not model:
            self._rotated = (model, rotated(model, self.rotation))
        return self._rotated[1]

    def thresholds(self, sparsities: torch.Tensor, inputs=(0, 1, 2, 3)) -> torch.Tensor:
        """[L, K] thresholds for sparsities [L, K], column k read from the histogram of input inputs[k]."""
        L = self.histograms.shape[0]
        return torch.tensor([[_quantile(self.histograms[l, i], float(sparsities[l, k])) for k, i in enumerate(inputs)]
                             for l in range(L)], dtype=torch.float32)

    def save(self, out: Path):
        from shadowllm.models.paths import atomic_folder

        with atomic_folder(out) as tmp:
            tensors = {"histograms": self.histograms.contiguous()}
            if self.costs is not None:
                tensors["costs"] = self.costs.contiguous()
            tensors.update(rotation_tensors(self.rotation))
            save_file(tensors, str(tmp / TENSORS))
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")


@torch.no_grad()
def calibrate_thresholds(model, tokenizer, out: str | os.PathLike | None, corpus_name="wiki",
                         split: str = "train", samples: int = 128, window: int = 256, greedy_windows: int = 16,
                         batch_size: int = 4, progress: bool = True, rotate: str = "sparse") -> Calibration:
    """Histograms over `samples` windows and greedy costs on the first `greedy_windows` of them (0: none,
    uniform allocation only); written atomically to folder `out` (when given). rotate="sparse" or "pca":
    first the rotations of models/rotation.py (PCA, the residual basis then refined for sparsity or
    not), fitted on the first ROTATION_WINDOWS windows; histograms and costs are then those of the
    rotated model (`Calibration.model_for`)."""
    if rotate not in ROTATIONS:
        raise ShadowError(f"--rotate {rotate!r}: expected one of {', '.join(ROTATIONS)}")
    if samples < 1 or greedy_windows < 0:
        raise ShadowError(f"--samples must be >= 1 and --greedy-windows >= 0, got {samples} and {greedy_windows}")
    if window < 8:
        raise ShadowError(f"--window must be >= 8 tokens, got {window}")
    if out is not None:
        from shadowllm.models.paths import check_out

        out = check_out(out, "--out")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ShadowError(f"--out {out}: " + ("folder exists and is not empty" if out.is_dir() else "is a file") +
                          "; choose a new folder")
    start = time.perf_counter()
    arch = adapter_for(model).arch
    text = corpus(corpus_name)
    windows = text.windows(tokenizer, split, window, limit=samples)
    if windows.shape[0] < samples:
        raise ShadowError(f"--samples {samples}: the {text} {split} split has only {windows.shape[0]} "
                          f"windows of {window} tokens")
    L = arch.num_layers
    rotation = None
    if rotate != "none":
        fit = windows[:ROTATION_WINDOWS]
        bar = tqdm(total=fit_steps(model, fit.shape[0], rotate), desc="fit rotations", disable=not progress)
        rotation = fit_rotation(model, fit, batch_size, progress=bar.update, kind=rotate)
        bar.close()
        why = residual_refusal(model)
        if why is not None and progress:
            print(f"[shadowllm] calibrate: {why}", file=sys.stderr)
    calib = Calibration({}, torch.zeros(L, 4, BINS, dtype=torch.float64), None, rotation=rotation)
    work = calib.model_for(model)
    hist = calib.histograms

    def observe(layer, name, t):
        k = OBSERVED.get(name)
        if k is not None:
            hist[layer, k] += _histogram(t)
        return None

    bar = tqdm(total=samples, desc="calibrate thresholds", unit="window", disable=not progress)
    for b in range(0, samples, batch_size):
        sparse_forward(work, windows[b:b + batch_size], observer=observe)
        bar.update(min(batch_size, samples - b))
    bar.close()
    if greedy_windows:
        calib.costs = _greedy_costs(work, calib, windows[:greedy_windows], batch_size, progress)
    calib.manifest = {
        "format": FORMAT, "model_fingerprint": fingerprint(model), "model": getattr(model, "_shadowllm_source", None),
        "arch": {"layers": L, "hidden": arch.hidden, "heads": arch.num_heads, "kv_heads": arch.num_kv_heads,
                 "head_dim": arch.head_dim, "neurons": arch.ffn, "gated": arch.gated},
        **text.describe(), "split": split, "samples": samples, "window": window,
        "greedy_windows": min(greedy_windows, samples), "inputs": list(THRESHOLD_INPUTS), "levels": list(LEVELS),
        "rotation": None if rotation is None else {
            "kind": rotate, "windows": min(ROTATION_WINDOWS, samples),
            "spaces": [name for name, q in rotation.items() if q is not None], "note": residual_refusal(model)},
        "histogram": {"log10_lo": LOG_LO, "log10_hi": LOG_HI, "bins": BINS},
        "cost": "Fisher (labels sampled from the model) of the block output change, per input and level, "
                "second half of each window thresholded (the first a dense prompt)",
        "seconds": round(time.perf_counter() - start, 1),
    }
    if out is not None:
        calib.save(out)
    return calib


FISHER_SAMPLES = 4  # labels drawn from the model's own distribution per token


def fisher_gradients(model, ids, at=("attn_out", "mlp_out"), generator: torch.Generator | None = None):
    """(the dense forward's observed tensors, {(layer, name) of `at`: [d -log p(y) / d that tensor for
    FISHER_SAMPLES labels y drawn from the model's own next-token distribution]}) on windows ids. With
    sampled (not true) labels, E[(g . dy)^2] is the Fisher quadratic form: twice the KL a change dy of
    that tensor causes at the model's output, to second order. The labels are drawn with `generator`
    (default: a fresh one seeded 0 per call)."""
    seen = {}

    def observe(layer, name, t):
        if name in at:
            seen[(layer, name)] = t
        elif name in ("residual", "attn_in", "head_context", "mlp_in", "neuron_act", "attn_out", "mlp_out"):
            seen[(layer, name)] = t.detach()
        return None

    g = torch.Generator().manual_seed(0) if generator is None else generator
    with torch.enable_grad():
        logits, _ = sparse_forward(model, ids, observer=observe)
        flat = logits.flatten(0, 1).float()
        probs = flat.detach().softmax(-1)
        outs = [k for k in seen if k[1] in at]
        sampled = []
        for i in range(FISHER_SAMPLES):
            labels = torch.multinomial(probs, 1, generator=g)[:, 0]
            loss = torch.nn.functional.cross_entropy(flat, labels, reduction="sum")
            sampled.append(torch.autograd.grad(loss, [seen[k] for k in outs], retain_graph=i + 1 < FISHER_SAMPLES))
    for k in outs:
        seen[k] = seen[k].detach()
    return seen, {k: [s[i] for s in sampled] for i, k in enumerate(outs)}


@torch.no_grad()
def decode_probes(model, windows: torch.Tensor, batch_size: int, progress: bool, desc: str = "threshold costs"):
    """Per batch of `windows` and layer: (layer, probe), the probe measuring what a change of one of the
    layer's inputs does where the policy runs it. As in generation, the first half of each window is a
    dense prompt and only the second half is thresholded: its tokens' block outputs change, and so do
    the keys and values later tokens read, while the prompt's do not (causal), so each block is
    recomputed for the second half only, on the prompt's dense keys and values.

    probe.attention(t_x) / probe.mlp(t_x): the block output's change [B, S/2, D] with x thresholded
    (t_x as attention_block / mlp_block take it); probe.context(t) / probe.hidden(t): the change with
    the context / h thresholded; probe.fisher(block, dy): sum over tokens and sampled labels of
    (g . dy)^2 / FISHER_SAMPLES at the block's output ("attn_out" / "mlp_out"; see fisher_gradients)."""
    adapter = adapter_for(model)
    arch = adapter.arch
    L = arch.num_layers
    bar = tqdm(total=windows.shape[0] * L, desc=desc, unit="layer", disable=not progress)
    for b in range(0, windows.shape[0], batch_size):
        ids = windows[b:b + batch_size]
        seen, grads = fisher_gradients(model, ids)
        B, S = ids.shape
        P = S // 2  # the dense prompt
        ropes = adapter.ropes(torch.arange(S).expand(B, S))
        causal = torch.ones(S, S, dtype=torch.bool).tril()[None].expand(B, S, S)
        empty = torch.zeros(B, arch.num_kv_heads, 0, arch.head_dim)
        for layer in range(L):
            wa, wm = adapter.attention(layer), adapter.mlp(layer)
            rope, allowed = ropes.get(arch.rope_kind(layer)), in_window(causal, arch.window(layer))
            prompt_rope, decode_rope = (None, None) if rope is None else ((rope[0][:, :P], rope[1][:, :P]),
                                                                          (rope[0][:, P:], rope[1][:, P:]))
            x_attn, ctx = seen[(layer, "attn_in")], seen[(layer, "head_context")][:, P:].flatten(2)
            x_mlp, hidden = seen[(layer, "mlp_in")][:, P:], seen[(layer, "neuron_act")][:, P:]
            _, *past = attention_block(arch, wa, x_attn[:, :P], (empty, empty), allowed[:, :P, :P], prompt_rope)

            def attention(t_x=None):
                return attention_block(arch, wa, x_attn[:, P:], past, allowed[:, P:], decode_rope, t_x=t_x)[0]

            def fisher(block, dy, layer=layer):
                gs = grads[(layer, block)]
                return float(sum((g[:, P:] * dy).sum(-1).pow(2).sum() for g in gs)) / len(gs)

            y_attn, y_mlp = attention(), mlp_block(arch.activation, wm, x_mlp)
            yield layer, SimpleNamespace(
                attention=lambda t_x: attention(t_x) - y_attn,
                context=lambda t: (keep_large(ctx, t) - ctx) @ wa.w_o_t,
                mlp=lambda t_x: mlp_block(arch.activation, wm, x_mlp, t_x=t_x) - y_mlp,
                hidden=lambda t: (keep_large(hidden, t) - hidden) @ wm.w_out_t,
                fisher=fisher)
            bar.update(ids.shape[0])
    bar.close()


def _greedy_costs(model, calib: Calibration, windows: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    """costs[l, k, i]: the Fisher estimate of the loss increase (KL) that thresholding input k of layer
    l alone at LEVELS[i] causes, on the decode half of each window (decode_probes). Measured this way
    (the effect at the output, not the size of dy), a layer whose errors the rest of the network
    amplifies costs more than one whose errors it absorbs."""
    L = adapter_for(model).arch.num_layers
    costs = torch.zeros(L, 4, len(LEVELS), dtype=torch.float64)
    thresholds = [calib.thresholds(torch.full((L, 4), s)) for s in LEVELS]
    for layer, p in decode_probes(model, windows, batch_size, progress):
        for i, thr in enumerate(thresholds):
            if i == 0:
                continue
            t = thr[layer]
            costs[layer, 0, i] += p.fisher("attn_out", p.attention(t[0]))
            costs[layer, 1, i] += p.fisher("attn_out", p.context(t[1]))
            costs[layer, 2, i] += p.fisher("mlp_out", p.mlp(t[2]))
            costs[layer, 3, i] += p.fisher("mlp_out", p.hidden(t[3]))
    return costs


def load_calibration(folder: str | os.PathLike, model=None) -> Calibration:
    """A calibration folder; with `model`, refused when it was calibrated on another model."""
    folder = Path(folder)
    manifest = read_manifest(folder, MANIFEST, FORMAT, "--thresholds", "calibrate --criterion activations")
    check_model(manifest, model, f"--thresholds {folder}: thresholds were calibrated")
    try:
        t = load_file(str(folder / TENSORS))
    except Exception as e:
        raise ShadowError(f"{folder / TENSORS}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    L = manifest["arch"]["layers"]
    with_costs = bool(manifest.get("greedy_windows"))
    levels = tuple(manifest.get("levels") or LEVELS)
    if tuple(t.get("histograms", torch.empty(0)).shape) != (L, 4, BINS) or \
            (with_costs and tuple(t.get("costs", torch.empty(0)).shape) != (L, 4, len(levels))):
        raise ShadowError(f"{folder / TENSORS}: expected histograms [{L}, 4, {BINS}]" +
                          (f" and costs [{L}, 4, {len(levels)}]" if with_costs else ""))
    rotation = None
    if manifest.get("rotation"):
        rotation = rotation_from_tensors(t, folder / TENSORS)
        check_rotation(rotation, manifest["arch"], str(folder / TENSORS))
    return Calibration(manifest, t["histograms"].double(), t["costs"].double() if with_costs else None, levels,
                       rotation)


# ---------------------------------------------------------------- allocation
def uniform_sparsities(arch, s: float) -> torch.Tensor:
    return torch.full((arch.num_layers, 4), float(s))


def _hull_steps(costs: torch.Tensor, saved: torch.Tensor) -> list[tuple[float, int]]:
    """The lower convex hull of one input's cost curve (costs[i] at saved[i] bytes, saved increasing,
    from level 0): its segments as (cost per byte saved, level reached), slopes increasing."""
    hull = [0]
    for i in range(1, len(saved)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the line from a to i: the step a -> i is never worse than a -> b -> i
            if (costs[b] - costs[a]) * (saved[i] - saved[a]) >= (costs[i] - costs[a]) * (saved[b] - saved[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return [(float((costs[j] - costs[i]) / (saved[j] - saved[i])), j) for i, j in zip(hull, hull[1:])]


def greedy_schedule(costs: torch.Tensor, arch, levels=LEVELS, per_level: torch.Tensor | None = None):
    """Greedy steps from dense: yields (fraction of block weight bytes skipped, levels [L, K] int). Each
    step raises one of the K inputs of costs [L, K, levels] along its cost curve's lower convex hull,
    cheapest cost per byte first. per_level [K]: the bytes a whole level of each input skips per layer
    (default: the four THRESHOLD_INPUTS', input_weights x input_sizes)."""
    L, K = costs.shape[:2]
    if per_level is None:
        per_level = torch.tensor(input_weights(arch), dtype=torch.float64) * torch.tensor(input_sizes(arch),
                                                                                              dtype=torch.float64)
    total = float(arch.block_parameters)
    lv = torch.tensor(levels, dtype=torch.float64)
    steps = sorted((slope, l, k, j) for l in range(L) for k in range(K)
                   for slope, j in _hull_steps(costs[l, k], per_level[k] * lv))
    level = torch.zeros(L, K, dtype=torch.long)
    yield 0.0, level.clone()
    for _, l, k, j in steps:  # an input's own steps come in order: its hull's slopes increase
        level[l, k] = j
        yield float((per_level * lv[level]).sum()) / total, level.clone()


def levels_at(schedule, sparsities) -> list[torch.Tensor]:
    """The level indices of a greedy_schedule at each of `sparsities` (increasing): the first step of the
    schedule that skips at least that fraction of the block weight bytes."""
    fraction, level = next(schedule)
    out = []
    for s in sparsities:
        while fraction < s - 1e-9:  # the schedule reaches the top level (> GRID[-1]) of every input
            fraction, level = next(schedule)
        out.append(level)
    return out


def greedy_levels(calib: Calibration, arch, sparsities) -> list[torch.Tensor]:
    """The greedy's level indices [L, 4] (into calib.levels) of a calibration at each of `sparsities`."""
    return levels_at(greedy_schedule(calib.costs, arch, calib.levels), sparsities)


class ThresholdTable(tuple):
    """(grid [R], thresholds [R, L, 4]) with `.rotation`, the bases its calibration measured the inputs in
    (None: the model's own): the table applies to `Calibration.model_for(model)`, and the exporter
    refuses a model rotated otherwise."""

    def __new__(cls, grid, table, rotation):
        out = super().__new__(cls, (grid, table))
        out.rotation = rotation
        return out


def threshold_table(calib: Calibration, arch, allocation: str = "greedy") -> ThresholdTable:
    """(grid [R], thresholds [R, L, 4]): the row of sparsity s skips about s of the block weight bytes."""
    if allocation not in ALLOCATIONS:
        raise ShadowError(f"--allocation {allocation!r}: expected one of {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        rows = [calib.thresholds(uniform_sparsities(arch, s)) for s in GRID]
    else:
        if calib.costs is None:
            raise ShadowError("--allocation greedy: this calibration has no greedy costs (made with --greedy-windows 0); "
                              "use --allocation uniform or calibrate again")
        levels = torch.tensor(calib.levels, dtype=torch.float64)
        rows = [calib.thresholds(levels[level]) for level in greedy_levels(calib, arch, GRID)]
    return ThresholdTable(torch.tensor(GRID, dtype=torch.float32), torch.stack(rows), calib.rotation)


def cached_calibration(folder: Path, model, tokenizer, **params) -> Calibration:
    """The calibration in `folder`, made there first (calibrate_thresholds(**params)) when it is missing,
    unreadable or of another model."""
    try:
        return load_calibration(folder, model)
    except ShadowError:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        calibrate_thresholds(model, tokenizer, folder, **params)
    except ShadowError:
        if folder.is_dir() and any(folder.iterdir()):  # another process made the same calibration meanwhile
            return load_calibration(folder, model)
        raise
    return load_calibration(folder, model)


# The built-in calibration's parameters (the defaults of calibrate_thresholds): part of its cache key.
BUILTIN_VERSION = "v5"
BUILTIN = Path(__file__).resolve().parent / "builtin"  # shipped calibrations, one folder per model


def builtin_name(model, rotate: str = "sparse") -> str:
    """The folder name of `model`'s built-in calibration: its fingerprint, corpus, samples x window and
    the method's version (a change to the method bumps it, so no stale calibration is ever read), and
    the rotation when it is not the default. The window shrinks to the model's positions when they are
    fewer than 256."""
    window = min(256, adapter_for(model).arch.max_positions)
    suffix = "" if rotate == "sparse" else f"-rotate-{rotate}"
    return f"{fingerprint(model).split(':')[1][:16]}-wiki-128x{window}-{BUILTIN_VERSION}{suffix}"


def default_calibration(model, tokenizer, progress: bool = True, rotate: str = "sparse") -> Calibration:
    """The built-in calibration of this model on the wiki train split: shipped with the package for the
    embedded model (predictor/builtin/, made by scripts/builtin_calibration.py with this module's own
    calibrate_thresholds; tests/predictor/test_builtin_calibration.py recomputes part of it), else made
    once (with a progress bar) and cached."""
    from shadowllm.models.loading import cache_root

    name = builtin_name(model, rotate)
    if (BUILTIN / name / MANIFEST).is_file():
        return load_calibration(BUILTIN / name, model)
    window = min(256, adapter_for(model).arch.max_positions)
    return cached_calibration(cache_root() / "thresholds" / name, model, tokenizer, window=window, progress=progress,
                              rotate=rotate)
