"""The built-in threshold calibration shipped for the embedded model (predictor/builtin/) is what this
code computes for that model: its manifest names the model's fingerprint and calibrate_thresholds'
own defaults, its rotation is exact for the model, and histograms recomputed here from calibration
windows give the shipped thresholds. (Recomputing all of it takes ~10 min on 2 cores:
`scripts/builtin_calibration.py --check`.)"""

from __future__ import annotations

import inspect

import pytest
import torch

from shadowllm.models import adapter_for, corpus, fingerprint, sparse_forward
from shadowllm.predictor import thresholds as th

pytestmark = pytest.mark.slow
RECOMPUTED_WINDOWS = 4  # of the calibration's 128: the forward passes CI can afford (~15 s on 2 cores)


@pytest.fixture(scope="module")
def shipped(smollm2):
    model, _ = smollm2
    folder = th.BUILTIN / th.builtin_name(model)
    assert (folder / th.MANIFEST).is_file(), f"no built-in calibration for the embedded model in {folder}"
    return th.load_calibration(folder, model)  # refused if the fingerprint differs


def test_manifest_is_this_model_and_the_calibration_defaults(smollm2, shipped):
    model, _ = smollm2
    defaults = {k: p.default for k, p in inspect.signature(th.calibrate_thresholds).parameters.items()
                if p.default is not inspect.Parameter.empty}
    m = shipped.manifest
    assert m["model_fingerprint"] == fingerprint(model)
    assert (m["corpus"], m["split"], m["samples"], m["window"], m["greedy_windows"]) == (
        defaults["corpus_name"], defaults["split"], defaults["samples"], defaults["window"], defaults["greedy_windows"])
    assert m["rotation"]["kind"] == defaults["rotate"] and m["rotation"]["windows"] == th.ROTATION_WINDOWS
    assert tuple(m["levels"]) == th.LEVELS and m["histogram"] == {"log10_lo": th.LOG_LO, "log10_hi": th.LOG_HI,
                                                                 "bins": th.BINS}
    assert th.default_calibration(model, None).manifest == m  # what export / eval / the demo read


def test_rotation_is_exact_for_the_model(smollm2, shipped):
    model, tokenizer = smollm2
    for space, q in shipped.rotation.items():
        if q is not None:
            eye = torch.eye(q.shape[-1]).expand_as(q)
            assert torch.allclose(q.double() @ q.double().transpose(-1, -2), eye.double(), atol=1e-5), space
    ids = tokenizer("The Eiffel Tower is in Paris, the capital of France.", return_tensors="pt").input_ids
    with torch.no_grad():
        want, _ = sparse_forward(model, ids)
        got, _ = sparse_forward(shipped.model_for(model), ids)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_recomputed_histograms_give_the_shipped_thresholds(smollm2, shipped):
    """Histograms of the first calibration windows, computed here on the rotated model exactly as
    calibrate_thresholds does, put each layer's and input's quantiles where the shipped ones are: a
    stale artifact (another model, rotation or reference forward) moves them far more than sampling
    4 of the 128 windows does. Measured: |log(recomputed / shipped)| over layers and inputs, median
    0.02-0.04 and 90th percentile 0.05-0.09 for two sets of 4 windows; the same windows on the model
    without its rotation: median 0.85-1.06, 90th percentile ~1.5. The bounds sit between, ~3x from each."""
    model, tokenizer = smollm2
    m = shipped.manifest
    windows = corpus(m["corpus"]).windows(tokenizer, m["split"], m["window"], limit=RECOMPUTED_WINDOWS)
    arch = adapter_for(model).arch
    hist = torch.zeros(arch.num_layers, 4, th.BINS, dtype=torch.float64)

    def observe(layer, name, t):
        k = th.OBSERVED.get(name)
        if k is not None:
            hist[layer, k] += th._histogram(t)

    with torch.no_grad():
        for b in range(0, RECOMPUTED_WINDOWS, 4):
            sparse_forward(shipped.model_for(model), windows[b:b + 4], observer=observe)
    # Counts add up over windows: a part never exceeds the whole, for every |v| >= 1e-4. Below it the
    # values come from cancellation, and their relative error follows the CPU's summation order: on an
    # AVX-512 machine (the artifact came from an AVX2 one) 530 of 1e8 counts, all |v| < 10^-4.4, moved
    # several bins. The thresholds live far above (the 10% quantiles lie at |v| ~ 10^-3.5 and up).
    first = int((-4.0 - th.LOG_LO) / (th.LOG_HI - th.LOG_LO) * th.BINS)
    assert torch.all(hist[..., first:] <= shipped.histograms[..., first:])
    recomputed = th.Calibration(m, hist, None, rotation=shipped.rotation)
    for s in (0.1, 0.25, 0.5, 0.75):
        levels = torch.full((arch.num_layers, 4), s)
        off = (recomputed.thresholds(levels) / shipped.thresholds(levels)).log().abs()  # [L, 4]
        assert float(off.median()) < 0.15 and float(off.quantile(0.9)) < 0.3, (s, off)
