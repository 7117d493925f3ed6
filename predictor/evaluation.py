"""Accuracy evaluation (`shadowllm eval`): perplexity vs sparsity for every mask method.

Protocol (as deployment runs it): each held-out window is a prompt (its first `prompt` tokens) plus
a continuation; perplexity counts the continuation only. Everything runs through the sparse
reference forward, so a masked head or neuron contributes nothing.
- per-sequence masks (static, random, shadow/sequence, oracle/sequence) come from the prompt alone
  (shadow reads the layer-0 attention output at the prompt's last token) and apply to every position;
- per-token masks (shadow/token, dejavu, gate, oracle/token) are made for each continuation token
  from what that token's own forward pass has seen, as decoding would (the prompt runs dense, as a
  dense prefill): shadow/token from the token's layer-0 attention output, dejavu layer by layer from
  the previous layer's residual input *in the sparse run*, gate from |act(gate_proj x)| of the layer;
- the oracle ranks by importance computed on the whole window: it sees the future, so it is a
  ceiling, not a method.
Second metric: last-word accuracy (LAMBADA-style): given an article's text up to its final word,
is every token of that word the greedy prediction?
Every row carries `bytes_fraction`: weights read per generated token (attention + MLP of all layers,
plus the predictor's own weights when it runs per token) over the dense model's.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shadowllm.models import ShadowError, adapter_for, corpus, sparse_forward
from shadowllm.models.adapters import activation_fn

from .allocation import check_sparsity, keep_mask
from .criteria import importance
from .predictors import Predictor, split_scores

TARGETS = ("heads", "neurons", "both")


@dataclass
class Row:
    method: str
    granularity: str
    target: str
    sparsity: float
    criterion: str | None
    ppl: float
    windows: int
    bytes_fraction: float
    lastword_acc: float | None = None
    lastword_n: int = 0
    predictor: str | None = None  # folder name of the predictor a row used (two of one kind stay apart)
    allocation: str | None = None  # threshold rows: uniform | greedy
    head_sparsity: float | None = None  # shadow+threshold rows: the heads the predictor drops
    weights: str = "fp32"  # the projections' format (models/quant.py); the LM head int8 when quantized
    bytes_per_token: int | None = None  # weight bytes a decode token reads: blocks at bytes_fraction, LM head


# Methods a deployed model can run (`shadowllm export --policy ...`); the others are baselines or ceilings.
EXPORTABLE = ("dense", "static", "shadow", "dejavu", "threshold", "shadow+threshold")


class _Stop(Exception):
    pass


@torch.no_grad()
def layer0_attention(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The layer-0 attention output [B, S, D] (ShadowLLM's input), running layer 0 only."""
    captured = {}

    def observe(layer, name, t):
        if name == "attn_out" and layer == 0:
            captured["x"] = t
            raise _Stop
    try:
        sparse_forward(model, input_ids, observer=observe)
    except _Stop:
        pass
    return captured["x"]


# ---------------------------------------------------------------- mask methods
class Method:
    """Makes the masks of one evaluation row for a batch of windows sharing a prompt length."""

    name = "?"
    granularity = "sequence"
    criterion = None
    predictor_params_per_token = 0

    def __init__(self, target: str, sparsity: float, allocation: str):
        self.target, self.sparsity, self.allocation = target, sparsity, allocation

    def _keep(self, scores, dense_layers=(0,)):
        return keep_mask(scores, self.sparsity, self.allocation, dense_layers=dense_layers)

    def masks(self, model, ids, prompt):
        """(head_mask, neuron_mask, observer) for sparse_forward; masks per sequence or per token."""
        raise NotImplementedError

    def thresholds(self, model, ids, prompt):
        """Activation thresholds for sparse_forward ([B, S, L, 4]) or None."""
        return None

    def weights_read(self, arch, heads, neurons, prompt) -> float:
        """Mean block weights read per generated token under the masks of the last batch."""
        return _weights_read(arch, heads, neurons, prompt, False, kv_all=self.granularity == "token")

    def _select(self, heads, neurons):
        return (heads if self.target in ("heads", "both") else None,
                neurons if self.target in ("neurons", "both") else None)


