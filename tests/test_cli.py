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
