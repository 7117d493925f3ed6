"""`shadowllm build DIR --target triton [--instances N] [--max-batch B] [--step onnxruntime]`:
DIR/triton/, a Triton Inference Server model repository that serves the export.

    DIR/triton/shadowllm/config.pbtxt     Python backend, decoupled, dynamic batching
    DIR/triton/shadowllm/1/model.py       imports shadowllm's model (serving/triton_model.py)

The model runs the export where it is (`export: ../..`, relative to the model's directory), with
onnxruntime and the native library, or the TensorRT engine when `build --target tensorrt` made one.
With `--step onnxruntime` (the NGC Triton container, whose server has the onnxruntime backend; the
bundled one here does not) one forward step runs as a second model instead:

    DIR/triton/shadowllm_step/config.pbtxt   onnxruntime backend, model_operations { op_library_filename }
    DIR/triton/shadowllm_step/1/model.onnx   -> ../../../model.onnx (and model.onnx.data): relative links

and the Python model drives it step by step (BLS). config.pbtxt is written from Triton's own
model-config protobuf (tritonclient's model_config_pb2), so every field is one the server parses.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shadowllm.models import ShadowError

from .folders import target_folder, write_manifest

MODEL = "shadowllm"
STEP_MODEL = "shadowllm_step"
STEPS = ("python", "onnxruntime")
# ONNX element types of the export's inputs and outputs -> Triton data types
TRITON_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16"}
# How long the dynamic batcher holds the first request for others to join it: small against a
# generation (tens of milliseconds per token), enough for clients that send together.
BATCH_DELAY_US = 20_000
# The generate extension's names: input -> (Triton data type, whether a request may leave it out).
INPUTS = {"text_input": ("TYPE_STRING", False), "max_tokens": ("TYPE_INT32", True),
          "temperature": ("TYPE_FP32", True), "top_p": ("TYPE_FP32", True), "seed": ("TYPE_UINT64", True),
          "stream": ("TYPE_BOOL", True), "sparsity": ("TYPE_FP32", True)}
OUTPUTS = {"text_output": "TYPE_STRING", "finish_reason": "TYPE_STRING"}

MODEL_PY = '''\
# Written by `shadowllm build --target triton`. Triton's Python backend loads this file; the model is
# shadowllm's own (shadowllm/serving/triton_model.py), so the backend's Python must import shadowllm:
# `shadowllm serve` arranges that, in the NGC Triton container `pip install` the project first.
from shadowllm.serving.triton_model import TritonPythonModel  # noqa: F401
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


def step_model_config(graph, op_library: str, instances: int):
    """The ModelConfig of the export's one-step model on Triton's onnxruntime backend: every graph
    input and output with its type and dims (-1 where dynamic; scalars as [1] reshaped to []), the
    batch dimension explicit (max_batch_size 0: caches of different lengths do not batch), and the
    custom-op library the sessions load (model_operations.op_library_filename)."""
    pb = model_config_pb2()
    config = pb.ModelConfig(name=STEP_MODEL, backend="onnxruntime", max_batch_size=0,
                            default_model_filename="model.onnx")
    config.model_operations.op_library_filename.append(op_library)
    initialized = {t.name for t in graph.initializer}
    for values, add in ((graph.input, config.input.add), (graph.output, config.output.add)):
        for value in values:
            t = value.type.tensor_type
            if t.elem_type not in TRITON_TYPES:
                raise ShadowError(f"--step onnxruntime: {value.name} has ONNX type {t.elem_type}, which the step "
                                  "model does not map to a Triton type")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            entry = add(name=value.name, data_type=pb.DataType.Value(TRITON_TYPES[t.elem_type]), dims=dims or [1])
            if not dims:
                entry.reshape.SetInParent()  # shape [] inside, [1] on the wire
            if value.name in initialized:  # an input with a default (logits_to_keep)
                entry.optional = True
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    return config


def to_pbtxt(message) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(message)


def build_repository(folder: Path, manifest: dict, instances: int = 1, max_batch: int = 8,
                     sparsity: float = 0.0, step: str = "python", op_library: str | None = None) -> Path:
    """step: python (the Python model runs the export itself) | onnxruntime (a step model on Triton's
    onnxruntime backend; op_library: the custom-op library's path on the serving machine, by default
    this build's)."""
    from shadowllm.export.folder import sparsity_value

    if step not in STEPS:
        raise ShadowError(f"--step {step!r}: expected one of {', '.join(STEPS)}")
    if op_library and step != "onnxruntime":
        raise ShadowError("--op-library applies to --step onnxruntime only")
    if not 1 <= instances <= 64:
        raise ShadowError(f"--instances must lie in [1, 64], got {instances}")
    if not 1 <= max_batch <= 64:
        raise ShadowError(f"--max-batch must lie in [1, 64], got {max_batch}")
    sparsity_value(manifest, sparsity)  # the default requests get: one the export takes
    parameters = {"export": "../..", "sparsity": sparsity}
    if step == "onnxruntime":
        import onnx

        from shadowllm.compiler.native import ort_ops_library

        op_library = op_library or (str(ort_ops_library()) if ort_ops_library() else None)
        if op_library is None:
            raise ShadowError("--step onnxruntime: the step model needs the custom-op library; build it "
                              "(scripts/setup.sh) or name its path on the serving machine with --op-library")
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        step_config = step_model_config(graph, op_library, instances)
        runtime = "triton-step"
        parameters["step_model"] = STEP_MODEL
    else:
        runtime = "tensorrt" if (folder / "tensorrt" / "model.engine").is_file() else "ort"
    config = python_model_config(max_batch, instances, {**parameters, "runtime": runtime})
    with target_folder(folder, "triton", side_files=False) as tmp:
        (tmp / MODEL / "1").mkdir(parents=True)
        (tmp / MODEL / "config.pbtxt").write_text(to_pbtxt(config))
        (tmp / MODEL / "1" / "model.py").write_text(MODEL_PY)
        if step == "onnxruntime":
            (tmp / STEP_MODEL / "1").mkdir(parents=True)
            (tmp / STEP_MODEL / "config.pbtxt").write_text(to_pbtxt(step_config))
            for name in ("model.onnx", "model.onnx.data"):  # the export's files, where they are
                (tmp / STEP_MODEL / "1" / name).symlink_to(Path("..") / ".." / ".." / name)
        write_manifest(tmp, {**manifest, "build": {"target": "triton", "model": MODEL, "runtime": runtime,
                                                   "step": step, "instances": instances, "max_batch": max_batch,
                                                   "sparsity": sparsity, "source": str(folder)}})
    return folder / "triton"


def read_config(path: Path):
    """A config.pbtxt parsed back into Triton's ModelConfig message (tests, `serve`'s checks)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), model_config_pb2().ModelConfig())

