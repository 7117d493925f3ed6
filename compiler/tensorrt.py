"""`shadowllm build DIR --target tensorrt [--fp16]`: an engine with the shadowllm plugins.

Two passes, the first of which runs anywhere (and is tested here):
  1. prepare: a copy of the model for TensorRT's ONNX parser. TensorRT hands a plugin only the
     inputs a node has, so empty optional inputs (absent biases, w_gate, cos/sin) are dropped and
     the node records which optional slots remain in the attribute `optional_inputs` (bit i = i-th
     optional slot of docs/export-format.md's input list; the plugins read it). The model-local function bodies
     are removed, so the parser cannot inline the dense body in place of the plugin. The bool masks
     reach the plugins through a Cast to int32 (TensorRT documents bool as unsupported for plugin
     I/O). The result is a TensorRT-only model: onnxruntime's schema for the op has no
     `optional_inputs`.
  2. engine: TensorRT's builder with the plugin library loaded into its registry, one optimisation
     profile over batch, new tokens and cache length, fp16 when asked.
Engines need the `tensorrt` package, a CUDA GPU and build/libshadowllm_trt_plugins.so; where one
is missing the build stops before writing anything and names it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import helper

from shadowllm.export.exporter import LOGITS_TO_KEEP
from shadowllm.export.onnx_ops import ATTENTION_INPUTS, DOMAIN, MLP_INPUTS, SCALES, THRESHOLDS
from shadowllm.models import ShadowError
from shadowllm.compiler.native import TRT_LIBRARY, load_trt_plugins, trt_plugins_library

from .folders import target_folder, write_manifest

# The optional slots of each op, in the order the plugins number their bits (plugin.h of each op).
OPTIONAL = {"SparseNeuronMLP": ["b_in", "w_gate", "b_out"],
            "SparseHeadAttention": ["b_q", "b_k", "b_v", "b_o", "cos", "sin", "q_norm", "k_norm"]}
CONTRACT = {"SparseNeuronMLP": MLP_INPUTS, "SparseHeadAttention": ATTENTION_INPUTS}
MASK_SLOT = {"SparseNeuronMLP": "mask", "SparseHeadAttention": "head_mask"}


def prepare_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The TensorRT-ready copy of `model` (weights untouched: external data references are kept)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.functions[:]
    nodes, cast = [], {}  # cast: bool mask tensor -> its int32 copy (one Cast per tensor, before its first use)
    for node in out.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        slots = CONTRACT[node.op_type]
        names = list(node.input) + [""] * (len(slots) - len(node.input))
        layout = next((a.s.decode() for a in node.attribute if a.name == "weight_layout"), "row_major")
        if any(names[slots.index(t)] for t in THRESHOLDS if t in slots) or layout != "row_major":
            raise ShadowError(f"--target tensorrt: node {node.name} takes activation thresholds (a threshold "
                              "policy); the TensorRT plugins do not implement them yet: use --target ort-cpu")
        if any(names[slots.index(t)] for t in SCALES if t in slots):
            raise ShadowError(f"--target tensorrt: node {node.name} has quantized weights (export --weights int8/int4); "
                              "the TensorRT plugins read fp32/fp16 weights only so far: use --target ort-cpu")
        mask = slots.index(MASK_SLOT[node.op_type])
        if names[mask] not in cast:
            cast[names[mask]] = f"{names[mask]}/int32"
            nodes.append(helper.make_node("Cast", [names[mask]], [cast[names[mask]]], to=onnx.TensorProto.INT32,
                                          name=f"{node.name}/mask_to_int32"))
        names[mask] = cast[names[mask]]
        bits = 0
        for i, slot in enumerate(OPTIONAL[node.op_type]):
            bits |= (1 << i) if names[slots.index(slot)] else 0
        del node.input[:]
        node.input.extend(n for n in names if n)
        node.attribute.append(helper.make_attribute("optional_inputs", bits))
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    # `logits_to_keep` stays its initializer (0, every position) in engines: a scalar input that
    # slices would be a TensorRT shape tensor, fed from the host; the TensorRT backend slices instead.
    inputs = [i for i in out.graph.input if i.name != LOGITS_TO_KEEP]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def requirements() -> tuple[object, Path]:
    """(the tensorrt module, the plugin library) or one line naming what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise ShadowError("--target tensorrt: the `tensorrt` Python package is not installed (pip install "
                          "tensorrt on a machine with an NVIDIA GPU); use --target ort-cpu here") from None
    library = trt_plugins_library()
    if library is None:
        raise ShadowError(f"--target tensorrt: the plugin library {TRT_LIBRARY} is not built (scripts/setup.sh "
                          "builds it where nvcc is on PATH)")
    import ctypes

    if ctypes.CDLL(str(library)).shadowllm_cuda_device_count() < 1:
        raise ShadowError("--target tensorrt: no CUDA device is visible (TensorRT builds engines on the GPU they run on)")
    return tensorrt, library


