"""Greedy threshold rows of a calibration (`shadowllm calibrate --criterion activations --out DIR`) on
SmolLM2, at six sparsities around 0.75 / 0.60 / 0.50 of the bytes, on the eval protocol's 16 test
windows and on 64 other test windows (16..79): the check that a difference between two calibrations
is not the 16 windows' noise.

    .venv/bin/python research/threshold_rows.py runs/thresholds [more calibration folders]

~5 min per calibration on 2 cores. Results: docs/research/thresholds.md.
"""
import json
import sys

from shadowllm.models import adapter_for, corpus
from shadowllm.models.loading import load
from shadowllm.predictor.evaluation import Threshold, evaluate_method
from shadowllm.predictor.thresholds import load_calibration, threshold_table

SPARSITIES = [0.25, 0.26, 0.4, 0.41, 0.5, 0.51]


def main():
    model, tok = load()
    test = corpus("wiki").windows(tok, "test", 256, limit=80)
    for folder in sys.argv[1:]:
        calib = load_calibration(folder, model)
        work = calib.model_for(model)
        table = threshold_table(calib, adapter_for(work).arch, "greedy")[1]
        kind = (calib.manifest.get("rotation") or {}).get("kind", "none")
        for name, windows in (("protocol (0..15)", test[:16]), ("other (16..79)", test[16:])):
            for s in SPARSITIES:
                ppl, frac, _ = evaluate_method(work, Threshold(table, "greedy", "both", s, "per_layer"), windows, 128)
                print(json.dumps({"calibration": folder, "rotate": kind, "windows": name, "s": s,
                                  "ppl": round(ppl, 3), "bytes": round(frac, 4)}), flush=True)


if __name__ == "__main__":
    main()
