"""Loading local folders and the embedded model; bad folders are one clear error."""

import json

import pytest
import torch

from shadowllm.models import ShadowError, fingerprint, load
from shadowllm.models.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny("llama", folder, seed=5)
    return folder


def test_local_folder_round_trip(tiny_folder):
    model, tokenizer = load(tiny_folder)
    original = save_tiny("llama", tiny_folder.parent / "again", seed=5)
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert fingerprint(model) == fingerprint(original)


def test_fingerprint_tells_models_apart():
    from shadowllm.models.tiny import build_model

    assert fingerprint(build_model("llama", seed=1)) != fingerprint(build_model("llama", seed=2))


def test_unknown_name_or_missing_folder(tmp_path):
    with pytest.raises(ShadowError, match="no such folder, and not a known model name"):
        load("no-such-model")
    with pytest.raises(ShadowError, match="no config.json"):
        load(tmp_path)


def test_partial_and_corrupt_folders(tiny_folder, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(tiny_folder, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(ShadowError, match="no model.safetensors"):
        load(partial)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_folder, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ShadowError, match="corrupt safetensors"):
        load(corrupt)

    bad_json = tmp_path / "badjson"
    shutil.copytree(tiny_folder, bad_json)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ShadowError, match="not valid JSON"):
        load(bad_json)


def test_pickle_checkpoints_are_refused(tiny_folder, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ShadowError, match="pickle"):
        load(folder)


def test_unsupported_architecture(tiny_folder, tmp_path):
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShadowError):
        load(folder)


@pytest.mark.slow
def test_embedded_default_model(smollm2):
    from shadowllm.models.loading import MANIFEST, cache_root

    model, tokenizer = smollm2
    folder = cache_root() / "models" / "smollm2-135m"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["fingerprint"] == fingerprint(model)
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg  # the cached folder reloads without GGUF
    assert tokenizer.decode(tokenizer("Paris is")["input_ids"]) == "Paris is"


def test_conversion_finished_by_another_process_is_kept(tmp_path, monkeypatch, tiny_folder):
    """Two processes converting the embedded model at once (e.g. parallel test workers): the one that
    finishes second keeps the first one's folder — which that process may already be reading — and
    removes its own copy, instead of deleting the finished folder to put its own in place."""
    import transformers

    from shadowllm.models import loading

    spec = loading.EMBEDDED["smollm2-135m"]
    gguf = tmp_path / spec.gguf
    gguf.write_bytes(b"not read: the loaders below are stand-ins")
    monkeypatch.setenv("SHADOWLLM_GGUF", str(gguf))
    monkeypatch.setenv("SHADOWLLM_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "cache" / "models" / "smollm2-135m"
    model, tokenizer = load(tiny_folder)
    save = model.save_pretrained

    def save_while_the_other_finishes(folder, **kwargs):
        dest.mkdir(parents=True)
        (dest / loading.MANIFEST).write_text('{"name": "smollm2-135m"}\n')
        (dest / "written-by-the-other-process").write_text("")
        save(folder, **kwargs)

    monkeypatch.setattr(model, "save_pretrained", save_while_the_other_finishes)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    assert loading.ensure_embedded("smollm2-135m") == dest
    assert (dest / "written-by-the-other-process").is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["smollm2-135m"]  # no temporary folder left


def test_atomic_folder_never_replaces_what_another_process_wrote(tmp_path):
    """The folder a run writes appears whole or not at all; when another process filled it meanwhile,
    this run fails with one line naming it, leaves the other's files alone and no temporary folder."""
    from shadowllm.models.paths import atomic_folder

    out = tmp_path / "result"
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("first")
    assert (out / "a").read_text() == "first"
    with pytest.raises(ShadowError, match=f"{out}: was written by another process meanwhile"):
        with atomic_folder(out) as tmp:
            (tmp / "a").write_text("second")
    assert (out / "a").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "failed") as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_fingerprints_of_older_families_did_not_move():
    """A fingerprint hashes the shape's text (Arch.identity) with the weights; the fields revision 6 added
    for newer families enter only when set, so a Llama / OPT model keeps the fingerprint it had before
    them: the shipped built-in calibrations are named by it, and older exports record it."""
    from shadowllm.models import adapter_for
    from shadowllm.models.tiny import build_model

    assert adapter_for(build_model("llama")).arch.identity() == (
        "Arch(family='llama', model_type='llama', num_layers=3, hidden=96, num_heads=6, num_kv_heads=2, head_dim=16, "
        "ffn=80, activation='silu', gated=True, rope=True, vocab=260, max_positions=128, norm='rmsnorm', "
        "norm_eps=1e-05, pre_norm=True, sliding_window=None)")
    assert "qk_norm=True" in adapter_for(build_model("qwen3")).arch.identity()
