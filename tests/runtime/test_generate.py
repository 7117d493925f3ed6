"""Sampling filters and the shared generation loop (checked against HF `generate`)."""

import pytest
import torch

from shadowllm.models import ShadowError
from shadowllm.models.tiny import build_model, byte_tokenizer
from shadowllm.runtime import Sampling, TorchBackend, generate
from shadowllm.runtime.sampling import Sampler, filter_logits


def test_top_k_and_top_p_keep_the_right_sets(rng):
    logits = torch.randn(4, 50, generator=rng)
    kept = torch.isfinite(filter_logits(logits, top_k=7))
    for row in range(4):
        assert set(kept[row].nonzero().flatten().tolist()) == set(torch.topk(logits[row], 7).indices.tolist())
    kept = torch.isfinite(filter_logits(logits, top_p=0.6))
    probs = torch.softmax(logits, -1)
    for row in range(4):  # brute force: the smallest prefix of the sorted tokens reaching mass 0.6
        order = torch.argsort(probs[row], descending=True).tolist()
        mass, want = 0.0, set()
        for t in order:
            want.add(t)
            mass += float(probs[row, t])
            if mass >= 0.6:
                break
        assert set(kept[row].nonzero().flatten().tolist()) == want


def test_seeded_sampling_is_reproducible(rng):
    logits = torch.randn(3, 100, generator=rng)
    cfg = Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    a = [Sampler(cfg)(logits).tolist() for _ in range(2)]
    assert a[0] == a[1]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_flags(bad):
    with pytest.raises(ShadowError):
        Sampling(**bad)


@pytest.mark.parametrize("model_type", ["opt", "llama"])
def test_greedy_batch_with_left_padding_matches_hf_generate(model_type):
    model = build_model(model_type, seed=11)
    tok = byte_tokenizer()
    prompts = ["The cat sat on", "Hi", "A longer prompt, with punctuation!"]
    ours = generate(TorchBackend(model), tok, prompts, max_new_tokens=12, eos_ids=[])
    enc = [tok(p)["input_ids"] for p in prompts]
    for prompt_ids, completion in zip(enc, ours):
        ids = torch.tensor([prompt_ids])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert completion.token_ids == ref[0, len(prompt_ids):].tolist()
        assert completion.finish_reason == "length"


def test_stop_strings_and_streaming_agree():
    model = build_model("llama", seed=11)
    tok = byte_tokenizer()
    full = generate(TorchBackend(model), tok, "The cat", max_new_tokens=20, eos_ids=[])[0].text
    stop = full[5:8]
    pieces = []
    cut = generate(TorchBackend(model), tok, "The cat", max_new_tokens=20, stop=[stop], eos_ids=[],
                   on_text=lambda _, d: pieces.append(d))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]
    assert "".join(pieces) == cut.text


def test_eos_ends_a_row():
    model = build_model("llama", seed=11)
    tok = byte_tokenizer()
    first = generate(TorchBackend(model), tok, "Hello", max_new_tokens=8, eos_ids=[])[0].token_ids
    i = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # a token not seen before
    out = generate(TorchBackend(model), tok, "Hello", max_new_tokens=10, eos_ids=[first[i]])[0]
    assert out.finish_reason == "eos" and out.token_ids == first[:i]


def test_prompt_longer_than_positions():
    model = build_model("llama", seed=11)
    with pytest.raises(ShadowError, match="exceeds the model's 128 positions"):
        generate(TorchBackend(model), byte_tokenizer(), "x" * 120, max_new_tokens=20)
