"""Sparsity allocation: counts, layer 0 dense, global and hybrid rules."""

import pytest
import torch

from shadowllm.models import ShadowError
from shadowllm.predictor import keep_mask


def test_per_layer_drops_the_lowest_in_each_layer():
    scores = torch.rand(4, 10)
    mask = keep_mask(scores, 0.3)
    assert mask[0].all()  # layer 0 dense
    for layer in range(1, 4):
        assert int((~mask[layer]).sum()) == 3
        dropped, kept = scores[layer][~mask[layer]], scores[layer][mask[layer]]
        assert dropped.max() < kept.min()


def test_batched_scores_give_one_mask_per_row():
    scores = torch.rand(5, 3, 8)
    mask = keep_mask(scores, 0.5)
    assert mask.shape == scores.shape and (~mask[:, 1:]).sum(-1).eq(4).all()


def test_global_uses_one_threshold():
    scores = torch.tensor([[5.0, 5, 5, 5], [1.0, 2, 3, 4], [10.0, 11, 12, 13]])
    mask = keep_mask(scores, 0.5, "global")
    assert mask[0].all() and not mask[1].any() and mask[2].all()


def test_hybrid_keeps_a_minimum_per_layer():
    scores = torch.tensor([[5.0, 5, 5, 5], [1.0, 2, 3, 4], [10.0, 11, 12, 13]])
    mask = keep_mask(scores, 0.5, "hybrid", min_keep=0.5)
    assert int(mask[1].sum()) == 2 and mask[1, 2:].all()
    assert int((~mask[1:]).sum()) == 4  # the budget moves to the other layer


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ShadowError, match=r"sparsity must lie in \[0, 1\)"):
        keep_mask(torch.rand(2, 4), bad)


def test_greedy_threshold_schedule_is_optimal_for_its_cost_model():
    """Each allocation the greedy threshold schedule passes through has the least total cost of all
    allocations that skip at least as many bytes (brute force over a small model), also when the
    cost curves are not convex (a level dearer than the line to the next one is jumped over)."""
    import itertools
    from types import SimpleNamespace

    from shadowllm.predictor.thresholds import greedy_schedule, input_sizes, input_weights

    arch = SimpleNamespace(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, hidden=8, ffn=12, gated=True,
                           block_parameters=1000)
    levels = (0.0, 0.2, 0.4, 0.6, 0.8)
    g = torch.Generator().manual_seed(1)
    per_level = torch.tensor(input_weights(arch), dtype=torch.float64) * torch.tensor(input_sizes(arch), dtype=torch.float64)
    lv = torch.tensor(levels, dtype=torch.float64)
    for _ in range(5):
        steps = torch.rand(1, 4, len(levels) - 1, generator=g, dtype=torch.float64) ** 3  # rising, often not convex
        costs = torch.cat([torch.zeros(1, 4, 1, dtype=torch.float64), steps.cumsum(-1)], -1)
        everything = [(float((per_level * lv[list(a)]).sum()), float(sum(costs[0, k, a[k]] for k in range(4))))
                      for a in itertools.product(range(len(levels)), repeat=4)]
        seen = 0
        for fraction, level in greedy_schedule(costs, arch, levels):
            saved = float((per_level * lv[level[0]]).sum())
            assert fraction == pytest.approx(saved / arch.block_parameters)
            cost = float(sum(costs[0, k, level[0, k]] for k in range(4)))
            best = min(c for s, c in everything if s >= saved - 1e-9)
            assert cost <= best + 1e-12
            seen += 1
        assert seen > 4 and level[0].eq(len(levels) - 1).all()  # it ends with every input at the top level
