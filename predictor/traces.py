"""Trace collection (`shadowllm calibrate`): importance scores and predictor inputs, streamed to disk.

One batched forward + backward serves every requested criterion, so all criteria see the same
samples. Each sample (a corpus window) stores:
- `shadow_last` [D]: the layer-0 attention output at the window's last token (ShadowLLM's input for
  per-sequence masks) and `shadow_tok` [K, D] at K sampled positions (its input per token);
- `positions` [K]: those positions (shared by the samples of a shard), `window_index`;
- `dejavu_tok` [K, L, D] (fp16): each layer's residual input at those positions (DejaVu lookahead);
- `seq.<criterion>.heads|neurons` [L, H] / [L, F]: scores aggregated over the window;
- `tok.<criterion>.heads|neurons` [K, L, H] / [K, L, F] (neurons fp16): per-token scores,
  so both granularities train from one run.

Samples are grouped in shards of `shard_size` written atomically (temp file + rename); the manifest
`traces.json` is rewritten after each shard, so memory stays bounded whatever N is and an
interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from shadowllm.models import ShadowError, adapter_for, corpus, fingerprint

from .artifacts import check_model, read_manifest
from .criteria import SEQUENCE_ONLY, check_criteria, importance

MANIFEST = "traces.json"
FORMAT = "shadowllm-traces/1"


def _atomic_json(path: Path, data: dict):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _positions(seed: int, first_index: int, length: int, k: int) -> torch.Tensor:
    """K sorted token positions in [1, length-1) for the shard starting at window `first_index`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + first_index)
    k = min(k, length - 2)
    return torch.randperm(length - 2, generator=g)[:k].sort().values + 1


def calibrate(model, tokenizer, out: str | os.PathLike, criteria, corpus_name="wiki", split: str = "train",
              samples: int = 256, window: int = 256, batch_size: int = 4, token_positions: int = 16,
              shard_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Collect traces into folder `out` (resuming a matching, unfinished run). Returns the manifest."""
    criteria = check_criteria(criteria)
    if samples < 1:
        raise ShadowError(f"--samples must be >= 1, got {samples}")
    if window < 8:
        raise ShadowError(f"--window must be >= 8 tokens, got {window}")
    arch = adapter_for(model).arch
    out = Path(out)
    text = corpus(corpus_name)
    params = {
        "format": FORMAT, "model_fingerprint": fingerprint(model), "model": getattr(model, "_shadowllm_source", None),
        "arch": {"layers": arch.num_layers, "hidden": arch.hidden, "heads": arch.num_heads,
                 "kv_heads": arch.num_kv_heads, "head_dim": arch.head_dim, "neurons": arch.ffn,
                 "gated": arch.gated, "family": arch.family},
        **text.describe(), "split": split, "samples": samples, "window": window, "criteria": criteria,
        "token_positions": min(token_positions, window - 2), "shard_size": shard_size, "seed": seed,
    }

    def corpus_windows():
        w = text.windows(tokenizer, split, window, limit=samples)
        if w.shape[0] < samples:
            raise ShadowError(f"--samples {samples}: the {text} {split} split has only {w.shape[0]} "
                              f"windows of {window} tokens")
        return w

    # Tokenising the split is most of a finished run's resume: a run already there tokenises only when
    # shards are missing; a new one checks the corpus first, before its folder is made.
    windows = None if (out / MANIFEST).is_file() else corpus_windows()
    manifest = _resume(out, params)
    done = {s["first"] for s in manifest["shards"]}
    starts = [s for s in range(0, samples, shard_size) if s not in done]
    if starts and windows is None:
        windows = corpus_windows()
    bar = tqdm(total=samples, initial=samples - sum(min(shard_size, samples - s) for s in starts),
               desc="calibrate", unit="window", disable=not progress)
    for first in starts:
        n = min(shard_size, samples - first)
        pos = _positions(seed, first, window, token_positions)
        parts = []
        for b in range(first, first + n, batch_size):
            batch = windows[b:min(b + batch_size, first + n)]
            parts.append(_sample_tensors(importance(model, batch, criteria, pos, keep_residual=True), criteria))
            bar.update(batch.shape[0])
        shard = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        shard["window_index"] = torch.arange(first, first + n)
        shard["positions"] = pos.expand(n, -1).contiguous()
        name = f"shard-{first // shard_size:05d}.safetensors"
        tmp = out / f".{name}.tmp-{os.getpid()}"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp))
        os.replace(tmp, out / name)
        manifest["shards"].append({"file": name, "first": first, "count": n})
        manifest["shards"].sort(key=lambda s: s["first"])
        manifest["complete"] = sum(s["count"] for s in manifest["shards"]) == samples
        _atomic_json(out / MANIFEST, manifest)
    bar.close()
    return manifest


def _sample_tensors(imp, criteria) -> dict:
    S = imp.attn0.shape[1]
    t = {"shadow_last": imp.attn0[:, S - 1].float(), "shadow_tok": imp.attn0[:, imp.positions].float(),
         "dejavu_tok": imp.residual.half()}
    for c in criteria:
        t[f"seq.{c}.heads"] = imp.heads[c].float()
        t[f"seq.{c}.neurons"] = imp.neurons[c].float()
        if c not in SEQUENCE_ONLY:
            t[f"tok.{c}.heads"] = imp.token_heads[c].float()
            t[f"tok.{c}.neurons"] = imp.token_neurons[c].half()
    return t


def _resume(out: Path, params: dict) -> dict:
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        same = {k: old.get(k) for k in params} == params
        if not same:
            diff = [k for k in params if old.get(k) != params[k]]
            raise ShadowError(f"{out} holds traces of another run (differs in: {', '.join(diff)}); "
                              "give a new --out folder or delete it")
        old["shards"] = [s for s in old["shards"] if (out / s["file"]).is_file()]
        return old
    if out.exists() and any(out.iterdir()):
        raise ShadowError(f"--out {out}: folder exists, is not empty and holds no {MANIFEST}")
    out.mkdir(parents=True, exist_ok=True)
    return dict(params, shards=[], complete=False)


def load_traces(folder: str | os.PathLike, model=None) -> tuple[dict, dict]:
    """(manifest, tensors concatenated over shards). With `model`, its fingerprint must match."""
    folder = Path(folder)
    manifest = read_manifest(folder, MANIFEST, FORMAT, "--traces", "calibrate")
    if not manifest.get("complete"):
        raise ShadowError(f"--traces {folder}: calibration is unfinished; rerun the same `shadowllm calibrate` "
                          "command to complete it")
    check_model(manifest, model, f"--traces {folder} were collected")
    shards = []
    for s in manifest["shards"]:
        try:
            shards.append(load_file(str(folder / s["file"])))
        except Exception as e:
            raise ShadowError(f"{folder / s['file']}: unreadable trace shard ({str(e).splitlines()[0]})") from None
    return manifest, {k: torch.cat([sh[k] for sh in shards]) for k in shards[0]}
