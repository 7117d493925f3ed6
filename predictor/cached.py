"""Small predictors made once per model and cached, for the demo and the bench.

`cached_predictors` calibrates L2 importance on a few wiki train windows and trains two ShadowLLM
predictors (per sequence and per token); they live under the model cache ($SHADOWLLM_CACHE), keyed
by the model's fingerprint, and are reused on later runs. (The activation-threshold calibration has
its own cache: predictor.thresholds.default_calibration.)
"""

from __future__ import annotations

from shadowllm.models import ShadowError, fingerprint
from shadowllm.models.loading import cache_root

from .fixed_masks import static_from_traces
from .predictors import load_predictor
from .traces import calibrate
from .train import train


def cached_predictors(model, tokenizer, quick: bool = False):
    """(sequence predictor, token predictor, static scores, cache folder), trained once and cached."""
    samples, window = (24, 128) if quick else (64, 128)
    # v2: traces record head_dim and gated in their arch (older caches would be refused on resume)
    root = cache_root() / "demo" / f"{fingerprint(model).split(':')[1][:12]}-{samples}x{window}-l2_norm-v2"
    traces = root / "traces"
    calibrate(model, tokenizer, traces, ["l2_norm"], samples=samples, window=window, batch_size=4,
              token_positions=16, shard_size=16)
    out = {}
    for gran in ("sequence", "token"):
        folder = root / f"shadow-{gran}"
        try:
            out[gran] = load_predictor(folder, model)
        except ShadowError:
            predictor = train(str(traces), "shadow", gran, criterion="l2_norm", epochs=60 if gran == "sequence" else 20,
                              model=model)
            predictor.save(folder)
            out[gran] = load_predictor(folder, model)
    static, _ = static_from_traces(traces, model, "l2_norm")
    return out["sequence"], out["token"], static, root
