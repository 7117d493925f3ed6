"""Finding the native ONNX Runtime custom-op library (built by the README's setup with CMake).

Looked up in $SHADOWLLM_ORT_OPS, then in the repository's build/ folder. When it is absent, sessions
run the ops' ONNX function bodies (correct, dense compute x mask) and one log line says so.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from shadowllm.models import ShadowError

LIBRARY = "libshadowllm_ort_ops.so"


@lru_cache(maxsize=1)
def ort_ops_library() -> Path | None:
    env = os.environ.get("SHADOWLLM_ORT_OPS")
    if env:
        path = Path(env)
        if not path.is_file():
            raise ShadowError(f"SHADOWLLM_ORT_OPS={env}: no such file (expected {LIBRARY})")
        return path
    built = Path(__file__).resolve().parent.parent / "build" / LIBRARY
    return built if built.is_file() else None


def register_native(options, native: bool | None) -> bool:
    """Register the library on SessionOptions when asked (True), or when found (None). Returns whether it was."""
    if native is False:
        return False
    path = ort_ops_library()
    if path is None:
        if native:
            raise ShadowError(f"the native library {LIBRARY} is not built (run scripts/setup.sh, or set SHADOWLLM_ORT_OPS)")
        _say_once(f"native library {LIBRARY} not built: running the ops' ONNX function bodies")
        return False
    options.register_custom_ops_library(str(path))
    return True


_said: set = set()


def _say_once(message: str):
    if message not in _said:
        _said.add(message)
        print(f"[shadowllm] {message}", file=sys.stderr)
