"""The command line: info, generate, and bad input giving one clear line and a non-zero exit."""

import subprocess
import sys

import pytest

from shadowllm.cli import main
from shadowllm.models.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-opt")
    save_tiny("opt", folder, seed=2)
    return folder


def test_info_on_a_local_folder(tiny_folder, capsys):
    assert main(["info", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    assert "layers         3" in out and "heads          4" in out and "neurons (FFN)  96" in out


def test_generate_streams_and_is_seeded(tiny_folder, capsys):
    args = ["generate", str(tiny_folder), "--prompt", "Hello", "--max-new-tokens", "8",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_generate_with_random_masks_and_a_batch(tiny_folder, capsys):
    assert main(["generate", str(tiny_folder), "--prompt", "a", "--prompt", "bcd", "--max-new-tokens", "4",
                 "--head-sparsity", "0.5", "--neuron-sparsity", "0.5", "--masks", "random"]) == 0
    captured = capsys.readouterr()
    assert "--- [0]" in captured.out and "--- [1]" in captured.out
    assert "random masks: heads 8/12 kept" in captured.err  # layer 0 dense (4), then 2 of 4 per layer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "shadowllm", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["info", "no-such-model"], "no such folder, and not a known model name"),
    (["generate", "no-such-model", "--prompt", "x"], "no such folder"),
    (["generate", "--prompt", "x", "--neuron-sparsity", "1.0"], "--neuron-sparsity: must lie in [0, 1), got 1.0"),
    (["generate", "--prompt", "x", "--head-sparsity", "-0.2"], "--head-sparsity: must lie in [0, 1), got -0.2"),
    (["generate", "--prompt", "x", "--head-sparsity", "half"], "--head-sparsity: expects a number"),
    (["bench", "--models", "gpt-9"], "--models gpt-9: expected some of smollm2-135m, tinyllama-1.1b, opt-1.3b"),
    (["bench", "--tokens", "0"], "--tokens: must be at least 1, got 0"),
    (["bench", "--weights", "int5"], "--weights int5: expected fp32, int4 or both"),
    (["build", "no-such-export", "--target", "tensorrt"], "no-such-export: no such export folder"),
])
def test_bad_input_is_one_clear_line(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_a_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    result = run_cli("info", str(f))
    assert result.returncode == 2 and "not a folder" in result.stderr and "Traceback" not in result.stderr


def test_predictor_commands_report_bad_input(tiny_folder, tmp_path):
    result = run_cli("train", "--traces", str(tmp_path / "none"), "--out", str(tmp_path / "p"))
    assert result.returncode == 2 and "no traces.json" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p").exists()
    result = run_cli("eval", str(tiny_folder), "--predictor", str(tmp_path / "none"))
    assert result.returncode == 2 and "no predictor.json" in result.stderr
    result = run_cli("eval", str(tiny_folder), "--sparsity", "0.2,1.5")
    assert result.returncode == 2 and "must lie in [0, 1), got 1.5" in result.stderr


def test_calibrate_train_eval_from_the_command_line(tiny_folder, tmp_path, capsys):
    traces, pred, report = tmp_path / "traces", tmp_path / "pred", tmp_path / "out" / "eval"
    assert main(["calibrate", str(tiny_folder), "--criterion", "plainact", "--criterion", "l2_norm", "--samples", "8",
                 "--window", "40", "--shard-size", "4", "--token-positions", "4", "--out", str(traces)]) == 0
    assert main(["train", "--traces", str(traces), "--kind", "shadow", "--granularity", "token", "--epochs", "2",
                 "--model", str(tiny_folder), "--out", str(pred)]) == 0
    assert main(["eval", str(tiny_folder), "--predictor", str(pred), "--sparsity", "0.5", "--target", "neurons",
                 "--max-windows", "2", "--window", "32", "--prompt", "16", "--lastword", "0",
                 "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"| shadow | token | plainact | {pred.name} | neurons | 0.5 |" in out and "| static |" in out
    assert report.with_suffix(".json").is_file() and report.with_suffix(".png").is_file()


def test_export_generate_and_parity_from_the_command_line(tiny_folder, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(tiny_folder), "--policy", "static", "--traces", str(_traces(tiny_folder, tmp_path)),
                 "--criterion", "l2_norm", "--out", str(out)]) == 0
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    assert main(["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "5", "--sparsity", "0.5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["parity", str(out), "--model", str(tiny_folder), "--steps", "8",
                 "--json", str(tmp_path / "parity.json")]) == 0
    assert '"passed": true' in (tmp_path / "parity.json").read_text()
    result = run_cli("build", str(out), "--target", "tensorrt", "--fp16")  # no TensorRT / GPU here: one line
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1 and "--target tensorrt: " in result.stderr
        assert not (out / "tensorrt").exists()
    else:  # a machine with TensorRT and a GPU builds the engine
        assert result.returncode == 0 and (out / "tensorrt" / "model.engine").is_file(), result.stderr


def _traces(tiny_folder, tmp_path):
    traces = tmp_path / "traces"
    main(["calibrate", str(tiny_folder), "--criterion", "l2_norm", "--samples", "4", "--window", "40",
          "--shard-size", "4", "--token-positions", "4", "--out", str(traces)])
    return traces


def test_export_bad_input(tiny_folder, tmp_path):
    result = run_cli("export", str(tiny_folder), "--policy", "shadow", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "needs --predictor" in result.stderr
    assert not (tmp_path / "x").exists()
    result = run_cli("generate", str(tmp_path / "missing-export"), "--backend", "ort", "--prompt", "hi")
    assert result.returncode == 2 and "no such export folder" in result.stderr


def test_thresholds_calibrate_eval_export_from_the_command_line(tiny_folder, tmp_path, capsys):
    """calibrate --criterion activations, then eval rows of both allocations (bytes counted per token,
    a Pareto panel in the PNG, the dominance table), then export + parity of the threshold policy."""
    calib, report, out = tmp_path / "thresholds", tmp_path / "eval", tmp_path / "export"
    assert main(["calibrate", str(tiny_folder), "--criterion", "activations", "--samples", "4", "--window", "40",
                 "--greedy-windows", "2", "--out", str(calib)]) == 0
    assert (calib / "thresholds.json").is_file() and (calib / "thresholds.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", str(tiny_folder), "--method", "dense", "--method", "threshold", "--method", "random",
                 "--thresholds", str(calib), "--allocation", "uniform", "--allocation", "greedy", "--sparsity",
                 "0.25,0.5", "--target", "neurons", "--max-windows", "2", "--window", "32", "--prompt", "16",
                 "--lastword", "0", "--out", str(report)]) == 0
    text = capsys.readouterr().out
    for allocation in ("uniform", "greedy"):
        for s in ("0.25", "0.5"):
            assert f"| threshold | token |  | {allocation} | both | {s} |" in text
    assert "dominated by" in text
    import json

    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    fractions = [r["bytes_fraction"] for r in rows if r["method"] == "threshold"]
    assert all(0.2 < f < 0.95 for f in fractions), fractions
    # the rows ran on the model the thresholds were calibrated on: its rotated copy (the default, sparse bases)
    from shadowllm.models import adapter_for, corpus, load
    from shadowllm.predictor.evaluation import Threshold, evaluate_method
    from shadowllm.predictor.thresholds import load_calibration, threshold_table

    model, tok = load(str(tiny_folder))
    calibration = load_calibration(calib, model)
    assert calibration.rotation is not None
    table = threshold_table(calibration, adapter_for(model).arch, "greedy")[1]
    row = next(r for r in rows if r["method"] == "threshold" and r["allocation"] == "greedy"
               and r["sparsity"] == 0.5)
    ppl, frac, _ = evaluate_method(calibration.model_for(model), Threshold(table, "greedy", "both", 0.5, "per_layer"),
                                   corpus("wiki").windows(tok, "test", 32, limit=2), 16)
    assert (round(ppl, 4), round(frac, 4)) == (row["ppl"], row["bytes_fraction"])
    assert main(["export", str(tiny_folder), "--policy", "threshold", "--thresholds", str(calib), "--out",
                 str(out)]) == 0
    assert main(["parity", str(out), "--model", str(tiny_folder), "--sparsity", "0.25", "--steps", "8",
                 "--json", str(tmp_path / "parity.json")]) == 0
    assert "thresholded ops" in capsys.readouterr().out


@pytest.mark.parametrize("args, expected", [
    (["calibrate", "--criterion", "activations", "--criterion", "l2_norm", "--out", "{tmp}/x"],
     "--criterion activations calibrates activation thresholds into a folder of its own"),
    (["eval", "--method", "threshold", "--sparsity", "0.555"], "--sparsity 0.555: the threshold table holds rows"),
])
def test_bad_threshold_flags_are_one_clear_line(args, expected, tmp_path):
    result = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "x").exists()
