"""Generation driven by a shadow predictor agrees with the evaluation protocol's masks."""

import pytest
import torch

from shadowllm.models import sparse_forward
from shadowllm.models.tiny import build_model, byte_tokenizer
from shadowllm.predictor.allocation import keep_mask
from shadowllm.predictor.evaluation import ShadowToken, layer0_attention
from shadowllm.predictor.predictors import split_scores
from shadowllm.predictor.traces import calibrate
from shadowllm.predictor.train import train
from shadowllm.runtime import TorchBackend, generate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_model("llama", seed=21)
    tok = byte_tokenizer()
    out = tmp_path_factory.mktemp("traces")
    calibrate(model, tok, out, ["plainact"], samples=8, window=40, token_positions=6, shard_size=8, progress=False)
    seq = train(str(out), "shadow", "sequence", epochs=2, progress=False)
    token = train(str(out), "shadow", "token", epochs=2, progress=False)
    return model, tok, seq, token


def test_sequence_predictor_equals_its_fixed_masks(setup):
    model, tok, seq, _ = setup
    prompt = "The tower of Paris"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    x = layer0_attention(model, ids)[:, -1]
    heads, neurons = split_scores(seq.net(x), 6)
    heads, neurons = keep_mask(heads, 0.5)[0], keep_mask(neurons, 0.5)[0]
    fixed = generate(TorchBackend(model, heads, neurons, kv_policy="active"), tok, prompt, 12, eos_ids=[])[0]
    driven = generate(TorchBackend(model, predictor=seq, head_sparsity=0.5, neuron_sparsity=0.5), tok, prompt, 12,
                      eos_ids=[])[0]
    assert driven.token_ids == fixed.token_ids
    dense = generate(TorchBackend(model), tok, prompt, 12, eos_ids=[])[0]
    assert dense.token_ids != driven.token_ids  # the masks really change the computation


def test_token_predictor_decoding_matches_teacher_forced_protocol(setup):
    """Step-by-step decoding (backend) and one teacher-forced forward (eval) give the same logits."""
    model, tok, _, token = setup
    prompt = "A quick test"
    backend = TorchBackend(model, predictor=token, head_sparsity=0.3, neuron_sparsity=0.5)
    steps = []
    ids = torch.tensor([tok(prompt)["input_ids"]])
    logits, state = backend.forward(ids, torch.ones_like(ids), None)
    seq = ids
    for _ in range(6):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        logits, state = backend.forward(nxt, torch.ones_like(seq), state)
        steps.append(logits[0, -1])
    prompt_len = ids.shape[1]
    heads, _, _ = ShadowToken(token, "heads", 0.3, "per_layer").masks(model, seq, prompt_len)
    _, neurons, _ = ShadowToken(token, "neurons", 0.5, "per_layer").masks(model, seq, prompt_len)
    with torch.no_grad():
        ref, _ = sparse_forward(model, seq, heads, neurons)
    for i, step_logits in enumerate(steps):  # step i fed the token at position prompt_len + i
        assert torch.allclose(step_logits, ref[0, prompt_len + i], atol=1e-5), i
