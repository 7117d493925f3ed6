"""The CUDA backend (the plugins' CUDA kernels driving a whole model on the GPU) against the PyTorch
reference (`TorchBackend` on the CPU, float32, a separate copy of the model): logits of the prefill
and of every decode step (the decode steps replayed from a captured CUDA graph), greedy tokens, for
dense, fixed masks and activation thresholds. Without a CUDA device: the one-line refusal."""

import copy
import subprocess
import sys

import pytest
import torch

from shadowllm.models import ShadowError
from shadowllm.models.tiny import build_model, byte_tokenizer
from shadowllm.runtime import TorchBackend, generate
from shadowllm.runtime.cuda_kernels import cuda_available

NO_CUDA = cuda_available()
needs_cuda = pytest.mark.skipif(NO_CUDA is not None, reason=f"CUDA backend cannot run here: {NO_CUDA}")


def test_cuda_backend_refuses_in_one_line_without_a_gpu():
    if NO_CUDA is None:
        pytest.skip("a CUDA device is present: the refusal path does not apply")
    from shadowllm.runtime.cuda_backend import CudaBackend

    with pytest.raises(ShadowError, match="--backend cuda: "):
        CudaBackend(build_model("llama", seed=1))
    run = subprocess.run([sys.executable, "-m", "shadowllm", "generate", "--backend", "cuda", "--prompt", "hi"],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "--backend cuda" in run.stderr and "Traceback" not in run.stderr


def _steps(backend, ids, steps):
    """Logits of a prefill and `steps` greedy decode steps."""
    mask = torch.ones_like(ids)
    logits, state = backend.forward(ids, mask, None)
    out = [logits[:, -1].float().cpu()]
    for _ in range(steps):
        ids = out[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        logits, state = backend.forward(ids, mask, state)
        out.append(logits[:, -1].float().cpu())
    return out


def _policy(name, arch):
    g = torch.Generator().manual_seed(3)
    if name == "dense":
        return {}
    if name == "masks":
        heads = torch.rand(arch.num_layers, arch.num_heads, generator=g) < 0.6
        heads[:, 0] = True
        return dict(head_mask=heads, neuron_mask=torch.rand(arch.num_layers, arch.ffn, generator=g) < 0.5)
    return dict(thresholds=torch.full((arch.num_layers, 4), 0.05))  # thresholds: a fixed small cut


@needs_cuda
@pytest.mark.parametrize("policy", ["dense", "masks", "thresholds"])
@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_cuda_backend_matches_the_reference_in_fp32(model_type, policy):
    from shadowllm.runtime.cuda_backend import CudaBackend

    model = build_model(model_type, seed=5)
    reference_model = copy.deepcopy(model)
    arch = TorchBackend(reference_model).arch
    kw = _policy(policy, arch)
    reference = TorchBackend(reference_model, kw.get("head_mask"), kw.get("neuron_mask"),
                             thresholds=kw.get("thresholds"))
    ours = CudaBackend(model, dtype="fp32", capacity=64, **kw)
    ids = torch.randint(3, arch.vocab, (2, 9), generator=torch.Generator().manual_seed(9))
    want, got = _steps(reference, ids, 12), _steps(ours, ids, 12)
    for step, (a, b) in enumerate(zip(want, got)):
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) <= 1e-4 * max(scale, 1.0), f"step {step}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}"


@needs_cuda
def test_cuda_backend_generates_like_the_reference_in_bf16():
    from shadowllm.runtime.cuda_backend import CudaBackend

    model = build_model("llama", seed=11)
    tok = byte_tokenizer()
    prompts = ["The cat sat on", "Hi"]
    want = generate(TorchBackend(copy.deepcopy(model)), tok, prompts, max_new_tokens=16, eos_ids=[])
    got = generate(CudaBackend(model, dtype="bf16", capacity=64), tok, prompts, max_new_tokens=16, eos_ids=[])
    # bf16 keeps 8 significant bits: greedy paths may part where two logits are within its rounding;
    # the first tokens must agree.
    for a, b in zip(want, got):
        assert a.token_ids[:4] == b.token_ids[:4]


def test_cuda_backend_cache_doubles_and_keeps_the_past():
    """A request longer than the preallocated cache gets one twice as long holding the same past
    (pure torch bookkeeping, checked on the CPU; the kernels then write past it in place)."""
    from types import SimpleNamespace

    from shadowllm.runtime.cuda_backend import CudaBackend

    backend = CudaBackend.__new__(CudaBackend)  # no GPU here: only the cache bookkeeping is exercised
    backend.arch = SimpleNamespace(num_kv_heads=2, head_dim=4, num_layers=3, max_positions=40)
    backend.capacity, backend.dtype, backend.device = 8, torch.float32, torch.device("cpu")
    state = backend._new_state(batch=2, tokens=5)
    assert state.keys[0].shape == (2, 2, 8, 4)
    for t in state.keys + state.values:
        t[:, :, :6].normal_()
    state.past = 6
    grown = backend._grown(state, 9)
    assert grown.keys[0].shape[2] == 16 and grown.past == 6
    for old, new in zip(state.keys + state.values, grown.keys + grown.values):
        assert torch.equal(new[:, :, :6], old[:, :, :6]) and not new[:, :, 6:].any()
    assert backend._grown(grown, 30).keys[0].shape[2] == 32
    with pytest.raises(ShadowError, match="exceed the model's 40"):
        backend._new_state(1, 41)
