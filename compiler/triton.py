"""`shadowllm build DIR --target triton [--instances N] [--max-batch B]`: DIR/triton/, a Triton
Inference Server model repository that serves the export.

    DIR/triton/shadowllm/config.pbtxt     Python backend, decoupled, dynamic batching
    DIR/triton/shadowllm/1/model.py       imports shadowllm's model (runtime/triton_model.py)

The model runs the export where it is (`export: ../..`, relative to the model's directory), with
onnxruntime and the native library, or the TensorRT engine when `build --target tensorrt` made one.
config.pbtxt is written from Triton's own model-config protobuf (tritonclient's model_config_pb2),
so every field is one the server parses.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shadowllm.models import ShadowError
from shadowllm.runtime.triton_model import INPUTS, OUTPUTS

from .folders import target_folder, write_manifest

MODEL = "shadowllm"
# How long the dynamic batcher holds the first request for others to join it: small against a
# generation (tens of milliseconds per token), enough for clients that send together.
BATCH_DELAY_US = 20_000

MODEL_PY = '''\
# Written by `shadowllm build --target triton`. Triton's Python backend loads this file; the model is
# shadowllm's own (shadowllm/runtime/triton_model.py), so the backend's Python must import shadowllm:
# `shadowllm serve` arranges that, in the NGC Triton container `pip install` the project first.
from shadowllm.runtime.triton_model import TritonPythonModel  # noqa: F401
'''


def model_config_pb2():
    """tritonclient's `model_config_pb2` module, loaded from its file: the package's `grpc/__init__`
    would import grpcio, which the config messages do not need."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ShadowError("--target triton writes config.pbtxt with tritonclient's model-config protobuf: "
                          "pip install --no-deps tritonclient==2.63.0 (scripts/setup.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("shadowllm_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def python_model_config(max_batch: int, instances: int, parameters: dict):
    """The ModelConfig message of the `shadowllm` Python-backend model."""
    pb = model_config_pb2()
    config = pb.ModelConfig(name=MODEL, backend="python", max_batch_size=max_batch)
    config.model_transaction_policy.decoupled = True
    for name, (kind, optional) in INPUTS.items():
        config.input.add(name=name, data_type=pb.DataType.Value(kind), dims=[1], optional=optional)
    for name, kind in OUTPUTS.items():
        config.output.add(name=name, data_type=pb.DataType.Value(kind), dims=[1])
    config.dynamic_batching.max_queue_delay_microseconds = BATCH_DELAY_US
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


def to_pbtxt(message) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(message)


def build_repository(folder: Path, manifest: dict, instances: int = 1, max_batch: int = 8,
                     sparsity: float = 0.0) -> Path:
    from shadowllm.runtime.ort_backend import sparsity_value

    if not 1 <= instances <= 64:
        raise ShadowError(f"--instances must lie in [1, 64], got {instances}")
    if not 1 <= max_batch <= 64:
        raise ShadowError(f"--max-batch must lie in [1, 64], got {max_batch}")
    sparsity_value(manifest, sparsity)  # the default requests get: one the export takes
    runtime = "tensorrt" if (folder / "tensorrt" / "model.engine").is_file() else "ort"
    config = python_model_config(max_batch, instances, {"export": "../..", "runtime": runtime,
                                                        "sparsity": sparsity})
    with target_folder(folder, "triton", side_files=False) as tmp:
        (tmp / MODEL / "1").mkdir(parents=True)
        (tmp / MODEL / "config.pbtxt").write_text(to_pbtxt(config))
        (tmp / MODEL / "1" / "model.py").write_text(MODEL_PY)
        write_manifest(tmp, {**manifest, "build": {"target": "triton", "model": MODEL, "runtime": runtime,
                                                   "instances": instances, "max_batch": max_batch,
                                                   "sparsity": sparsity, "source": str(folder)}})
    return folder / "triton"


def read_config(path: Path):
    """A config.pbtxt parsed back into Triton's ModelConfig message (tests, `serve`'s checks)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), model_config_pb2().ModelConfig())

