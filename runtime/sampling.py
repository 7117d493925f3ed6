"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p and a seed."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from shadowllm.models import ShadowError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ShadowError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ShadowError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ShadowError(f"--top-p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass top_p."""
    logits = logits.float()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass of the tokens before it already reaches top_p (keeps >= 1).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    def __init__(self, config: Sampling):
        self.config = config
        self.generator = torch.Generator()
        # Without a seed, a fresh one from the OS: torch.seed() would reseed torch's *global* RNG and
        # make the caller's own seeded code irreproducible after a generate() call.
        self.generator.manual_seed(config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> token ids [B]."""
        c = self.config
        if c.greedy:
            return logits.argmax(-1)
        # float64 and the row maximum subtracted first: a tiny temperature (1e-45) gives a finite,
        # near-greedy distribution instead of inf / inf = NaN
        logits = logits.double()
        scaled = (logits - logits.max(-1, keepdim=True).values) / c.temperature
        probs = torch.softmax(filter_logits(scaled, c.top_k, c.top_p).double(), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
