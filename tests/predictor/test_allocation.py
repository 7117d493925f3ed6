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
