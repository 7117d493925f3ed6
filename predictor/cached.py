"""Small predictors made once per model and cached, for the demo and the bench.

`cached_predictors` calibrates L2 importance on a few wiki train windows and trains ShadowLLM
predictors of the granularities asked for; traces and predictors live under the model cache
($SHADOWLLM_CACHE), keyed by the model's fingerprint and the traces' size, and are reused on later
runs. (The activation-threshold calibration has its own cache: predictor.thresholds.default_calibration.)
"""

from __future__ import annotations

from dataclasses import dataclass

from shadowllm.models import ShadowError, fingerprint
from shadowllm.models.loading import cache_root

from .fixed_masks import static_from_traces
from .predictors import load_predictor
from .traces import calibrate
from .train import train


@dataclass(frozen=True)
class TraceSize:
    """How much text the cached predictors learn from: windows x tokens, and the positions of each
    window that per-token targets are kept for (the forward pass over the windows is the cost; more
    positions per window give a per-token predictor more samples for free)."""

    samples: int
    window: int = 128
    positions: int = 16


BENCH = TraceSize(64)  # the bench's per-sequence predictor: one sample per window, so many windows
DEMO = TraceSize(24, positions=48)  # the demo's per-token predictor: 1,152 token samples from 24 forwards
QUICK = TraceSize(12, positions=32)
EPOCHS = {"sequence": 60, "token": 20}


def cached_predictors(model, tokenizer, size: TraceSize = BENCH, granularities=("sequence", "token")):
    """({granularity: predictor}, static scores, cache folder), trained once and cached. The static
    scores are a function: they read every trace shard, which only a caller that uses them should pay for."""
    # v2: traces record head_dim and gated in their arch (older caches would be refused on resume)
    root = cache_root() / "demo" / (f"{fingerprint(model).split(':')[1][:12]}-{size.samples}x{size.window}"
                                    f"{'' if size.positions == 16 else f'p{size.positions}'}-l2_norm-v2")
    traces = root / "traces"
    calibrate(model, tokenizer, traces, ["l2_norm"], samples=size.samples, window=size.window, batch_size=4,
              token_positions=size.positions, shard_size=16)
    out = {}
    for gran in granularities:
        folder = root / f"shadow-{gran}"
        try:
            out[gran] = load_predictor(folder, model)
        except ShadowError:
            predictor = train(str(traces), "shadow", gran, criterion="l2_norm", epochs=EPOCHS[gran], model=model)
            predictor.save(folder)
            out[gran] = load_predictor(folder, model)
    return out, lambda: static_from_traces(traces, model, "l2_norm")[0], root