class Dense(Method):
    name = "dense"

    def masks(self, model, ids, prompt):
        return None, None, None


class Fixed(Method):
    """static (aggregated importance) or random: the same kind of mask for every input."""

    def __init__(self, name, scores_fn, *args):
        super().__init__(*args)
        self.name, self.scores_fn = name, scores_fn

    def masks(self, model, ids, prompt):
        h, n = self.scores_fn(ids.shape[0])
        return (*self._select(self._keep(h), self._keep(n)), None)


class PredictorMethod(Method):
    """A method driven by a trained predictor; one that runs every token pays for its weights per token."""

    def __init__(self, predictor: Predictor, *args):
        super().__init__(*args)
        self.predictor, self.criterion = predictor, predictor.manifest["criterion"]
        if self.granularity == "token":
            self.predictor_params_per_token = sum(p.numel() for p in predictor.net.parameters())


class ShadowSequence(PredictorMethod):
    name, granularity = "shadow", "sequence"

    def masks(self, model, ids, prompt):
        x = layer0_attention(model, ids[:, :prompt])[:, prompt - 1]
        h, n = split_scores(self.predictor.net(x), model.config.num_attention_heads)
        return (*self._select(self._keep(h), self._keep(n)), None)


def _dense_token_masks(ids, arch):
    """All-True per-token masks [B, S, L, ·]: the prompt stays dense, continuation slots are filled later."""
    B, S = ids.shape
    heads = torch.ones(B, S, arch.num_layers, arch.num_heads, dtype=torch.bool)
    neurons = torch.ones(B, S, arch.num_layers, arch.ffn, dtype=torch.bool)
    return heads, neurons


class ShadowToken(PredictorMethod):
    name, granularity = "shadow", "token"

    def masks(self, model, ids, prompt):
        arch = adapter_for(model).arch
        heads, neurons = _dense_token_masks(ids, arch)
        x = layer0_attention(model, ids)[:, prompt:]
        h, n = split_scores(self.predictor.net(x), arch.num_heads)
        heads[:, prompt:], neurons[:, prompt:] = self._keep(h), self._keep(n)
        return (*self._select(heads, neurons), None)


class DejaVu(PredictorMethod):
    name, granularity = "dejavu", "token"

    def masks(self, model, ids, prompt):
        arch = adapter_for(model).arch
        heads, neurons = _dense_token_masks(ids, arch)
        H, L = arch.num_heads, arch.num_layers

        def observe(layer, name, t):
            # the residual input of layer l-1 (in the sparse run) predicts layer l: lookahead
            if name == "residual" and layer + 1 < L:
                logits = self.predictor.net.layer(layer + 1, t[:, prompt:].float())  # [B, S', H+F]
                heads[:, prompt:, layer + 1] = self._keep(logits[..., None, :H], dense_layers=())[..., 0, :]
                neurons[:, prompt:, layer + 1] = self._keep(logits[..., None, H:], dense_layers=())[..., 0, :]
            return None
        return (*self._select(heads, neurons), observe)


class Gate(Method):
    """Predictor-free, per token (Llama family): keep the neurons with the largest |act(gate_proj x)|."""

    name, granularity = "gate", "token"

    def weights_read(self, arch, heads, neurons, prompt) -> float:
        return _weights_read(arch, heads, neurons, prompt, True, kv_all=True)

    def masks(self, model, ids, prompt):
        adapter = adapter_for(model)
        arch = adapter.arch
        _, neurons = _dense_token_masks(ids, arch)
        act = activation_fn(arch.activation)

        def observe(layer, name, t):
            if name == "mlp_in" and layer > 0:
                score = act(t[:, prompt:] @ adapter.mlp(layer).w_gate.t()).abs()
                neurons[:, prompt:, layer] = self._keep(score[..., None, :], dense_layers=())[..., 0, :]
            return None
        return None, neurons, observe


