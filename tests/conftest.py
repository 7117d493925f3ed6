import os
import subprocess
import sys

import pytest
import torch

# Tests never touch the network; everything they load is built in code or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shadowllm.models.tiny import build_model  # noqa: E402


@pytest.fixture(scope="session", params=["opt", "llama"])
def tiny(request):
    """A tiny random-weight model of each family (fp32, eval)."""
    return build_model(request.param, seed=1)


@pytest.fixture(scope="session")
def smollm2():
    from shadowllm.models import load

    return load("smollm2-135m")


@pytest.fixture
def rng():
    """A fresh, reproducible-per-test random generator (inputs are random, never zeros)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """default_export(policy) -> the folder of `shadowllm export --policy P --out DIR` on the embedded
    model with no other flag (made once per policy per session, through the CLI as a user would)."""
    made = {}

    def make(policy: str):
        if policy not in made:
            out = tmp_path_factory.mktemp("default-exports") / policy
            run = subprocess.run([sys.executable, "-m", "shadowllm", "export", "--policy", policy, "--out", str(out)],
                                 capture_output=True, text=True)
            assert run.returncode == 0, run.stderr[-2000:]
            made[policy] = out
        return made[policy]
    return make
