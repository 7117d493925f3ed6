"""The public Python API for deployed models: `shadowllm.load(DIR).generate(...)`."""

from __future__ import annotations

import os
from pathlib import Path

from shadowllm.models import ShadowError
from shadowllm.runtime import Sampling, generate
from shadowllm.runtime.ort_backend import OrtBackend, check_export_folder


class Deployed:
    """An export folder loaded with its tokenizer on ONNX Runtime, or on TensorRT when the folder holds
    an engine built by `shadowllm build DIR --target tensorrt` and backend="tensorrt"."""

    def __init__(self, folder: str | os.PathLike, sparsity: float = 0.0, backend: str = "ort"):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.manifest = check_export_folder(self.folder)
        if backend == "tensorrt":
            from shadowllm.runtime.trt_backend import TrtBackend

            self.backend = TrtBackend(self.folder, sparsity)
        elif backend == "ort":
            self.backend = OrtBackend(self.folder, sparsity)
        else:
            raise ShadowError(f"--backend {backend!r}: expected ort or tensorrt for an export folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ShadowError(f"{self.folder}: no usable tokenizer ({str(e).splitlines()[0]})") from None

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop=(), on_text=None):
        """Completions for a prompt (returns one Completion) or a list of prompts (returns a list)."""
        out = generate(self.backend, self.tokenizer, prompts, max_new_tokens, Sampling(temperature, top_k, top_p, seed),
                       stop=stop, on_text=on_text)
        return out[0] if isinstance(prompts, str) else out


def load(folder: str | os.PathLike, sparsity: float = 0.0, backend: str = "ort") -> Deployed:
    return Deployed(folder, sparsity, backend)


def is_export_folder(path) -> bool:
    return path is not None and (Path(path) / "shadowllm.json").is_file() and (Path(path) / "model.onnx").is_file()