class Threshold(Method):
    """Activation thresholds (training-free, per token): inputs below their threshold are skipped.

    The prompt runs dense (thresholds 0, as a dense prefill); every continuation token uses the row
    of `sparsity` of the calibrated table. Weight bytes are counted from the entries each token kept."""

    name, granularity = "threshold", "token"

    def __init__(self, table: torch.Tensor, threshold_allocation: str, *args):
        super().__init__(*args)
        from .thresholds import check_grid_sparsity

        self.row = table[check_grid_sparsity(self.sparsity)]  # [L, 4]
        self.threshold_allocation = threshold_allocation
        self.kept = None

    def masks(self, model, ids, prompt):
        return None, None, self._counter(adapter_for(model).arch, prompt, None)

    def thresholds(self, model, ids, prompt):
        B, S = ids.shape
        t = torch.zeros(B, S, *self.row.shape)
        t[:, prompt:] = self.row
        return t

    def _counter(self, arch, prompt, head_keep):
        """An observer counting, per continuation token and layer, the entries each input keeps."""
        L = arch.num_layers
        self.kept = {}

        from .thresholds import OBSERVED

        def observe(layer, name, t):
            k = OBSERVED.get(name)
            if k is None:
                return None
            kept = t[:, prompt:].abs() >= self.row[layer, k]
            if k == 1:
                if head_keep is not None:  # heads the predictor dropped are not read either
                    kept = kept & head_keep[:, prompt:, layer, :, None]
                kept = kept.flatten(2)
            self.kept.setdefault(k, torch.zeros(*kept.shape[:2], L))[..., layer] = kept.sum(-1).float()
            return None
        return observe

    def weights_read(self, arch, heads, neurons, prompt) -> float:
        from .thresholds import entry_weights

        q_rows = (torch.full((arch.num_layers,), float(arch.num_heads)) if heads is None
                  else heads[:, prompt:].float().sum(-1))  # kept query heads per token and layer
        # kv_policy=all (per-token masks): k and v of every kv head
        weights = entry_weights(q_rows, arch.num_kv_heads, arch.head_dim, arch.hidden, arch.ffn, arch.gated)
        read = sum(self.kept[k] * weights[k] for k in range(4))
        return read.sum(-1).mean().item()


class ShadowThreshold(Threshold):
    """shadow+threshold: heads from the per-token ShadowLLM predictor (its strong side), inputs
    thresholded as in `threshold`; `head_sparsity` of the heads dropped per token (layer 0 dense)."""

    name = "shadow+threshold"

    def __init__(self, predictor: Predictor, head_sparsity: float, *args):
        super().__init__(*args)
        self.predictor, self.criterion, self.head_sparsity = predictor, predictor.manifest["criterion"], head_sparsity
        self.predictor_params_per_token = sum(p.numel() for p in predictor.net.parameters())

    def masks(self, model, ids, prompt):
        arch = adapter_for(model).arch
        heads, _ = _dense_token_masks(ids, arch)
        x = layer0_attention(model, ids)[:, prompt:]
        h, _ = split_scores(self.predictor.net(x), arch.num_heads)
        heads[:, prompt:] = keep_mask(h, self.head_sparsity, "per_layer")
        return heads, None, self._counter(arch, prompt, heads)


class Oracle(Method):
    name = "oracle"

    def __init__(self, criterion: str, granularity: str, cache: dict, *args):
        super().__init__(*args)
        self.criterion, self.granularity, self.cache = criterion, granularity, cache

    def masks(self, model, ids, prompt):
        # True importance does not depend on target or sparsity: compute it once per window batch.
        key = (self.criterion, tuple(ids.shape), hash(ids.numpy().tobytes()))
        if key not in self.cache:
            self.cache[key] = importance(model, ids, [self.criterion])
        imp = self.cache[key]
        if self.granularity == "sequence":
            h, n = imp.heads[self.criterion], imp.neurons[self.criterion]
            return (*self._select(self._keep(h), self._keep(n)), None)
        arch = adapter_for(model).arch
        heads, neurons = _dense_token_masks(ids, arch)
        heads[:, prompt:] = self._keep(imp.token_heads[self.criterion][:, prompt:])
        neurons[:, prompt:] = self._keep(imp.token_neurons[self.criterion][:, prompt:].float())
        return (*self._select(heads, neurons), None)