def _profile_shapes(name: str, arch: dict, max_batch: int, max_tokens: int, opt_context: int):
    """(min, opt, max) for one engine input. Each input ranges on its own between min and max (new
    tokens 1..T, past 0..T-1, attention mask 1..T with T = min(positions, max_tokens)), but the builder
    runs the plugins at the kOPT shapes *together*, so kOPT is one consistent call: a decode step (one
    new token) after a context of min(opt_context, T) tokens, with a mask as long as past + new."""
    T = min(arch["max_positions"], max_tokens)
    context = max(1, min(opt_context, T))
    if name in ("input_ids", "position_ids"):
        return (1, 1), (1, 1), (max_batch, T)
    if name == "attention_mask":
        return (1, 1), (1, context), (max_batch, T)
    if name.startswith("past_key_values."):
        G, E = arch["kv_heads"], arch["head_dim"]
        return (1, G, 0, E), (1, G, context - 1, E), (max_batch, G, T - 1, E)
    if name == "shadow_head_mask":
        return (1, arch["layers"], arch["heads"]), (1, arch["layers"], arch["heads"]), (max_batch, arch["layers"], arch["heads"])
    if name == "shadow_neuron_mask":
        shape = (arch["layers"], arch["neurons"])
        return (1, *shape), (1, *shape), (max_batch, *shape)
    return None  # static (sparsity is a scalar)


@contextmanager
def prepared_file(folder: Path):
    """The TensorRT-ready copy of DIR/model.onnx as a file beside it (so it reads DIR/model.onnx.data
    where it is: no link or copy of the weights, whose extra hard link would make the ONNX checker
    refuse the export afterwards), removed when the block ends."""
    path = folder / f".tensorrt-prepared-{os.getpid()}.onnx"
    try:
        onnx.save(prepare_model(onnx.load(str(folder / "model.onnx"), load_external_data=False)), str(path))
        yield path
    finally:
        path.unlink(missing_ok=True)


def build_engine(folder: Path, fp16: bool = False, max_batch: int = 4, max_tokens: int = 2048) -> Path:
    trt, library = requirements()
    manifest = json.loads((folder / "shadowllm.json").read_text())
    with target_folder(folder, "tensorrt") as tmp, prepared_file(folder) as prepared:
        logger = trt.Logger(trt.Logger.WARNING)
        load_trt_plugins(trt, library)  # getCreators: both creators, namespace shadowllm
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(prepared)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ShadowError(f"{folder / 'model.onnx'}: TensorRT's ONNX parser refused it ({errors[:400]})")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            shapes = _profile_shapes(name, manifest["arch"], max_batch, max_tokens, 128)
            if shapes:
                profile.set_shape(name, *shapes)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise ShadowError(f"{folder}: TensorRT could not build an engine (see its log above)")
        (tmp / "model.engine").write_bytes(bytes(engine))
        write_manifest(tmp, dict(manifest, build_target="tensorrt", build={
            "passes": ["prepare-optional-inputs", "drop-function-bodies", "tensorrt-engine"], "fp16": fp16,
            "max_batch": max_batch, "max_tokens": max_tokens, "tensorrt": trt.__version__, "source": str(folder)}))
    out = folder / "tensorrt"
    return out
