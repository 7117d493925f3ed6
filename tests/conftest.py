import os
import subprocess
import sys

import pytest
import torch

# Tests never touch the network; everything they load is built in code or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under `pytest -n N` the workers share the cores: each worker (and every process it starts, through
# OMP_NUM_THREADS, which torch and our onnxruntime sessions both read) gets its share. Left at every
# core each, their spinning thread pools oversubscribe the machine and the suite runs much slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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

