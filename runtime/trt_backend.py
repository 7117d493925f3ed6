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

from shadowllm.models import ShadowError

from shadowllm.compiler.native import load_trt_plugins
from shadowllm.export.folder import sparsity_value
from .step_backend import StepBackend


def engine_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    for candidate in (folder, folder / "tensorrt"):
        if (candidate / "model.engine").is_file():
            return candidate
    raise ShadowError(f"{folder}: no TensorRT engine (expected model.engine from `shadowllm build {folder} "
                      f"--target tensorrt`)")


class TrtBackend(StepBackend):
    name = "tensorrt"

    def __init__(self, folder: str | os.PathLike, sparsity: float = 0.0):
        from shadowllm.compiler.tensorrt import requirements

        trt, library = requirements()
        folder = engine_folder(folder)
        self._arch(json.loads((folder / "shadowllm.json").read_text()))
        self.sparsity = sparsity_value(self.manifest, sparsity)
        load_trt_plugins(trt, library)
        self.engine_bytes = (folder / "model.engine").read_bytes()
        self.runner = self.make_runner()
        self.runner.activate()

    def make_runner(self):
        """A new, inactive Polygraphy runner over the engine (Comparator.run activates its own)."""
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        return TrtRunner(EngineFromBytes(self.engine_bytes), name="tensorrt")

    def _run(self, feeds: dict, last_only: bool) -> dict:
        """(the engine keeps `logits_to_keep` at its default, every position: TensorRT folds an
        initializer-backed input into a constant; forward slices the last)"""
        return self.runner.infer(feeds)
