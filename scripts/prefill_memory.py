"""One long prefill on an export (onnxruntime): its time and the process's peak resident memory
(issue 15 item 6: generation needs the last position's logits only, not [B, S, V] of them).

    .venv/bin/python scripts/prefill_memory.py EXPORT_DIR --tokens 2000 [--all-logits]
prints the median prefill time of 3 runs, VmHWM (peak RSS, MB) before and after them, and the logits'
shape. --all-logits asks for every position's logits (what parity needs; the old default).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shadowllm.runtime.ort_backend import OrtBackend


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--all-logits", action="store_true")
    args = ap.parse_args()
    backend = OrtBackend(args.export, 0.0)
    ids = torch.randint(10, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    kwargs = {} if args.all_logits else {"last_only": True}
    backend.forward(ids[:, :8], mask[:, :8], None, **kwargs)  # session warm-up
    before = peak_rss_mb()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        logits, _ = backend.forward(ids, mask, None, **kwargs)
        times.append(time.perf_counter() - start)
    print(f"prefill of {args.tokens} tokens: median {statistics.median(times):.2f} s; peak RSS {before:.0f} MB "
          f"before, {peak_rss_mb():.0f} MB after; logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
