"""A new user's first check, on the embedded model: `shadowllm export --policy P --out DIR` with no
other flag, then `shadowllm parity DIR` at its defaults, must say PASSED (exit status 0). The
prefill logits are judged per position (parity/check.py: the attention-sink position's fp32
rounding is several times everyone else's)."""

import subprocess
import sys

import pytest


# threshold: the policy to deploy (its built-in calibration ships with the package), which the serving
# tests serve too (one xdist group: one export per session). The other policies' exports are checked
# on the tiny models (tests/parity/test_model_parity.py, test_threshold_exports.py); each SmolLM2
# export + parity costs CI minutes.
@pytest.mark.xdist_group("smollm2-threshold-export")
@pytest.mark.parametrize("policy", ["threshold"])
def test_default_export_passes_parity(policy, default_export):
    out = default_export(policy)  # `shadowllm export --policy P --out DIR`, nothing else
    run = lambda *a: subprocess.run([sys.executable, "-m", "shadowllm", *a], capture_output=True, text=True)  # noqa: E731
    parity = run("parity", str(out))
    assert parity.returncode == 0 and parity.stdout.rstrip().endswith("PASSED"), parity.stdout[-3000:]
