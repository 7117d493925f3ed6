"""Stage 2: importance, sparsity allocation, masks and accuracy evaluation."""

from .allocation import ALLOCATIONS, check_sparsity, keep_mask
from .evaluate import perplexity
from .fixed_masks import fixed_masks

__all__ = ["ALLOCATIONS", "check_sparsity", "fixed_masks", "keep_mask", "perplexity"]
