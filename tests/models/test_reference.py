"""The sparse PyTorch reference forward against HF transformers (an independent oracle)."""

import pytest
import torch

from shadowllm.models import ShadowError, adapter_for, sparse_forward
from tests.hf_oracle import hf_logits, masked

TOL = 1e-5


def assert_close(ours, ref):
    """fp32 against HF: TOL, scaled by the logits' magnitude when it exceeds 1 (fp32 rounding of a
    logit grows with it; with fresh random inputs a fixed 1e-5 failed once at 1.66e-5 on logits ~3.4)."""
    scale = max(1.0, float(ref.abs().max()))
    assert (ours - ref).abs().max().item() <= TOL * scale


def random_ids(model, rng, batch, seq):
    return torch.randint(0, adapter_for(model).arch.vocab, (batch, seq), generator=rng)


def random_masks(model, rng, batch, keep=0.5, per_token_len=None):
    arch = adapter_for(model).arch
    lead = (batch,) if per_token_len is None else (batch, per_token_len)
    heads = torch.rand(*lead, arch.num_layers, arch.num_heads, generator=rng) < keep
    neurons = torch.rand(*lead, arch.num_layers, arch.ffn, generator=rng) < keep
    return heads, neurons


def left_padding(batch, seq, rng):
    """Rows padded on the left by 0..seq/2 tokens (row 0 unpadded)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, : int(torch.randint(1, seq // 2, (1,), generator=rng))] = 0
    return mask


@torch.no_grad()
def test_dense_matches_hf(tiny, rng):
    ids = random_ids(tiny, rng, 3, 13)
    ours, _ = sparse_forward(tiny, ids)
    ref, _ = hf_logits(tiny, ids)
    assert_close(ours, ref)
    assert ref.std() > 0.1  # a meaningful comparison, not two near-constant tensors


@torch.no_grad()
def test_dense_left_padding_and_decode_match_hf(tiny, rng):
    ids = random_ids(tiny, rng, 3, 12)
    mask = left_padding(3, 12, rng)
    ours, past = sparse_forward(tiny, ids, attention_mask=mask)
    ref, cache = hf_logits(tiny, ids, mask)
    valid = mask.bool()
    assert (ours - ref)[valid].abs().max().item() <= TOL
    for _ in range(4):  # decode steps with the KV cache
        step = random_ids(tiny, rng, 3, 1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        ours, past = sparse_forward(tiny, step, attention_mask=mask, past=past)
        ref, cache = hf_logits(tiny, step, mask, cache)
        assert_close(ours, ref)


@torch.no_grad()
@pytest.mark.parametrize("kv_policy", ["all", "active"])
def test_per_sequence_masks_match_hf_hooks(tiny, rng, kv_policy):
    """Different masks per row, prefill then decode, against HF with zeroing hooks."""
    ids = random_ids(tiny, rng, 3, 9)
    heads, neurons = random_masks(tiny, rng, 3)
    heads[0] = True  # one row dense in heads: rows must not leak into each other
    ours, past = sparse_forward(tiny, ids, heads, neurons, kv_policy=kv_policy)
    with masked(tiny, heads, neurons):
        ref, cache = hf_logits(tiny, ids)
        assert_close(ours, ref)
        mask = torch.ones(3, 9, dtype=torch.long)
        for _ in range(3):
            step = random_ids(tiny, rng, 3, 1)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            ours, past = sparse_forward(tiny, step, heads, neurons, mask, past, kv_policy=kv_policy)
            ref, cache = hf_logits(tiny, step, mask, cache)
            assert_close(ours, ref)


@torch.no_grad()
def test_per_token_masks_match_hf_hooks(tiny, rng):
    ids = random_ids(tiny, rng, 2, 7)
    heads, neurons = random_masks(tiny, rng, 2, per_token_len=7)
    ours, _ = sparse_forward(tiny, ids, heads, neurons)
    with masked(tiny, heads, neurons):
        ref, _ = hf_logits(tiny, ids)
    assert_close(ours, ref)


@torch.no_grad()
def test_masked_rows_are_skipped_not_zeroed(tiny, rng):
    """Poison the weights of masked heads and neurons with NaN: skipping never reads them."""
    import copy

    model = copy.deepcopy(tiny)
    arch = adapter_for(model).arch
    ids = random_ids(model, rng, 1, 6)
    heads, neurons = random_masks(model, rng, 1)
    clean, _ = sparse_forward(model, ids, heads, neurons)
    E = arch.head_dim
    for layer in range(arch.num_layers):
        a, m = adapter_for(model).attention(layer), adapter_for(model).mlp(layer)
        for h in (~heads[0, layer]).nonzero().flatten().tolist():
            a.w_q[h * E:(h + 1) * E] = float("nan")
            a.w_o_t[h * E:(h + 1) * E] = float("nan")
        off = ~neurons[0, layer]
        m.w_in[off] = float("nan")
        m.w_out_t[off] = float("nan")
        if m.w_gate is not None:
            m.w_gate[off] = float("nan")
    poisoned, _ = sparse_forward(model, ids, heads, neurons)
    assert torch.isfinite(poisoned).all()
    assert torch.equal(poisoned, clean)


@torch.no_grad()
def test_kv_policy_active_leaves_unused_groups_zero(rng):
    from shadowllm.models.tiny import build_model

    model = build_model("llama", seed=3)  # 6 query heads over 2 kv heads
    arch = adapter_for(model).arch
    ids = random_ids(model, rng, 2, 5)
    heads = torch.ones(2, arch.num_layers, arch.num_heads, dtype=torch.bool)
    heads[0, 1, :3] = False  # row 0, layer 1: the whole first group is off
    logits_all, past_all = sparse_forward(model, ids, heads, kv_policy="all")
    logits_act, past_act = sparse_forward(model, ids, heads, kv_policy="active")
    assert (logits_all - logits_act).abs().max().item() <= TOL
    key = past_act[1][0]
    assert key[0, 0].abs().max() == 0 and key[0, 1].abs().max() > 0 and key[1, 0].abs().max() > 0


@torch.no_grad()
def test_empty_and_full_masks(tiny, rng):
    arch = adapter_for(tiny).arch
    ids = random_ids(tiny, rng, 2, 5)
    full_h = torch.ones(2, arch.num_layers, arch.num_heads, dtype=torch.bool)
    full_n = torch.ones(2, arch.num_layers, arch.ffn, dtype=torch.bool)
    dense, _ = sparse_forward(tiny, ids)
    full, _ = sparse_forward(tiny, ids, full_h, full_n)
    assert (dense - full).abs().max().item() <= TOL
    empty_h, empty_n = ~full_h, ~full_n
    ours, _ = sparse_forward(tiny, ids, empty_h, empty_n)
    with masked(tiny, empty_h, empty_n):
        ref, _ = hf_logits(tiny, ids)
    assert_close(ours, ref)


def test_bad_masks_are_clear_errors(tiny):
    arch = adapter_for(tiny).arch
    ids = torch.randint(0, arch.vocab, (2, 4))
    with pytest.raises(ShadowError, match="head_mask has shape"):
        sparse_forward(tiny, ids, torch.ones(2, arch.num_layers, arch.num_heads + 1, dtype=torch.bool))
    with pytest.raises(ShadowError, match="bool tensor"):
        sparse_forward(tiny, ids, neuron_mask=torch.ones(2, arch.num_layers, arch.ffn))
    with pytest.raises(ShadowError, match="token ids"):
        sparse_forward(tiny, torch.full((1, 3), arch.vocab))
    with pytest.raises(ShadowError, match="positions"):
        sparse_forward(tiny, torch.zeros(1, arch.max_positions + 1, dtype=torch.long))


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_matches_hf(smollm2, rng):
    """Dense: fp32, <= 1e-5. Partial masks: in float64, where only summation order differs between
    gathering rows and zeroing them (in fp32 that order difference alone, amplified through 30
    layers of a randomly masked network, reaches ~1e-4..1e-3 in the logits)."""
    import copy

    model, _ = smollm2
    arch = adapter_for(model).arch
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.ffn) == (30, 9, 3, 1536)
    ids = random_ids(model, rng, 2, 24)
    ours, _ = sparse_forward(model, ids)
    ref, _ = hf_logits(model, ids)
    assert_close(ours, ref)

    model64 = copy.deepcopy(model).double()
    heads, neurons = random_masks(model64, rng, 2, keep=0.6)
    ours, past = sparse_forward(model64, ids, heads, neurons)
    with masked(model64, heads, neurons):
        ref, cache = hf_logits(model64, ids)
        assert (ours - ref).abs().max().item() <= 1e-9
        step = random_ids(model64, rng, 2, 1)
        mask = torch.ones(2, 25, dtype=torch.long)
        ours, _ = sparse_forward(model64, step, heads, neurons, mask, past)
        ref, _ = hf_logits(model64, step, mask, cache)
        assert (ours - ref).abs().max().item() <= 1e-9


@torch.no_grad()
def test_per_matrix_thresholds(rng):
    """Thresholds given per matrix (a study's tuple: q, k, v / gate, up): the MLP against its float64
    formula with each matrix reading its own thresholded copy of x; attention's k/v cache follows
    only the k/v thresholds; a tuple of equal values is the single threshold."""
    from shadowllm.models.reference import attention_block, mlp_block
    from shadowllm.models.tiny import build_model

    model = build_model("llama", seed=5)
    adapter = adapter_for(model)
    arch = adapter.arch
    x = torch.randn(2, 4, arch.hidden, generator=rng)
    t_gate, t_up = [torch.tensor(float(v)) for v in x.abs().flatten().quantile(torch.tensor([0.3, 0.6]))]
    m = adapter.mlp(1)
    y = mlp_block(arch.activation, m, x, t_x=(t_gate, t_up))
    xd = x.double()
    keep = lambda t: torch.where(xd.abs() >= float(t), xd, torch.zeros((), dtype=torch.float64))  # noqa: E731
    h = torch.nn.functional.silu(keep(t_gate) @ m.w_gate.double().t()) * (keep(t_up) @ m.w_in.double().t())
    assert arch.activation == "silu" and (y.double() - h @ m.w_out_t.double()).abs().max().item() <= 1e-5
    assert torch.equal(mlp_block(arch.activation, m, x, t_x=(t_gate, t_gate)), mlp_block(arch.activation, m, x, t_x=t_gate))

    a = adapter.attention(1)
    rope = adapter.rope(torch.arange(4).expand(2, 4))
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()[None].expand(2, 4, 4)
    empty = torch.zeros(2, arch.num_kv_heads, 0, arch.head_dim)

    def run(t_x):
        return attention_block(arch, a, x, (empty, empty), allowed, rope, t_x=t_x)

    dense, scalar = run(None), run(t_up)
    q_only, kv_only = run((t_up, None, None)), run((None, t_up, t_up))
    assert torch.equal(q_only[1], dense[1]) and torch.equal(q_only[2], dense[2])
    assert torch.equal(kv_only[1], scalar[1]) and torch.equal(kv_only[2], scalar[2])
    assert not torch.equal(q_only[0], dense[0]) and not torch.equal(kv_only[0], scalar[0])
    assert torch.equal(run((t_up, t_up, t_up))[0], scalar[0])
