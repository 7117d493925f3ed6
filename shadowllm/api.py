"""The public Python API: `shadowllm.load(...)` and the object it returns.

    model = shadowllm.load("runs/export", backend="ort", sparsity=0.4, threads=2)
    model.generate("The capital of France is", max_new_tokens=8).text
    for delta in model.generate("Tell me about Paris.", stream=True):
        print(delta, end="")

`load` takes an export folder (`shadowllm export` writes one) or a model (the embedded default's name,
or a local Hugging Face folder). An export folder runs on onnxruntime ("ort", with the native library
when it is built), on a TensorRT engine ("tensorrt", after `shadowllm build DIR --target tensorrt`), on
the CUDA kernels ("cuda"), or on the PyTorch reference ("torch": the export's policy applied by the
sparse reference forward to the model it was exported from). A model runs dense on "torch" or "cuda";
onnxruntime and TensorRT run exports, so a model name there is one line saying to export it first.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

from shadowllm.export.folder import check_export_folder, sparsity_value
from shadowllm.models import ShadowError
from shadowllm.runtime import Sampling, generate

BACKENDS = ("ort", "torch", "cuda", "tensorrt")
DTYPES = ("fp32", "bf16", "fp16")


def is_export_folder(path) -> bool:
    return path is not None and (Path(path) / "shadowllm.json").is_file()


class Model:
    """A loaded model with its tokenizer: `generate` answers a prompt or a batch of prompts."""

    def __init__(self, backend, tokenizer, folder: Path | None, manifest: dict | None):
        self.backend, self.tokenizer, self.folder, self.manifest = backend, tokenizer, folder, manifest

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                 stream: bool = False):
        """A Completion (`.text`, `.token_ids`, `.finish_reason`) for one prompt, a list of them for a
        list of prompts; with stream=True (one prompt) an iterator over the text as it becomes final."""
        _check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
        sampling = Sampling(float(temperature), int(top_k), float(top_p), seed)
        if stream:
            if not isinstance(prompts, str):
                raise ShadowError("stream=True takes one prompt (a str); pass a list with stream=False")
            return self._stream(prompts, max_new_tokens, sampling, stop)
        out = generate(self.backend, self.tokenizer, prompts, max_new_tokens, sampling, stop=stop)
        return out[0] if isinstance(prompts, str) else out

    def _stream(self, prompt: str, max_new_tokens: int, sampling: Sampling, stop) -> Iterator[str]:
        """The generation loop runs in a worker thread and hands each final text delta over a queue, so
        the caller iterates at its own pace (transformers' TextIteratorStreamer works the same way)."""
        deltas: queue.Queue = queue.Queue()
        end = object()

        def work():
            try:
                generate(self.backend, self.tokenizer, prompt, max_new_tokens, sampling, stop=stop,
                         on_text=lambda _, delta: deltas.put(delta))
                deltas.put(end)
            except BaseException as e:  # handed to the caller, raised where it iterates
                deltas.put(e)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while True:
            item = deltas.get()
            if item is end:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
        worker.join()


def _check_sampling(max_new_tokens, temperature, top_p, top_k, seed):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ShadowError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ShadowError(f"temperature={temperature!r}: expected a number >= 0 (0 = greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ShadowError(f"top_p={top_p!r}: expected a number in (0, 1]")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ShadowError(f"top_k={top_k!r}: expected an int >= 0 (0 = no limit)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ShadowError(f"seed={seed!r}: expected an int or None")


def load(path_or_model_name: str | os.PathLike | None = None, backend: str = "ort", sparsity: float = 0.0,
         threads: int | None = None, dtype: str = "bf16") -> Model:
    """An export folder on `backend` (ort | torch | cuda | tensorrt), or a model (name or HF folder;
    None = the embedded default) run dense on torch or cuda. `sparsity`: the export's runtime sparsity
    (a threshold export takes its grid: 0.00, 0.01, ..., 0.90); `threads`: CPU threads (onnxruntime's
    intra-op pool, torch's); `dtype`: the CUDA backend's weight type."""
    if backend not in BACKENDS:
        raise ShadowError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ShadowError(f"threads={threads!r}: expected an int >= 1 or None (all cores)")
    if dtype not in DTYPES:
        raise ShadowError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if backend == "cuda":
        from shadowllm.runtime.cuda_kernels import require_cuda

        require_cuda()  # one line, before anything loads
    if threads is not None and backend in ("torch", "cuda"):
        import torch

        torch.set_num_threads(threads)
    if is_export_folder(path_or_model_name):
        return _load_export(Path(path_or_model_name), backend, sparsity, threads, dtype)
    return _load_model(path_or_model_name, backend, sparsity, dtype)


def _load_export(folder: Path, backend: str, sparsity: float, threads: int | None, dtype: str) -> Model:
    from transformers import AutoTokenizer

    manifest = check_export_folder(folder, graph=backend in ("ort", "tensorrt"))
    sparsity_value(manifest, sparsity, "sparsity")
    if backend == "ort":
        from shadowllm.runtime.ort_backend import OrtBackend

        runner = OrtBackend(folder, sparsity, threads=threads)
    elif backend == "tensorrt":
        from shadowllm.runtime.trt_backend import TrtBackend

        runner = TrtBackend(folder, sparsity)
    elif backend == "cuda":
        from shadowllm.runtime.cuda_backend import CudaBackend

        runner = CudaBackend.from_export(folder, sparsity, dtype)
    else:
        runner = _reference_of_export(folder, manifest, sparsity)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ShadowError(f"{folder}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    return Model(runner, tokenizer, folder, manifest)


def _reference_of_export(folder: Path, manifest: dict, sparsity: float):
    """The export's policy at `sparsity` on the PyTorch reference, over the model the manifest names."""
    from shadowllm.runtime import TorchBackend
    from shadowllm.runtime.policy import export_policy, exported_model

    model = exported_model(folder, manifest)
    return TorchBackend(model, **export_policy(folder, manifest, model, sparsity))


def _load_model(name, backend: str, sparsity: float, dtype: str) -> Model:
    if backend in ("ort", "tensorrt"):
        from shadowllm.models.loading import EMBEDDED

        if name and name not in EMBEDDED and not (Path(name) / "config.json").is_file():
            check_export_folder(Path(name))  # missing or partial: its own line, naming what is missing
        raise ShadowError(f"{name or 'the default model'}: not an export folder (no shadowllm.json); backend="
                          f"{backend!r} runs exports: `shadowllm export {name or ''} --out DIR` first, or load "
                          "the model itself with backend='torch'".replace("  ", " "))
    if sparsity:
        raise ShadowError(f"sparsity={sparsity!r}: a model loaded by name runs dense; sparsity applies to an "
                          "export folder (its policy decides what it skips)")
    from shadowllm.models import load as load_model

    model, tokenizer = load_model(name)
    if backend == "cuda":
        from shadowllm.runtime.cuda_backend import CudaBackend

        return Model(CudaBackend(model, dtype=dtype), tokenizer, None, None)
    from shadowllm.runtime import TorchBackend

    return Model(TorchBackend(model), tokenizer, None, None)
