"""The CUDA backend's own logic — policies and their predictors, per-row masks, the preallocated cache
and its growth, batches with left padding, export folders, `parity --backend cuda` — against the
PyTorch reference backend: the same logits and greedy tokens. Each test runs on the CPU with the
kernels' torch reference (`device="cpu"`, in CI) and, where a GPU is, with the CUDA kernels
(`device="cuda"`, CUDA graphs on)."""

import copy
import json

import pytest
import torch

from shadowllm.models import ShadowError
from shadowllm.models.tiny import build_model, byte_tokenizer
from shadowllm.predictor.traces import calibrate
from shadowllm.predictor.train import train
from shadowllm.runtime import TorchBackend, generate
from shadowllm.runtime.cuda_backend import CudaBackend
from shadowllm.runtime.cuda_kernels import cuda_available

NO_CUDA = cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(NO_CUDA is not None,
                                                                reason=f"no CUDA kernels here: {NO_CUDA}"))]


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    model = build_model("llama", seed=21)
    out = tmp_path_factory.mktemp("traces")
    calibrate(model, byte_tokenizer(), out, ["plainact"], samples=8, window=40, token_positions=6, shard_size=8,
              progress=False)
    return model, {name: train(str(out), kind, granularity, criterion="plainact", epochs=2, progress=False)
                   for name, kind, granularity in (("sequence", "shadow", "sequence"), ("token", "shadow", "token"),
                                                   ("dejavu", "dejavu", "token"))}


