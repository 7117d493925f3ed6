"""The public Python API for deployed models: `shadowllm.load(DIR).generate(...)`."""

from __future__ import annotations

import os
from pathlib import Path

from shadowllm.models import ShadowError
from shadowllm.runtime import Sampling, generate
from shadowllm.runtime.ort_backend import OrtBackend, check_export_folder


class Deployed:
    """An export folder loaded with its tokenizer on ONNX Runtime; on TensorRT when the folder holds
    an engine built by `shadowllm build DIR --target tensorrt` and backend="tensorrt"; on the GPU's
    CUDA kernels with backend="cuda" (the model the manifest names, the export's policy, `dtype`)."""

    def __init__(self, folder: str | os.PathLike, sparsity: float = 0.0, backend: str = "ort", dtype: str = "bf16"):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        if backend == "cuda":
            from shadowllm.runtime.cuda_kernels import require_cuda

            require_cuda()  # one line, before anything loads
        self.manifest = check_export_folder(self.folder, graph=backend != "cuda")
        if backend == "tensorrt":
            from shadowllm.runtime.trt_backend import TrtBackend

            self.backend = TrtBackend(self.folder, sparsity)
        elif backend == "ort":
            self.backend = OrtBackend(self.folder, sparsity)
        elif backend == "cuda":
            from shadowllm.runtime.cuda_backend import CudaBackend

            self.backend = CudaBackend.from_export(self.folder, sparsity, dtype)
        else:
            raise ShadowError(f"--backend {backend!r}: expected ort, tensorrt or cuda for an export folder")
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


class LoadedModel(Deployed):
    """A model (name or local HF folder) run dense by the CUDA kernels: `load(name, backend="cuda")`."""

    def __init__(self, name, backend: str, dtype: str):
        if backend != "cuda":
            raise ShadowError(f"{name}: not an export folder (shadowllm export writes one); a model name or HF "
                              "folder loads with backend='cuda' only (or use shadowllm.models.load for PyTorch)")
        from shadowllm.models import load as load_model
        from shadowllm.runtime.cuda_backend import CudaBackend
        from shadowllm.runtime.cuda_kernels import require_cuda

        require_cuda()
        model, self.tokenizer = load_model(name)
        self.folder, self.manifest = None, None
        self.backend = CudaBackend(model, dtype=dtype)


def load(folder_or_model: str | os.PathLike, sparsity: float = 0.0, backend: str = "ort",
         dtype: str = "bf16") -> Deployed:
    """An export folder on `backend` (ort, tensorrt, cuda), or a model name / HF folder on the CUDA
    kernels (backend="cuda", dense); `dtype` is the CUDA backend's weight type."""
    if is_export_folder(folder_or_model) or (backend == "cuda" and (Path(folder_or_model) / "shadowllm.json").is_file()):
        return Deployed(folder_or_model, sparsity, backend, dtype)
    return LoadedModel(folder_or_model, backend, dtype)


def is_export_folder(path) -> bool:
    return path is not None and (Path(path) / "shadowllm.json").is_file() and (Path(path) / "model.onnx").is_file()
