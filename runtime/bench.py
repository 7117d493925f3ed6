"""`shadowllm bench` (first cut): decode tokens/s and prefill latency per backend, back to back in one run.

Backends (the names of issue 6): `hf-eager` (the HF model's own forward with its KV cache, dense),
`ort-dense` (the dense export on stock onnxruntime: function bodies, i.e. ORT's own GEMMs),
`ort-function` (the sparse export with function bodies: dense compute x mask), `ort-native` (the
sparse export with the native C++ kernels). Each cell: `repeats` runs of greedy decoding of
`tokens` new tokens after a fixed prompt; the median and the spread (max - min) of decode tokens/s,
and the median prefill time. Output: JSON rows and a markdown table with the ratio to ort-dense.
Not yet here (issue 6): the memory-bandwidth bound, peak RSS per cell, synthetic large models, plots.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shadowllm.models import ShadowError

from .ort_backend import OrtBackend


@dataclass
class Row:
    model: str
    backend: str
    policy: str
    sparsity: float
    decode_tok_s: float
    decode_spread: float
    prefill_ms: float
    tokens: int
    repeats: int


class HFEager:
    """The user's default today: the HF model's own forward and cache, dense."""

    name = "hf-eager"

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids, attention_mask, state):
        with torch.inference_mode():
            out = self.model(input_ids, attention_mask=attention_mask, cache=state, use_cache=True)
        return out.logits, out.cache


def _run(backend, prompt_ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy run."""
    mask = torch.ones_like(prompt_ids)
    start = time.perf_counter()
    logits, state = backend.forward(prompt_ids, mask, None)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        logits, state = backend.forward(nxt, mask, state)
    return prefill, tokens / (time.perf_counter() - start)


def measure(backend, prompt_ids, tokens: int, repeats: int):
    _run(backend, prompt_ids, 4)  # warm-up: sessions allocate and pick kernels on the first calls
    runs = [_run(backend, prompt_ids, tokens) for _ in range(repeats)]
    speeds = [r[1] for r in runs]
    return statistics.median(speeds), max(speeds) - min(speeds), statistics.median(r[0] for r in runs) * 1e3


def bench(model, model_name: str, dense_export, sparse_export, sparsities, tokens: int = 64, repeats: int = 3,
          prompt_tokens: int = 128, threads: int | None = None) -> list[Row]:
    for folder in (dense_export, sparse_export):
        if folder is None:
            raise ShadowError("bench needs --dense-export DIR and --export DIR (from `shadowllm export`)")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=g)
    policy = json.loads((Path(sparse_export) / "shadowllm.json").read_text())["policy"]
    cells = [("hf-eager", "dense", 0.0, lambda s: HFEager(model)),
             ("ort-dense", "dense", 0.0, lambda s: OrtBackend(dense_export, 0.0, threads=threads, native=False))]
    for s in sparsities:
        cells.append(("ort-function", policy, s, lambda s: OrtBackend(sparse_export, s, threads=threads, native=False)))
        cells.append(("ort-native", policy, s, lambda s: OrtBackend(sparse_export, s, threads=threads, native=True)))
    rows = []
    for name, pol, s, make in cells:
        speed, spread, prefill = measure(make(s), prompt, tokens, repeats)
        rows.append(Row(model_name, name, pol, s, round(speed, 2), round(spread, 2), round(prefill, 1), tokens, repeats))
        print(f"[shadowllm] bench {name:<13} {pol:<7} sparsity {s:<4} {speed:7.2f} tok/s (spread {spread:.2f}), "
              f"prefill {prefill:.0f} ms", flush=True)
    return rows


def markdown(rows: list[Row], command: str) -> str:
    base = next((r.decode_tok_s for r in rows if r.backend == "ort-dense"), None)
    lines = [f"Command: `{command}`", "",
             "| model | backend | policy | sparsity | decode tok/s (median) | spread | prefill ms | vs ort-dense |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r.decode_tok_s / base:.2f}x" if base else ""
        lines.append(f"| {r.model} | {r.backend} | {r.policy} | {r.sparsity} | {r.decode_tok_s:.2f} | "
                     f"{r.decode_spread:.2f} | {r.prefill_ms:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def write(rows: list[Row], prefix: str | os.PathLike, command: str):
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"command": command, "rows": [asdict(r) for r in rows]},
                                                      indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(rows, command))
