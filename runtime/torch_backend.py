"""The PyTorch reference backend: `sparse_forward` with fixed per-sequence masks."""

from __future__ import annotations

import torch

from shadowllm.models import adapter_for, sparse_forward


class TorchBackend:
    """Runs a HF model through the sparse reference; masks [L, H] / [L, F] apply to every row."""

    name = "torch"

    def __init__(self, model, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None,
                 kv_policy: str = "all"):
        self.model = model
        arch = adapter_for(model).arch
        self.max_positions = arch.max_positions
        self.vocab_size = arch.vocab
        self.head_mask, self.neuron_mask, self.kv_policy = head_mask, neuron_mask, kv_policy

    @staticmethod
    def _rows(mask, batch):
        return None if mask is None else mask.unsqueeze(0).expand(batch, *mask.shape)

    def forward(self, input_ids, attention_mask, state):
        B = input_ids.shape[0]
        with torch.inference_mode():
            return sparse_forward(self.model, input_ids, self._rows(self.head_mask, B),
                                  self._rows(self.neuron_mask, B), attention_mask, state,
                                  kv_policy=self.kv_policy)
