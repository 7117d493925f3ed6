"""`shadowllm demo` end to end (the README's first command, after its setup), on a tiny random Llama
folder so CI can afford it: every stage runs (predictor training, the threshold calibration, the
accuracy rows, the export, three answers, parity) and the run ends with the parity report PASSED and
the table of what each stage cost. Its timings on the embedded model: docs/results/demo.md."""

import os
import subprocess
import sys

import pytest

from shadowllm.models.tiny import save_tiny


@pytest.mark.slow
def test_demo_runs_every_stage_and_passes_parity(tmp_path):
    save_tiny("llama", tmp_path / "tiny", seed=6, max_position_embeddings=512)  # the demo's 256-token windows fit
    env = dict(os.environ, SHADOWLLM_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-m", "shadowllm", "demo", "--model", str(tmp_path / "tiny"), "--quick"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for heading in ("== model", "== ShadowLLM predictor", "== activation thresholds", "== accuracy per byte",
                    "== export of the threshold policy", "== answers", "== parity of the threshold export"):
        assert heading in out, heading
    assert "\nPASSED\n" in out and "greedy tokens (8)" in out
    table = out[out.index("== where the time went"):]
    for stage in ("model", "predictor", "thresholds", "accuracy", "export", "answers", "parity", "total"):
        assert f"\n{stage}" in table, stage
    assert "calibrated:" in out  # a model without a shipped calibration is calibrated (and cached)
