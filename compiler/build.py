"""`shadowllm build DIR --target ort-cpu | tensorrt`.

ort-cpu runs the passes for CPU and writes DIR/ort-cpu/ (a complete export folder):
  1. validate: onnx.checker with full_check (the ai.shadowllm schemas registered);
  2. shape inference: strict, through the custom nodes' schemas;
  3. weight layout: checks that every custom node's weights are initializers in the docs/export-format.md
     layouts (output projections [rows, D], one row per head / neuron), as the exporter writes them;
  4. optimise: ONNX Runtime's extended graph optimisations (constant folding, Cast/Transpose/Shape
     elimination, fusions) with the native library registered, so the custom nodes stay custom
     nodes and the folded graph is saved (ORT's optimised-graph output).
tensorrt (compiler/tensorrt.py) writes DIR/tensorrt/ with model.engine; it needs the `tensorrt`
package, a GPU and the plugin library, and fails with a line that names whichever is missing.
triton (compiler/triton.py) writes DIR/triton/, a Triton Inference Server model repository serving
the export (and the engine, when DIR/tensorrt/ holds one).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from shadowllm.export.onnx_ops import DOMAIN, register_schemas
from shadowllm.models import ShadowError
from shadowllm.compiler.native import QUIET, ort_ops_library
from shadowllm.export.folder import check_export_folder

from .folders import target_folder, write_manifest

TARGETS = ("ort-cpu", "tensorrt", "triton")


def _validate(path: Path) -> onnx.ModelProto:
    register_schemas()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ShadowError(f"{path}: invalid ONNX model ({str(e).splitlines()[0]})") from None
    return onnx.load(str(path), load_external_data=False)


def _check_layout(model: onnx.ModelProto):
    """Custom nodes' weights are initializers of rank 2 that share the hidden size D: as their last dim
    ([rows, D]), or, with weight_layout=channel_major, as the first dim of the input projections
    ([D, rows]; the output projection stays [rows, D])."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        attention = node.op_type == "SparseHeadAttention"
        channel_major = any(a.name == "weight_layout" and a.s == b"channel_major" for a in node.attribute)
        inputs, output = ((1, 3, 5), 7) if attention else ((1, 3), 4)
        dims = [inits.get(node.input[i]) for i in inputs if i < len(node.input) and node.input[i]]
        out = inits.get(node.input[output])
        if any(d is None or len(d) != 2 for d in dims + [out]) or \
                len({d[0 if channel_major else 1] for d in dims} | {out[1]}) != 1:
            layout = "[D, rows] (channel_major)" if channel_major else "[rows, D]"
            raise ShadowError(f"node {node.name}: weights are not {layout} initializers (re-export the model)")


def build(folder: str | os.PathLike, target: str = "ort-cpu", fp16: bool = False, instances: int = 1,
          max_batch: int = 8, sparsity: float = 0.0, step: str = "python", op_library: str | None = None) -> Path:
    """instances, max_batch, sparsity, step, op_library: the triton target's instance count, largest
    batch, the sparsity of requests that give none, and where a forward step runs
    (compiler/triton.py)."""
    folder = Path(folder)
    if target not in TARGETS:
        raise ShadowError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    manifest = check_export_folder(folder)
    if fp16 and target != "tensorrt":
        raise ShadowError("--fp16 applies to --target tensorrt only (the CPU kernels compute in fp32)")
    if target == "triton":
        from .triton import build_repository

        return build_repository(folder, manifest, instances, max_batch, sparsity, step, op_library)
    if target == "tensorrt":
        from .tensorrt import build_engine

        _validate(folder / "model.onnx")
        return build_engine(folder, fp16=fp16)
    import onnxruntime as ort

    model = _validate(folder / "model.onnx")
    onnx.shape_inference.infer_shapes_path(str(folder / "model.onnx"), str(folder / ".shape-check.onnx"),
                                           strict_mode=True)
    (folder / ".shape-check.onnx").unlink(missing_ok=True)
    _check_layout(model)
    library = ort_ops_library()
    if library is None:
        raise ShadowError("--target ort-cpu keeps the custom nodes for the native kernels: build the native "
                          "library first (scripts/setup.sh)")
    with target_folder(folder, target) as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = QUIET  # (its one warning: logits_to_keep is an input with a default)
        options.register_custom_ops_library(str(library))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp / "model.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        before = len(model.graph.node)
        after = len(onnx.load(str(tmp / "model.onnx"), load_external_data=False).graph.node)
        write_manifest(tmp, dict(manifest, build_target=target, requires_native=True, build={
            "passes": ["validate", "shape-infer", "weight-layout", "ort-extended-optimise"], "nodes_before": before,
            "nodes_after": after, "source": str(folder)}))
    out = folder / target
    return out