def decode(backend, ids, mask, steps):
    """Logits [B, V] of the prefill's last position and of `steps` greedy decode steps (fed the
    reference's tokens by the caller's loop: here each backend decodes its own greedy tokens)."""
    logits, state = backend.forward(ids, mask, None)
    out = [logits[:, -1]]
    for _ in range(steps):
        nxt = out[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        logits, state = backend.forward(nxt, mask, state)
        out.append(logits[:, -1])
    return torch.stack(out, 1), state


def batch():
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def assert_same(ours, reference):
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))  # identical greedy tokens, every step
    assert float((ours - reference).abs().max()) <= 1e-4 * max(1.0, float(reference.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["dense", "masks", "thresholds"])
def test_fixed_policies_match_the_reference_across_cache_growth(policy, device):
    from shadowllm.models import adapter_for

    model = build_model("opt" if policy == "masks" else "llama", seed=3)
    arch = adapter_for(model).arch
    g = torch.Generator().manual_seed(3)
    config = {"dense": {},
              "masks": dict(head_mask=torch.rand(arch.num_layers, arch.num_heads, generator=g) < 0.6,
                            neuron_mask=torch.rand(arch.num_layers, arch.ffn, generator=g) < 0.5),
              "thresholds": dict(thresholds=torch.full((arch.num_layers, 4), 0.05))}[policy]
    ids, mask = batch()
    reference, _ = decode(TorchBackend(model, **config), ids, mask, 12)
    ours, state = decode(CudaBackend(copy.deepcopy(model), **config, dtype="fp32", device=device, capacity=8),
                         ids, mask, 12)
    assert state.keys[0].shape[2] >= 19 and state.past == 19  # 8 positions grew to hold 7 + 12
    assert_same(ours, reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sequence", "token", "dejavu"])
def test_predictor_policies_match_the_reference(predictors, name, device):
    """The predictor on the backend's device, per row of a left-padded batch: per sequence (masks
    from the prefill, carried, kv_policy=active), per token, DejaVu lookahead."""
    model, trained = predictors
    predictor = trained[name]
    ids, mask = batch()
    kwargs = dict(predictor=predictor, head_sparsity=0.5, neuron_sparsity=0.5)
    reference, _ = decode(TorchBackend(model, **kwargs), ids, mask, 10)
    ours, state = decode(CudaBackend(copy.deepcopy(model), **kwargs, dtype="fp32", device=device, capacity=16),
                         ids, mask, 10)
    assert_same(ours, reference)
    if name == "sequence":
        heads, _ = state.masks
        assert heads.shape == (model.config.num_hidden_layers, 2, model.config.num_attention_heads)
        assert not bool(heads[1:].all())  # the predictor's masks, carried through decode
    dense, _ = decode(TorchBackend(model), ids, mask, 10)
    assert not torch.equal(dense.argmax(-1), reference.argmax(-1)) or float((dense - reference).abs().max()) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_an_export_folder_runs_with_its_policy(predictors, tmp_path, device):
    """from_export: the export's policy (here a per-token ShadowLLM predictor at 0.5 of neurons) from
    its manifest and predictor folder, checked against the model; generation equals the ONNX
    Runtime run of the same export."""
    from shadowllm.export.exporter import export
    from shadowllm.runtime.ort_backend import OrtBackend

    model, trained = predictors
    predictor_dir = tmp_path / "p-token"
    trained["token"].save(predictor_dir)
    folder = export(model, byte_tokenizer(), tmp_path / "e", "shadow", target="neurons", predictor=trained["token"],
                    predictor_dir=str(predictor_dir))
    ours = CudaBackend.from_export(folder, 0.5, dtype="fp32", device=device, model=copy.deepcopy(model))
    expect = generate(OrtBackend(folder, 0.5), byte_tokenizer(), ["hello", "abc def"], 10)
    got = generate(ours, byte_tokenizer(), ["hello", "abc def"], 10)
    assert [g.token_ids for g in got] == [e.token_ids for e in expect]
    with pytest.raises(ShadowError, match="fingerprint differs"):
        CudaBackend.from_export(folder, 0.5, dtype="fp32", device=device, model=build_model("llama", seed=99))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["dense", "static", "shadow"])
def test_parity_of_an_export_on_the_backend(predictors, tmp_path, policy, device):
    """`parity --backend cuda`'s check, with the kernels' reference: PASSED in fp32 for a dense export
    (random masks), a static one and a per-token predictor; with a broken kernel it fails."""
    from shadowllm.export.exporter import export
    from shadowllm.runtime import reference_kernels
    from shadowllm.parity.cuda import check_cuda

    model, trained = predictors
    kwargs = {}
    if policy == "static":
        g = torch.Generator().manual_seed(5)
        kwargs["static_scores"] = (torch.rand(model.config.num_hidden_layers, model.config.num_attention_heads,
                                              generator=g),
                                   torch.rand(model.config.num_hidden_layers, model.config.intermediate_size,
                                              generator=g))
    if policy == "shadow":
        trained["token"].save(tmp_path / "p")
        kwargs.update(predictor=trained["token"], predictor_dir=str(tmp_path / "p"))
    folder = export(model, byte_tokenizer(), tmp_path / policy, policy, **kwargs)
    report = check_cuda(folder, model, byte_tokenizer(), 0.5, steps=8, device=device)
    assert report.passed, report.table()
    assert report.table().splitlines()[-1] == "PASSED"
    if device == "cuda":  # 16-bit weights: logits within the scaled tolerance, tokens reported
        for dtype in ("bf16", "fp16"):
            report = check_cuda(folder, model, byte_tokenizer(), 0.5, steps=8, dtype=dtype, device=device)
            assert report.passed, report.table()
        return

    original = reference_kernels.sparse_neuron_mlp

    def off_by_a_little(x, w, mask, y, workspace, **kw):
        original(x, w, mask, y, workspace, **kw)
        y.mul_(1.001)
    reference_kernels.sparse_neuron_mlp = off_by_a_little
    try:
        assert not check_cuda(folder, model, byte_tokenizer(), 0.5, steps=4, device="cpu").passed
    finally:
        reference_kernels.sparse_neuron_mlp = original


def test_an_export_skeleton_without_its_graph_runs_on_the_backend(tmp_path, monkeypatch):
    """What scripts/gpu_bundle.py carries to a GPU machine: an export folder without model.onnx and its
    data runs on the CUDA backend (which reads the model's own weights), while onnxruntime still
    refuses it in one line; SHADOWLLM_GGUF must name the embedded model's file."""
    from shadowllm.export.exporter import export
    from shadowllm.models.loading import EMBEDDED, locate_gguf
    from shadowllm.runtime.ort_backend import OrtBackend
    from shadowllm.runtime.policy import export_policy

    model = build_model("llama", seed=9)
    g = torch.Generator().manual_seed(9)
    scores = (torch.rand(model.config.num_hidden_layers, model.config.num_attention_heads, generator=g),
              torch.rand(model.config.num_hidden_layers, model.config.intermediate_size, generator=g))
    folder = export(model, byte_tokenizer(), tmp_path / "static", "static", static_scores=scores)
    manifest = json.loads((folder / "shadowllm.json").read_text())
    expect = generate(TorchBackend(model, **export_policy(folder, manifest, model, 0.5)), byte_tokenizer(), "hello",
                      8)[0]
    (folder / "model.onnx").unlink()
    (folder / "model.onnx.data").unlink()
    with pytest.raises(ShadowError, match="missing model.onnx"):
        OrtBackend(folder, 0.5)
    got = generate(CudaBackend.from_export(folder, 0.5, dtype="fp32", device="cpu", model=copy.deepcopy(model)),
                   byte_tokenizer(), "hello", 8)[0]
    assert got.token_ids == expect.token_ids
    monkeypatch.setenv("SHADOWLLM_GGUF", str(tmp_path / "other.gguf"))
    with pytest.raises(ShadowError, match="SHADOWLLM_GGUF"):
        locate_gguf(EMBEDDED["smollm2-135m"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "phi3", "mistral-window"])
def test_newer_families_match_the_reference(family, device):
    """q/k norms, post-norms, per-layer RoPE tables, partial rotary and sliding windows (8 tokens, a
    prompt of 7 + 12 decode steps crosses it) through the backend's kernels, thresholds on."""
    from shadowllm.models import adapter_for

    model = build_model(family, seed=3)
    thresholds = torch.full((adapter_for(model).arch.num_layers, 4), 0.05)
    ids, mask = batch()
    reference, _ = decode(TorchBackend(model, thresholds=thresholds), ids, mask, 12)
    ours, _ = decode(CudaBackend(copy.deepcopy(model), thresholds=thresholds, dtype="fp32", device=device,
                                 capacity=8), ids, mask, 12)
    assert_same(ours, reference)
