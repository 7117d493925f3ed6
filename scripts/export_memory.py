"""Peak memory of an export (issue 15): a random-weight model of a synthetic shape, exported in this
process, its peak RSS before and after the export against its weight bytes.

    .venv/bin/python scripts/export_memory.py /tmp/out [--shape tinyllama-1.1b]
"""

from __future__ import annotations

import argparse
import resource
import time

from shadowllm.export.exporter import export
from shadowllm.models.tiny import SYNTHETIC_CONFIGS, build_synthetic, byte_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SYNTHETIC_CONFIGS))
    args = ap.parse_args()
    model = build_synthetic(args.shape)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.time()
    export(model, byte_tokenizer(), args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"weights {weights:.2f} GiB; peak RSS before the export {before:.2f} GiB, after {peak:.2f} GiB "
          f"({peak / weights:.2f}x the weights); {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