# ---------------------------------------------------------------- measuring
def _weights_read(arch, heads, neurons, prompt, gate: bool, kv_all: bool) -> float:
    """Mean block weights read per generated token (in parameters) under the given masks."""
    D, E, G = arch.hidden, arch.head_dim, arch.num_kv_heads
    per_group = arch.heads_per_group
    mlp_mats = 3 if arch.gated else 2
    L = arch.num_layers
    if heads is None:
        attn = L * (2 * arch.num_heads + 2 * G) * E * D
    else:
        h = heads[:, prompt:] if heads.dim() == 4 else heads[:, None]
        active_heads = h.float().sum(-1)  # [B, T, L]
        groups = h.view(*h.shape[:-1], G, per_group).any(-1).float().sum(-1)
        kv = G if kv_all else groups
        attn = ((2 * active_heads + 2 * kv) * E * D).sum(-1).mean().item()
    if neurons is None:
        mlp = L * mlp_mats * arch.ffn * D
    else:
        n = neurons[:, prompt:] if neurons.dim() == 4 else neurons[:, None]
        active = n.float().sum(-1)  # [B, T, L]
        if gate:  # gate reads its whole gate projection, then up/down rows of the kept neurons
            per_layer = arch.ffn * D + 2 * active * D
            per_layer[..., 0] = mlp_mats * arch.ffn * D
        else:
            per_layer = mlp_mats * active * D
        mlp = per_layer.sum(-1).mean().item()
    return attn + mlp


@torch.no_grad()
def _logits(model, ids, method, prompt):
    heads, neurons, observer = method.masks(model, ids, prompt)
    kv_policy = "active" if method.granularity == "sequence" else "all"
    logits, _ = sparse_forward(model, ids, heads, neurons, kv_policy=kv_policy, observer=observer,
                               thresholds=method.thresholds(model, ids, prompt))
    return logits, heads, neurons


def evaluate_method(model, method: Method, windows: torch.Tensor, prompt: int, lastword=(), batch_size: int = 4):
    """(ppl, bytes_fraction, lastword_acc) of one method over `windows` and last-word items."""
    arch = adapter_for(model).arch
    nll, count, read = 0.0, 0, []
    for start in range(0, windows.shape[0], batch_size):
        w = windows[start:start + batch_size]
        logits, heads, neurons = _logits(model, w, method, prompt)
        V = logits.shape[-1]
        nll += float(F.cross_entropy(logits[:, prompt - 1:-1].reshape(-1, V).float(), w[:, prompt:].reshape(-1),
                                     reduction="sum"))
        count += w[:, prompt:].numel()
        read.append(method.weights_read(arch, heads, neurons, prompt))
    bytes_fraction = (sum(read) / len(read) + method.predictor_params_per_token) / arch.block_parameters
    hits = 0
    for context, target in lastword:
        ids = torch.tensor([context + target])
        logits, _, _ = _logits(model, ids, method, len(context))
        pred = logits[0, len(context) - 1:-1].argmax(-1)
        hits += int(pred.tolist() == target)
    acc = hits / len(lastword) if lastword else None
    return math.exp(nll / count), bytes_fraction, acc


def lastword_items(tokenizer, split: str = "test", n: int = 64, max_context: int = 96, text_corpus="wiki"):
    """(context ids, final-word ids) for the first n articles of a split whose last word is alphabetic."""
    items = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for _, text in corpus(text_corpus).articles(split):
        m = re.search(r"\s([A-Za-z][\w'-]*)\W*$", text)
        if not m:
            continue
        context = tokenizer(text[: m.start(1)].rstrip(), add_special_tokens=False)["input_ids"][-max_context:]
        target = tokenizer(" " + m.group(1), add_special_tokens=False)["input_ids"]
        items.append((bos + context, target))
        if len(items) == n:
            break
    return items


