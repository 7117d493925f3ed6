"""Make (or check) the built-in activation-threshold calibration shipped for the embedded model.

    .venv/bin/python scripts/builtin_calibration.py            # writes predictor/builtin/<name>/ (~10 min, 2 cores)
    .venv/bin/python scripts/builtin_calibration.py --check    # recomputes it in a temporary folder and compares

The calibration is this project's own `calibrate_thresholds` with its defaults (128 wiki train windows
of 256 tokens, greedy costs on 16, sparse bases fitted on 32) on the embedded SmolLM2-135M-Instruct;
the folder name carries the model's fingerprint and the method's version
(predictor.thresholds.builtin_name), so `default_calibration` reads it only for that model and
method. Rounding can reorder the greedy's near-equal steps on another CPU, so --check reports the
differences (histograms, costs, rotation, the greedy table) instead of demanding bit equality.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from shadowllm.models import adapter_for, load
from shadowllm.predictor.thresholds import (BUILTIN, builtin_name, calibrate_thresholds, load_calibration,
                                            threshold_table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="recompute and compare with the shipped folder")
    args = parser.parse_args()
    model, tokenizer = load("smollm2-135m")
    name = builtin_name(model)
    if not args.check:
        out = BUILTIN / name
        calibrate_thresholds(model, tokenizer, out)
        print(f"wrote {out}")
        return
    shipped = load_calibration(BUILTIN / name, model)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = calibrate_thresholds(model, tokenizer, Path(tmp) / name)
    arch = adapter_for(model).arch
    print(f"histograms: max |difference| {float((fresh.histograms - shipped.histograms).abs().max()):.3g} counts "
          f"of {float(shipped.histograms[0, 0].sum()):.0f} per input")
    print(f"costs: max relative difference {float(((fresh.costs - shipped.costs).abs() / shipped.costs.abs().clamp(min=1e-12)).max()):.3g}")
    for space in ("residual", "values"):
        a, b = fresh.rotation[space], shipped.rotation[space]
        print(f"rotation {space}: max |difference| {float((a - b).abs().max()):.3g}")
    t_fresh, t_shipped = threshold_table(fresh, arch)[1], threshold_table(shipped, arch)[1]
    print(f"greedy table: max relative difference {float(((t_fresh - t_shipped).abs() / t_shipped.clamp(min=1e-12)).max()):.3g}; "
          f"rows identical: {int(torch.isclose(t_fresh, t_shipped, rtol=1e-5).all(-1).all(-1).sum())} of {t_fresh.shape[0]}")


if __name__ == "__main__":
    main()
