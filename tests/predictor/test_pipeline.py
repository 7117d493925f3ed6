"""Trace -> train -> eval on a tiny model in seconds, resumable calibration, artifact safety."""

import json

import pytest
import torch

from shadowllm.models import ShadowError
from shadowllm.models.tiny import build_model, byte_tokenizer
from shadowllm.predictor.evaluation import evaluate, write_reports
from shadowllm.predictor.predictors import load_predictor
from shadowllm.predictor.traces import calibrate, load_traces
from shadowllm.predictor.train import scaled_targets, train

SMALL = dict(samples=12, window=48, batch_size=4, token_positions=6, shard_size=4, progress=False)


@pytest.fixture(scope="module")
def model():
    return build_model("llama", seed=9)


@pytest.fixture(scope="module")
def traces(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("traces")
    calibrate(model, byte_tokenizer(), out, ["plainact", "l2_norm"], **SMALL)
    return out


def test_traces_hold_both_methods_inputs(traces, model):
    manifest, t = load_traces(traces, model)
    assert manifest["complete"] and manifest["samples"] == 12 and len(manifest["shards"]) == 3
    L, D, H, F = 3, 96, 6, 80
    assert t["shadow_last"].shape == (12, D) and t["shadow_tok"].shape == (12, 6, D)
    assert t["dejavu_tok"].shape == (12, 6, L, D)
    assert t["seq.plainact.neurons"].shape == (12, L, F) and t["tok.l2_norm.heads"].shape == (12, 6, L, H)
    assert t["window_index"].tolist() == list(range(12))


def test_interrupted_calibration_resumes(model, traces, tmp_path):
    out = tmp_path / "resumed"
    calibrate(model, byte_tokenizer(), out, ["plainact", "l2_norm"], **SMALL)
    manifest = json.loads((out / "traces.json").read_text())
    # simulate an interruption after the first shard: drop the others from disk and manifest
    for s in manifest["shards"][1:]:
        (out / s["file"]).unlink()
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
    (out / "traces.json").write_text(json.dumps(manifest))
    with pytest.raises(ShadowError, match="unfinished"):
        load_traces(out)
    calibrate(model, byte_tokenizer(), out, ["plainact", "l2_norm"], **SMALL)
    _, again = load_traces(out)
    _, first = load_traces(traces)
    for k in first:
        assert torch.allclose(again[k].float(), first[k].float(), atol=1e-6, rtol=1e-5), k


def test_another_run_in_the_same_folder_is_refused(model, traces):
    with pytest.raises(ShadowError, match="traces of another run"):
        calibrate(model, byte_tokenizer(), traces, ["fisher"], **SMALL)


@pytest.mark.parametrize("kind, granularity", [("shadow", "sequence"), ("shadow", "token"), ("dejavu", "token")])
def test_train_save_load_and_eval(model, traces, tmp_path, kind, granularity):
    predictor = train(str(traces), kind, granularity, epochs=3, model=model, progress=False)
    m = predictor.manifest
    assert m["metrics"]["heads"]["spearman_per_layer"] and set(m["metrics"]["neurons"]["topk_recall"]) == {"0.1", "0.2", "0.3", "0.5"}
    assert 0 < m["cost"]["parameters"] and m["cost"]["flops_per_prediction"] > 0
    predictor.save(tmp_path / "pred")
    loaded = load_predictor(tmp_path / "pred", model)
    x = torch.randn(2, 3, 96)
    net_in = x if kind == "shadow" else x[:, :1].expand(2, 2, 96)
    assert torch.equal(loaded.net(net_in), predictor.net(net_in))

    rows = evaluate(model, byte_tokenizer(), [loaded], [0.5], ["neurons"], max_windows=2, window=32, prompt=16,
                    lastword=2, progress=False)
    methods = {(r.method, r.granularity) for r in rows}
    assert (kind, granularity) in methods and ("oracle", "token") in methods and ("gate", "token") in methods
    for r in rows:
        assert r.ppl > 1 and 0 < r.bytes_fraction and r.windows == 2
        assert r.predictor == ("pred" if r.method == kind else None)  # rows name the predictor folder
    dense = next(r for r in rows if r.method == "dense")
    assert dense.bytes_fraction == 1.0
    write_reports(rows, tmp_path / "report" / "eval", "shadowllm eval ...", {})
    assert "| predictor |" in (tmp_path / "report" / "eval.md").read_text()
    data = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert data["command"] and {"method", "granularity", "target", "sparsity", "ppl", "windows",
                                "bytes_fraction"} <= set(data["rows"][0])
    assert (tmp_path / "report" / "eval.png").stat().st_size > 1000


def test_predictor_of_another_model_is_refused(traces, model, tmp_path):
    predictor = train(str(traces), "shadow", "sequence", epochs=1, progress=False)
    predictor.save(tmp_path / "p")
    with pytest.raises(ShadowError, match="trained on another model"):
        load_predictor(tmp_path / "p", build_model("llama", seed=10))
    with pytest.raises(ShadowError, match="collected on another model"):
        load_traces(traces, build_model("llama", seed=10))


def test_log_target_scale_keeps_each_layers_order_and_spreads_the_bulk():
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(200, generator=g) for _ in range(20)]).view(5, 4, 200)
    scores = 1.05 ** order.float()  # distinct and heavy-tailed (max/median ~ 130), like magnitudes
    lin, log = scaled_targets(scores, "linear", "l2_norm"), scaled_targets(scores, "log", "l2_norm")
    for t in (lin, log):
        assert torch.allclose(t.amin(-1), torch.zeros(5, 4)) and torch.allclose(t.amax(-1), torch.ones(5, 4))
        assert torch.equal(t.argsort(-1), scores.argsort(-1))
    assert log.median() > 4 * lin.median()  # the median unit is no longer squeezed against 0
    with pytest.raises(ShadowError, match="non-negative.*'grasp'"):
        scaled_targets(scores - 2, "log", "grasp")