WINDOW, PROMPT = 256, 128  # the protocol's defaults: 128-token prompt + 128 scored
MIN_WINDOW = 16  # fewer tokens than this leave no prompt and continuation worth scoring


def scoring_window(tokenizer, text_corpus, split: str = "test", window: int | None = None,
                   prompt: int | None = None, max_windows: int = 16,
                   max_positions: int | None = None) -> tuple[int, int, str]:
    """(window, prompt, one line saying what will be scored). The split's documents are one token
    stream (joined with a blank line, BOS at each window's start) cut into windows, as llama.cpp's
    perplexity tool and lm-eval's rolling scores treat a text. Unset window / prompt adapt to what is
    there: the protocol's 256 / 128 (fewer when the model has fewer positions), or for a split shorter
    than one window the whole split as one window with its first half as the prompt; a split of fewer
    than MIN_WINDOW tokens is refused."""
    text = corpus(text_corpus)
    tokens = text.tokens(tokenizer, split).numel() + (tokenizer.bos_token_id is not None)
    documents = len(text.articles(split))
    if window is None:
        if tokens < MIN_WINDOW:
            raise ShadowError(f"corpus {text}: the {split} split has {documents} documents and {tokens} tokens; "
                              f"eval needs at least {MIN_WINDOW} (a prompt and a continuation): give more text")
        window = min(WINDOW, tokens, max_positions or WINDOW)
    if prompt is None:
        prompt = min(PROMPT, window // 2)
    if not 0 < prompt < window:
        raise ShadowError(f"--prompt {prompt} must lie between 0 and --window {window}")
    per_window = window - (tokenizer.bos_token_id is not None)
    n = min(max_windows, (tokens - (tokenizer.bos_token_id is not None)) // per_window)
    if n == 0:
        raise ShadowError(f"corpus {text}: the {split} split ({documents} documents, {tokens} tokens) has no window "
                          f"of {window} tokens; give more text or a shorter --window")
    line = (f"scoring corpus {text}, {split} split: {documents} documents, {tokens} tokens as one stream; "
            f"{n} window{'s' if n > 1 else ''} of {window} tokens, the first {prompt} the prompt, "
            f"{window - prompt} scored")
    return window, prompt, line


def evaluate(model, tokenizer, predictors: list[Predictor], sparsities, targets=TARGETS, split: str = "test",
             max_windows: int = 16, window: int = 256, prompt: int = 128, static_scores=None,
             oracle_criteria=("l2_norm",), allocation: str = "per_layer", lastword: int = 32, seed: int = 0,
             methods=None, progress: bool = True, threshold_tables: dict | None = None,
             hybrid_head_sparsity=(0.25,), text_corpus="wiki", threshold_model=None) -> list[Row]:
    """Every method x target x sparsity, through the sparse reference, on `text_corpus` (a name, a
    path or a Corpus: models/corpus.py). Returns the rows.

    threshold_tables: {"uniform" | "greedy": thresholds [R, L, 4] of predictor.thresholds.GRID}: rows of
    method `threshold` per table and sparsity, and `shadow+threshold` per token-granularity shadow
    predictor, table and head sparsity of `hybrid_head_sparsity`. threshold_model: the model those rows
    run on when their calibration rotated it (predictor.thresholds.Calibration.model_for); default `model`."""
    for s in sparsities:
        check_sparsity(s)
    for t in targets:
        if t not in TARGETS:
            raise ShadowError(f"--target {t!r}: expected one of {', '.join(TARGETS)}")
    if not 0 < prompt < window:
        raise ShadowError(f"--prompt {prompt} must lie between 0 and --window {window}")
    arch = adapter_for(model).arch
    text = corpus(text_corpus)
    windows = text.windows(tokenizer, split, window, limit=max_windows)
    if windows.shape[0] == 0:
        raise ShadowError(f"corpus {text}: the {split} split ({len(text.articles(split))} documents) has no window of "
                          f"{window} tokens; give more text or a shorter --window")
    items = lastword_items(tokenizer, split, lastword, text_corpus=text) if lastword else []
    static = static_scores
    oracle_cache: dict = {}
    thresholded_model = model if threshold_model is None else threshold_model
    # the hybrid's predictors, fed the (rotated) model's layer-0 output in the basis they were trained on
    hybrid = [p.fed_by(thresholded_model) for p in predictors if p.kind == "shadow" and p.granularity == "token"]

    def random_scores(seed_offset):
        g = torch.Generator().manual_seed(seed + seed_offset)  # a fresh random mask for every window
        return lambda b: (torch.rand(b, arch.num_layers, arch.num_heads, generator=g),
                          torch.rand(b, arch.num_layers, arch.ffn, generator=g))

    def plan():
        yield Dense("both", 0.0, allocation)
        for target in targets:
            for s in sparsities:
                args = (target, s, allocation)
                if static is not None:
                    yield Fixed("static", lambda b: (static[0].expand(b, -1, -1), static[1].expand(b, -1, -1)), *args)
                yield Fixed("random", random_scores(int(s * 1000)), *args)
                for p in predictors:
                    if p.kind == "shadow":
                        yield (ShadowSequence if p.granularity == "sequence" else ShadowToken)(p, *args)
                    else:
                        yield DejaVu(p, *args)
                if arch.gated and target == "neurons":
                    yield Gate(*args)
                for c in oracle_criteria:
                    for gran in ("sequence", "token"):
                        yield Oracle(c, gran, oracle_cache, *args)
        for name, table in (threshold_tables or {}).items():
            for s in sparsities:
                args = (table, name, "both", s, allocation)
                yield Threshold(*args)
                for p in hybrid:
                    for hs in hybrid_head_sparsity:
                        yield ShadowThreshold(p, hs, *args)

    todo = [m for m in plan() if methods is None or m.name in methods]
    rows = []
    for m in tqdm(todo, desc="eval", unit="row", disable=not progress):
        ppl, frac, acc = evaluate_method(thresholded_model if isinstance(m, Threshold) else model, m, windows,
                                         prompt, items)
        predictor = getattr(m, "predictor", None)
        source = predictor.source if predictor is not None else None
        rows.append(Row(m.name, m.granularity, m.target if m.name != "dense" else "-", m.sparsity, m.criterion,
                        round(ppl, 4), windows.shape[0], round(frac, 4),
                        None if acc is None else round(acc, 4), len(items),
                        Path(source).name if source else None, getattr(m, "threshold_allocation", None),
                        getattr(m, "head_sparsity", None)))
    return rows


# ---------------------------------------------------------------- reports
def rows_from_json(path: str | os.PathLike) -> tuple[list[Row], dict]:
    """Rows and header of a report written by `write_reports` (to redraw tables and plots)."""
    data = json.loads(Path(path).read_text())
    return [Row(**r) for r in data.pop("rows")], data


def write_reports(rows: list[Row], out_prefix: str | os.PathLike, command: str, meta: dict):
    """<prefix>.json (rows + command), <prefix>.md (tables + gap summary), <prefix>.png (plot)."""
    from shadowllm.models.paths import check_out

    prefix = check_out(out_prefix, "--out")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": command, **meta, "rows": [asdict(r) for r in rows]}
    # PREFIX + suffix (not with_suffix: "eval-s0.5" must not become "eval-s0.json"), each written whole
    for suffix, write in ((".json", lambda t: t.write_text(json.dumps(data, indent=2) + "\n")),
                          (".md", lambda t: t.write_text(markdown(rows, command))),
                          (".png", lambda t: plot(rows, t))):
        tmp = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}{suffix}")
        try:
            write(tmp)
            os.replace(tmp, prefix.with_name(prefix.name + suffix))
        finally:
            tmp.unlink(missing_ok=True)


def _label(r: Row) -> str:
    label = r.method if r.method in ("dense", "random", "gate", "static") else f"{r.method}/{r.granularity}"
    if r.method in ("threshold", "shadow+threshold"):
        label = f"{r.method}/{r.allocation}"
    label += f" ({r.criterion})" if r.method in ("oracle", "shadow", "dejavu", "shadow+threshold") else ""
    if r.head_sparsity is not None:
        label += f" heads-{r.head_sparsity:g}"
    return label + (f" [{r.predictor}]" if r.predictor else "")


def rows_table(rows: list[Row]) -> list[str]:
    """The markdown table of every row (the report's first table; the demo prints it alone)."""
    named = any(r.predictor for r in rows)  # reports written before rows named their predictor lack the column
    allocated = any(r.allocation for r in rows)  # threshold rows: their allocation (and the hybrid's heads)
    sized = any(r.bytes_per_token for r in rows)  # reports written before rows carried their format lack these
    lines = ["| method | granularity | criterion | " + ("predictor | " if named else "") +
             ("allocation | " if allocated else "") + "target | sparsity | ppl | last-word acc | bytes_fraction |" +
             (" weights | MB per token |" if sized else ""),
             "|---|---|---|" + ("---|" if named else "") + ("---|" if allocated else "") + "---|---:|---:|---:|---:|" +
             ("---|---:|" if sized else "")]
    for r in rows:
        acc = "" if r.lastword_acc is None else f"{r.lastword_acc:.3f}"
        alloc = (r.allocation or "") + (f", heads {r.head_sparsity:g}" if r.head_sparsity is not None else "")
        lines.append(f"| {r.method} | {r.granularity} | {r.criterion or ''} | " +
                     (f"{r.predictor or ''} | " if named else "") + (f"{alloc} | " if allocated else "") +
                     f"{r.target} | {r.sparsity} | {r.ppl:.2f} | {acc} | {r.bytes_fraction:.3f} |" +
                     (f" {r.weights} | {(r.bytes_per_token or 0) / 1e6:.1f} |" if sized else ""))
    return lines


def dominated_by_export(rows: list[Row]) -> list[str]:
    """For every row that is no oracle and no exportable policy: the exportable row that dominates it
    (no more bytes, no higher perplexity), or 'none'. Markdown table lines."""
    exportable = [r for r in rows if r.method in EXPORTABLE]
    lines = []
    for r in rows:
        if r.method in EXPORTABLE or r.method == "oracle":
            continue
        best = min((e for e in exportable if e.bytes_fraction <= r.bytes_fraction and e.ppl <= r.ppl),
                   key=lambda e: e.ppl, default=None)
        by = f"{_label(best)} at {best.sparsity} ({best.bytes_fraction:.3f}, {best.ppl:.2f})" if best else "**none**"
        lines.append(f"| {_label(r)} | {r.target} | {r.sparsity} | {r.bytes_fraction:.3f} | {r.ppl:.2f} | {by} |")
    return lines


def markdown(rows: list[Row], command: str) -> str:
    lines = [f"Command: `{command}`", "", *rows_table(rows)]
    dominated = dominated_by_export(rows)
    if dominated and any(r.method in ("threshold", "shadow+threshold") for r in rows):
        lines += ["", "Each baseline (neither an exportable policy nor an oracle) against the best exportable row "
                  "that dominates it (no more weight bytes, no higher perplexity):", "",
                  "| baseline | target | sparsity | bytes_fraction | ppl | dominated by (bytes_fraction, ppl) |",
                  "|---|---|---:|---:|---:|---|", *dominated]
    gap = []
    for r in rows:
        if r.method != "shadow":
            continue
        static = next((x for x in rows if x.method == "static" and x.target == r.target and x.sparsity == r.sparsity), None)
        oracle = next((x for x in rows if x.method == "oracle" and x.target == r.target and x.sparsity == r.sparsity
                       and x.granularity == r.granularity and x.criterion == r.criterion), None)
        if static and oracle and static.ppl != oracle.ppl:
            closed = (static.ppl - r.ppl) / (static.ppl - oracle.ppl)
            gap.append(f"| {r.target} | {r.sparsity} | {r.granularity} | {r.criterion} | {static.ppl:.2f} | "
                       f"{r.ppl:.2f} | {oracle.ppl:.2f} | {closed:.2f} |")
    if gap:  # needs static and oracle rows
        lines += ["", "Gap closed, (ppl_static - ppl_shadow) / (ppl_static - ppl_oracle), oracle of the same "
                  "granularity and criterion as the predictor:", "",
                  "| target | sparsity | granularity | criterion | static | shadow | oracle | gap closed |",
                  "|---|---:|---|---|---:|---:|---:|---:|", *gap]
    gate_rows = [r for r in rows if r.method == "gate"]
    if gate_rows:
        lines += ["", "Against gate at the same weight bytes read per token (each method's perplexity "
                  "interpolated, log-linearly, at the gate row's bytes_fraction):", "",
                  "| gate sparsity | bytes_fraction | gate ppl | " + " | ".join(_comparable(rows)) + " |",
                  "|---:|---:|---:|" + "---:|" * len(_comparable(rows))]
        for g in gate_rows:
            cells = []
            for label in _comparable(rows):
                pts = sorted((r.bytes_fraction, r.ppl) for r in rows if r.target == g.target and _label(r) == label)
                cells.append(_interpolate(pts, g.bytes_fraction))
            lines.append(f"| {g.sparsity} | {g.bytes_fraction:.3f} | {g.ppl:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _comparable(rows):
    return sorted({_label(r) for r in rows if r.method in ("shadow", "dejavu", "static")})


def _interpolate(points, x) -> str:
    """ppl at bytes fraction x from (bytes, ppl) points, log-linear; '' outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x1 > x0:
            w = (x - x0) / (x1 - x0)
            return f"{math.exp((1 - w) * math.log(y0) + w * math.log(y1)):.2f}"
    return ""


def _pareto(ax, rows: list[Row], dense):
    """Perplexity vs fraction of block weight bytes read per token, every method and target on one axis."""
    for label in sorted({_label(r) for r in rows if r.method != "dense"}):
        for target in TARGETS:
            pts = sorted((r.bytes_fraction, r.ppl) for r in rows if r.target == target and _label(r) == label)
            if not pts:
                continue
            threshold = label.startswith(("threshold", "shadow+threshold"))
            name = label if threshold else f"{label} / {target}"
            style = dict(marker="o", linewidth=2.2) if threshold else dict(marker=".", linewidth=0.8, alpha=0.7)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    if dense:
        ax.plot([1.0], [dense], marker="*", markersize=12, color="black", linestyle="", label="dense")
        ax.set_ylim(dense * 0.95, dense * 5)  # the front; random masks and heavy sparsity run far above
    ax.set_yscale("log")
    ax.set_xlabel("fraction of block weight bytes read per generated token")
    ax.set_ylabel("perplexity (continuation)")
    ax.set_title("accuracy per byte (lower left is better; y clipped at 5x dense)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot(rows: list[Row], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in TARGETS if any(r.target == t for r in rows)]
    pareto = any(r.method in ("threshold", "shadow+threshold") for r in rows)
    n = max(1, len(targets))
    dense = next((r.ppl for r in rows if r.method == "dense"), None)
    if pareto:  # the Pareto plot on a row of its own above the per-target panels
        fig = plt.figure(figsize=(5.5 * n, 11))
        grid = fig.add_gridspec(2, n, height_ratios=[1.2, 1])
        _pareto(fig.add_subplot(grid[0, : max(1, n - 1)]), rows, dense)
        axes = [[fig.add_subplot(grid[1, i]) for i in range(n)]]
    else:
        fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.5), squeeze=False)
    for ax, target in zip(axes[0], targets):
        labels = sorted({_label(r) for r in rows if r.target == target})
        for label in labels:
            pts = sorted((r.sparsity, r.ppl) for r in rows if r.target == target and _label(r) == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if dense:
            ax.axhline(dense, color="black", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_title(f"target: {target}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("perplexity (continuation)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if pareto:  # legends sit outside their axes: let the saved area grow instead of shrinking the axes
        fig.subplots_adjust(hspace=0.25, wspace=0.3)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
