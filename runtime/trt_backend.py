"""The TensorRT backend over a built engine (`shadowllm build DIR --target tensorrt`).

Same contract as the ONNX Runtime backend (runtime/backend.py), run through Polygraphy's TrtRunner;
the plugin library is loaded into TensorRT's plugin registry (getCreators) before the engine is
deserialised. The KV cache round-trips through host memory between steps: simple and correct; a
device-resident cache is the next step once a GPU machine with TensorRT can measure it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from shadowllm.models import ShadowError

from .native import load_trt_plugins
from .ort_backend import sparsity_value


def engine_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    for candidate in (folder, folder / "tensorrt"):
        if (candidate / "model.engine").is_file():
            return candidate
    raise ShadowError(f"{folder}: no TensorRT engine (expected model.engine from `shadowllm build {folder} "
                      f"--target tensorrt`)")


class TrtBackend:
    name = "tensorrt"

    def __init__(self, folder: str | os.PathLike, sparsity: float = 0.0):
        from shadowllm.compiler.tensorrt import requirements

        trt, library = requirements()
        folder = engine_folder(folder)
        self.manifest = json.loads((folder / "shadowllm.json").read_text())
        a = self.manifest["arch"]
        self.layers, self.heads, self.kv_heads = a["layers"], a["heads"], a["kv_heads"]
        self.head_dim, self.neurons = a["head_dim"], a["neurons"]
        self.vocab_size, self.max_positions = a["vocab"], a["max_positions"]
        self.sparsity = sparsity_value(self.manifest, sparsity)
        load_trt_plugins(trt, library)
        self.engine_bytes = (folder / "model.engine").read_bytes()
        self.runner = self.make_runner()
        self.runner.activate()

    def make_runner(self):
        """A new, inactive Polygraphy runner over the engine (Comparator.run activates its own)."""
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        return TrtRunner(EngineFromBytes(self.engine_bytes), name="tensorrt")

    def initial_state(self, batch: int, head_mask=None, neuron_mask=None):
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        heads = np.ones((batch, self.layers, self.heads), bool) if head_mask is None else np.asarray(head_mask)
        neurons = np.ones((batch, self.layers, self.neurons), bool) if neuron_mask is None else np.asarray(neuron_mask)
        return {"past": [empty] * (2 * self.layers), "heads": heads, "neurons": neurons}

    def forward(self, input_ids, attention_mask, state, last_only: bool = False):
        """last_only: the last position's logits (the engine keeps `logits_to_keep` at its default, every
        position: TensorRT folds an initializer-backed input into a constant)."""
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
        for i, past in enumerate(state["past"]):
            feeds[f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}"] = past
        outs = self.runner.infer(feeds)
        past = [np.asarray(outs[f"present.{i // 2}.{('key', 'value')[i % 2]}"]) for i in range(2 * self.layers)]
        state = {"past": past, "heads": np.asarray(outs["shadow_head_mask_out"]),
                 "neurons": np.asarray(outs["shadow_neuron_mask_out"])}
        logits = torch.from_numpy(np.asarray(outs["logits"], dtype=np.float32))
        return (logits[:, -1:] if last_only else logits), state
