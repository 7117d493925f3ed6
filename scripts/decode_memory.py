"""Long greedy generation on an export (onnxruntime): resident memory and decode speed as the cache
grows (issue 15: memory should grow with the KV cache, not with the allocator's fragments).

    .venv/bin/python scripts/decode_memory.py EXPORT_DIR --tokens 4000
prints VmRSS (MB) at steps 16, 100, tokens/2 and tokens, tok/s over the 100 steps ending at 200 and at
`tokens`, and the cache's own size at the end.
"""

from __future__ import annotations

import argparse
import time

import torch

from shadowllm.runtime.ort_backend import OrtBackend


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--tokens", type=int, default=4000)
    args = ap.parse_args()
    backend = OrtBackend(args.export, 0.0)
    ids = torch.randint(10, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    logits, state = backend.forward(ids, mask, None)
    marks, speeds, window_start = {}, {}, time.perf_counter()
    for step in range(1, args.tokens + 1):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        logits, state = backend.forward(nxt, mask, state)
        if step in (16, 100, args.tokens // 2, args.tokens):
            marks[step] = round(rss_mb())
        if step in (200, args.tokens):
            speeds[step] = round(100 / (time.perf_counter() - window_start), 1)
        if step in (100, args.tokens - 100):
            window_start = time.perf_counter()
    cache = 2 * backend.layers * backend.kv_heads * backend.head_dim * mask.shape[1] * 4 / 2**20
    print(f"VmRSS MB at steps {marks}; tok/s over the 100 steps ending at {speeds}; cache {cache:.0f} MB")


if __name__ == "__main__":
    main()
