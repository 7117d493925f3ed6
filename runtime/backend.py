"""The one interface every backend implements (Polygraphy-style: loaders and runners behind a seam).

A backend runs the model on new tokens given an opaque state (its KV cache) and returns logits
[B, S, V] and the next state. The generation loop, parity checks and benchmarks only see this.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Backend(Protocol):
    name: str
    max_positions: int
    vocab_size: int

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any,
                last_only: bool = False) -> tuple[torch.Tensor, Any]:
        """input_ids [B, S]; attention_mask [B, past+S]; state None at prefill. last_only: logits
        [B, 1, V] of the last position (generation's prefill), the LM head run on that row alone
        where the backend can."""
        ...
