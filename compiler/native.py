"""Finding the native libraries the README's setup builds with CMake.

libshadowllm_ort_ops.so (the ONNX Runtime CPU custom ops): $SHADOWLLM_ORT_OPS, then build/. When it
is absent, sessions run the ops' ONNX function bodies (correct, dense compute x mask) and one log
line says so. libshadowllm_trt_plugins.so (TensorRT plugins + CUDA kernels): $SHADOWLLM_TRT_PLUGINS,
then build/; built only where a CUDA compiler is found.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from shadowllm.models import ShadowError

LIBRARY = "libshadowllm_ort_ops.so"
ORT_API = 21  # ORT_API_VERSION of the headers the library is built against (plugins/ort/fetch_headers.sh)
TRT_LIBRARY = "libshadowllm_trt_plugins.so"
BUILD = Path(__file__).resolve().parent.parent / "build"


def _find(variable: str, name: str) -> Path | None:
    env = os.environ.get(variable)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ShadowError(f"{variable}={env}: no such file (expected {name})")
        return path
    return BUILD / name if (BUILD / name).is_file() else None


@lru_cache(maxsize=1)
def ort_ops_library() -> Path | None:
    return _find("SHADOWLLM_ORT_OPS", LIBRARY)


@lru_cache(maxsize=1)
def trt_plugins_library() -> Path | None:
    return _find("SHADOWLLM_TRT_PLUGINS", TRT_LIBRARY)


def session_options(native: bool | None):
    """(SessionOptions for an export folder's model, whether the native library is registered on them).
    onnxruntime logs errors only: the one warning it gives every export is that `logits_to_keep` is
    an input with a default (an initializer of the same name), which is what it is meant to be."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = QUIET
    # A quantized export's function bodies hold DequantizeLinear -> MatMul pairs, which onnxruntime may
    # fuse into MatMulNBits; left at its default that rounds the activations to int8 (accuracy level 4:
    # a 0.5-1% error on each product). Level 0 keeps them fp32, so the bodies compute the contract exactly.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return options, register_native(options, native)


QUIET = 3  # onnxruntime's ERROR severity


def register_native(options, native: bool | None) -> bool:
    """Register the library on SessionOptions when asked (True), or when found (None). Returns whether it was."""
    if native is False:
        return False
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if version < (1, ORT_API):  # its C API lacks our version: the library would refuse to register
        why = (f"the native library {LIBRARY} needs onnxruntime >= 1.{ORT_API} (ORT API {ORT_API}); this is "
               f"onnxruntime {onnxruntime.__version__}")
        if native:
            raise ShadowError(why + " (pip install 'onnxruntime>=1.%d')" % ORT_API)
        _say_once(why + ": running the ops' ONNX function bodies")
        return False
    path = ort_ops_library()
    if path is None:
        if native:
            raise ShadowError(f"the native library {LIBRARY} is not built (run scripts/setup.sh, or set SHADOWLLM_ORT_OPS)")
        _say_once(f"native library {LIBRARY} not built: running the ops' ONNX function bodies")
        return False
    options.register_custom_ops_library(str(path))
    return True


_loaded_into: set = set()  # ids of the TensorRT plugin registries the library was loaded into


def load_trt_plugins(trt, library: Path) -> None:
    """Load the plugin library into TensorRT's registry once per process: a second load (engine build,
    then a runner in the same process) would register both creators again."""
    registry = trt.get_plugin_registry()
    if id(registry) not in _loaded_into:
        registry.load_library(str(library))
        _loaded_into.add(id(registry))


_said: set = set()


def _say_once(message: str):
    if message not in _said:
        _said.add(message)
        print(f"[shadowllm] {message}", file=sys.stderr)
