"""The public Python API (`shadowllm.load(...).generate(...)`): what it accepts, what it refuses in one
line naming the argument, and streaming that yields exactly the text a plain call returns. (The
README's and docs/usage.md's calls on real export folders run in tests/test_docs.py.)"""

from __future__ import annotations

import pytest

import shadowllm
from shadowllm.api import Model
from shadowllm.models import ShadowError
from shadowllm.models.tiny import build_model, byte_tokenizer, save_tiny
from shadowllm.runtime import TorchBackend


@pytest.fixture(scope="module")
def tiny_model():
    return Model(TorchBackend(build_model("llama", seed=4)), byte_tokenizer(), None, None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="onnx"), "backend='onnx': expected one of ort, torch, cuda, tensorrt"),
    (dict(threads=0), "threads=0: expected an int >= 1 or None"),
    (dict(dtype="int3"), "dtype='int3': expected one of fp32, bf16, fp16"),
    (dict(backend="ort"), "smollm2-135m: not an export folder"),
    (dict(backend="torch", sparsity=0.5), "sparsity=0.5: a model loaded by name runs dense"),
])
def test_bad_load_arguments_are_one_line(kwargs, message):
    with pytest.raises(ShadowError) as e:
        shadowllm.load("smollm2-135m", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_export_folder_is_named(tmp_path):
    with pytest.raises(ShadowError, match="no such export folder"):
        shadowllm.load(tmp_path / "nothing-here", backend="ort")


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens=0: expected an int >= 1"),
    (dict(temperature=-1), "temperature=-1: expected a number >= 0"),
    (dict(top_p=0.0), "top_p=0.0: expected a number in (0, 1]"),
    (dict(top_k=-2), "top_k=-2: expected an int >= 0"),
    (dict(seed="x"), "seed='x': expected an int or None"),
])
def test_bad_generate_arguments_are_one_line(tiny_model, kwargs, message):
    with pytest.raises(ShadowError) as e:
        tiny_model.generate("hello", **kwargs)
    assert message in str(e.value)


def test_streaming_yields_the_text_of_a_plain_call(tiny_model):
    plain = tiny_model.generate("The sky", max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    deltas = list(tiny_model.generate("The sky", max_new_tokens=12, temperature=0.8, top_k=20, seed=3, stream=True))
    assert "".join(deltas) == plain.text and len(deltas) >= 1
    with pytest.raises(ShadowError, match="stream=True takes one prompt"):
        tiny_model.generate(["a", "b"], stream=True)


def test_a_batch_returns_one_completion_per_prompt(tiny_model):
    out = tiny_model.generate(["a", "bcd", "e"], max_new_tokens=4)
    assert [c.prompt for c in out] == ["a", "bcd", "e"] and all(len(c.token_ids) <= 4 for c in out)


def test_a_model_folder_runs_dense_on_torch(tmp_path):
    save_tiny("opt", tmp_path / "tiny", seed=2)
    model = shadowllm.load(tmp_path / "tiny", backend="torch")
    assert model.generate("hi", max_new_tokens=3).finish_reason in ("length", "eos")
    with pytest.raises(ShadowError, match="not an export folder"):
        shadowllm.load(tmp_path / "tiny", backend="ort")
