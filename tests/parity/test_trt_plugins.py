"""The TensorRT plugin library as TensorRT would load it, checked without TensorRT or a GPU: the
exported entry points, the creators getCreators returns (names, version, namespace the ONNX nodes
carry), and the plugin objects' host-side behaviour (attribute round trip, format combinations,
errors through the logger finder) via the library's own C self-check."""

import ctypes
import shutil
import subprocess

import pytest

from shadowllm.export.onnx_ops import PLUGIN_ATTRS
from shadowllm.compiler.native import trt_plugins_library
from tests.parity.trt_library import load


def test_exports_the_tensorrt_entry_points():
    lib = load()  # skips without a CUDA compiler
    if shutil.which("nm") is None:
        pytest.skip("nm is not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", str(trt_plugins_library())], capture_output=True, text=True,
                         check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert {"getCreators", "setLoggerFinder"} <= exported
    assert lib.getCreators is not None


def test_creators_match_the_onnx_nodes():
    lib = load()
    count = ctypes.c_int32(0)
    lib.getCreators.restype = ctypes.POINTER(ctypes.c_void_p)
    creators = lib.getCreators(ctypes.byref(count))
    assert count.value == 2 and all(creators[i] for i in range(2))
    buf = ctypes.create_string_buffer(4096)
    assert lib.shadowllm_trt_describe_creators(buf, len(buf)) == 2
    rows = [line.split(" ", 3) for line in buf.value.decode().splitlines()]
    assert sorted(r[0] for r in rows) == ["SparseHeadAttention", "SparseNeuronMLP"]
    for name, version, namespace, kind in rows:
        assert (version, namespace) == (PLUGIN_ATTRS["plugin_version"], PLUGIN_ATTRS["plugin_namespace"])
        assert kind == "PLUGIN CREATOR_V3ONE"


def test_plugin_self_check():
    lib = load()
    buf = ctypes.create_string_buffer(8192)
    rc = lib.shadowllm_trt_self_check(buf, len(buf))
    report = buf.value.decode()
    assert rc == 0, report
    assert "kv_policy=active" in report and "activation=silu" in report
    assert "sliding_window=512" in report and "optional_inputs=240" in report  # revision 6 fields round-trip
    assert "activation 'tanh' is not one of" in report  # the bad attribute reached the logger


def test_plugin_library_is_loaded_into_a_registry_once():
    """Building an engine and then running it in one process loads the library once (a second load
    registered both creators again)."""
    from pathlib import Path

    from shadowllm.compiler.native import load_trt_plugins

    class Registry:
        loads = 0

        def load_library(self, path):
            Registry.loads += 1

    registry = Registry()

    class FakeTensorRT:
        @staticmethod
        def get_plugin_registry():
            return registry

    load_trt_plugins(FakeTensorRT, Path("libshadowllm_trt_plugins.so"))
    load_trt_plugins(FakeTensorRT, Path("libshadowllm_trt_plugins.so"))
    assert Registry.loads == 1


def test_plugins_refuse_inconsistent_runtime_shapes():
    """onShapeChange (called by TensorRT before an enqueue with new shapes) accepts consistent shapes,
    including a preallocated cache longer than past + new (the op contract), and refuses every kind of
    mismatch with the reason on TensorRT's logger, so no kernel runs on buffers of the wrong size."""
    lib = load()
    buf = ctypes.create_string_buffer(8192)
    failures = lib.shadowllm_trt_shape_check(buf, len(buf))
    report = buf.value.decode()
    assert failures == 0, report
    assert [line.split(" ", 1)[0] for line in report.splitlines()] == ["ok"] * 11
