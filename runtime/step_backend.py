"""The base of backends that run an export's graph once per step with NumPy arrays in and out:
TensorRT (runtime/trt_backend.py, through Polygraphy's runner) and Triton's step model
(serving/triton_model.py, through BLS). Inputs and outputs are named as docs/design.md §4; the state holds the
KV caches and the carried masks as arrays. A subclass says how one step runs."""

from __future__ import annotations

import numpy as np
import torch

from shadowllm.export.names import cache_names
from shadowllm.models import ShadowError


class StepBackend:
    def _arch(self, manifest: dict):
        self.manifest = manifest
        a = manifest["arch"]
        self.layers, self.heads, self.kv_heads = a["layers"], a["heads"], a["kv_heads"]
        self.head_dim, self.neurons = a["head_dim"], a["neurons"]
        self.vocab_size, self.max_positions = a["vocab"], a["max_positions"]
        self.past, self.present = cache_names(self.layers)
        self.outputs = ["logits", *self.present, "shadow_head_mask_out", "shadow_neuron_mask_out"]

    def _run(self, feeds: dict, last_only: bool) -> dict:
        """One step: {input name: array} -> {output name: array}."""
        raise NotImplementedError

    def initial_state(self, batch: int, head_mask=None, neuron_mask=None):
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        heads = np.ones((batch, self.layers, self.heads), bool) if head_mask is None else np.asarray(head_mask)
        neurons = np.ones((batch, self.layers, self.neurons), bool) if neuron_mask is None else np.asarray(neuron_mask)
        return {"past": [empty] * (2 * self.layers), "heads": heads, "neurons": neurons}

    def forward(self, input_ids, attention_mask, state, last_only: bool = False):
        ids = input_ids.numpy().astype(np.int64)
        mask = attention_mask.numpy().astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ShadowError(f"token ids must lie in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
        if state is None:
            state = self.initial_state(ids.shape[0])
        P = mask.shape[1] - ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": mask,
                 "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, P:].astype(np.int64),
                 "shadow_head_mask": state["heads"], "shadow_neuron_mask": state["neurons"], "sparsity": self.sparsity}
        feeds.update(zip(self.past, state["past"]))
        outs = self._run(feeds, last_only)
        state = {"past": [np.asarray(outs[name]) for name in self.present],
                 "heads": np.asarray(outs["shadow_head_mask_out"]), "neurons": np.asarray(outs["shadow_neuron_mask_out"])}
        logits = torch.from_numpy(np.array(outs["logits"], dtype=np.float32))
        return (logits[:, -1:] if last_only else logits), state