def test_train_records_the_target_scale(traces):
    m = train(str(traces), "shadow", "token", epochs=1, progress=False, target_scale="log").manifest
    assert m["training"]["target_scale"] == "log"
    with pytest.raises(ShadowError, match="--target-scale 'cube'"):
        train(str(traces), "shadow", "token", epochs=1, progress=False, target_scale="cube")


def test_predictor_study_runs_every_variant(traces, tmp_path):
    """research/predictor_study.py (the per-token predictor study in docs/research/predictors.md) on the tiny traces."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "research" / "predictor_study.py"
    out = tmp_path / "study"
    subprocess.run([sys.executable, str(script), "--traces", str(traces), "--out", str(out), "--epochs", "1",
                    "--mid-layer", "1"], check=True, capture_output=True)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 12 and {r["network"] for r in rows} == {"shadow", "per_layer"}
    for r in rows:
        for part in ("heads", "neurons"):
            assert 0 < r[part]["mass"] <= 1 + 1e-6 and 0 <= r[part]["recall"] <= 1
    bad = subprocess.run([sys.executable, str(script), "--traces", str(traces), "--out", str(tmp_path / "x"),
                          "--mid-layer", "99"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--mid-layer 99" in bad.stderr and not (tmp_path / "x.json").exists()


def test_dejavu_needs_token_granularity(traces):
    with pytest.raises(ShadowError, match="granularity token"):
        train(str(traces), "dejavu", "sequence", progress=False)


def test_eval_with_static_and_full_masks_equal_to_dense(model):
    """At sparsity 0 every method must reproduce the dense perplexity (a masking bug would show)."""
    arch_scores = (torch.rand(3, 6), torch.rand(3, 80))
    rows = evaluate(model, byte_tokenizer(), [], [0.0], ["both"], max_windows=2, window=32, prompt=16,
                    static_scores=arch_scores, lastword=0, progress=False)
    dense = next(r.ppl for r in rows if r.method == "dense")
    for r in rows:
        assert abs(r.ppl - dense) / dense < 1e-4, r
