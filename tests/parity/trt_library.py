"""Loading libshadowllm_trt_plugins.so with ctypes for the tests: the library must exist wherever a
CUDA compiler does (the README's setup builds it then); elsewhere the tests that need it skip."""

import ctypes
import shutil

import pytest

from shadowllm.compiler.native import trt_plugins_library


def load() -> ctypes.CDLL:
    path = trt_plugins_library()
    if path is None:
        if shutil.which("nvcc"):
            pytest.fail("nvcc is on PATH but build/libshadowllm_trt_plugins.so is not built: run scripts/setup.sh")
        pytest.skip("no CUDA compiler on this machine: the TensorRT plugin library is not built")
    return ctypes.CDLL(str(path))
