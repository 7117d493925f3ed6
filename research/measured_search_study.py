"""Does searching a greedy row on measured perplexity beat the greedy's additive cost model? (Not at
the budget tried: it fits its search windows and gains nothing on test text.)

The greedy allocation ranks steps by per-input costs measured one input at a time; interactions
between inputs are outside that model. This study starts from one greedy row of a calibration and
tries random moves of one level between two inputs of the same kind (one up, one down: the bytes are
unchanged), keeping a move when the perplexity of 8 held-out train windows (128-token dense prompt,
128 thresholded tokens; windows 128..135, which no calibration of 128 windows reads) falls, then
reports both rows on the eval protocol and on 64 other test windows.

    .venv/bin/python research/measured_search_study.py runs/thresholds 0.41 720   # row, seconds of search

~20 s per candidate on 2 cores, then ~10 min of test rows. Results: docs/research/thresholds.md, "Tried and dropped".
"""
import json
import random
import sys
import time

import torch

from shadowllm.models import adapter_for, corpus
from shadowllm.models.loading import load
from shadowllm.predictor.evaluation import Threshold, evaluate_method
from shadowllm.predictor.thresholds import greedy_levels, load_calibration, threshold_table


def main(folder: str, sparsity: float, seconds: float):
    model, tok = load()
    calib = load_calibration(folder, model)
    work = calib.model_for(model)
    arch = adapter_for(work).arch
    levels = torch.tensor(calib.levels, dtype=torch.float64)
    greedy = greedy_levels(calib, arch, [sparsity])[0]
    search = corpus("wiki").windows(tok, "train", 256, limit=136)[128:136]
    test = corpus("wiki").windows(tok, "test", 256, limit=80)
    method = Threshold(threshold_table(calib, arch, "greedy")[1], "greedy", "both", sparsity, "per_layer")

    def ppl(level, windows):
        method.row = calib.thresholds(levels[level])
        return evaluate_method(work, method, windows, 128)[:2]

    best, best_ppl = greedy.clone(), ppl(greedy, search)[0]
    rng, top, start, tried = random.Random(0), len(calib.levels) - 1, time.time(), 0
    print(f"greedy row {sparsity}: search-window ppl {best_ppl:.3f}", flush=True)
    while time.time() - start < seconds:
        candidate = best.clone()
        for _ in range(rng.choice((1, 1, 2, 3))):
            k, up, down = rng.randrange(4), rng.randrange(arch.num_layers), rng.randrange(arch.num_layers)
            if up != down and candidate[up, k] < top and candidate[down, k] > 0:
                candidate[up, k] += 1
                candidate[down, k] -= 1
        if torch.equal(candidate, best):
            continue
        tried += 1
        p = ppl(candidate, search)[0]
        if p < best_ppl:
            best, best_ppl = candidate, p
            print(f"candidate {tried}: search-window ppl {p:.3f}", flush=True)
    print(f"{tried} candidates tried", flush=True)
    for name, windows in (("protocol (0..15)", test[:16]), ("other (16..79)", test[16:])):
        for row, level in (("greedy", greedy), ("searched", best)):
            p, f = ppl(level, windows)
            print(json.dumps({"s": sparsity, "windows": name, "row": row, "ppl": round(p, 3), "bytes": round(f, 4)}),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
