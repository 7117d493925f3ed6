"""`export --weights int8|int4`: the sparse ops' projections written as block codes and scales.

The traced graph holds every projection as an fp32 initializer already on the format's grid (the
model was fake-quantized first, models/quant.py); this pass re-quantizes each one (exactly: its
values are on the grid) into codes (INT8 / UINT4, in the node's layout) plus fp16 scales (and
minimums), and hands them to the node as its `<weight>_scale` / `<weight>_min` inputs
(docs/export-format.md). Blocks run along each projection's input: axis 1 of a row-major input
projection [out, in], axis 0 of a channel-major one [in, out] and of the output projections [in, out].
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from shadowllm.models.quant import BLOCK, HEAD_FORMAT, check_format, quantize

from .onnx_ops import ATTENTION_INPUTS, ATTENTION_WEIGHTS, DOMAIN, MLP_INPUTS, MLP_WEIGHTS

_OPS = {"SparseNeuronMLP": (MLP_INPUTS, MLP_WEIGHTS), "SparseHeadAttention": (ATTENTION_INPUTS, ATTENTION_WEIGHTS)}
_OUTPUT_PROJECTIONS = ("w_out_t", "w_o_t")  # one row per neuron / head-dim entry: [in, out]


def _nodes(graph):
    import onnx_ir as ir

    for node in graph:
        if node.domain == DOMAIN and node.op_type in _OPS:
            yield node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _nodes(attr.value)


def quantize_lm_head(graph, blocks=None, activations: str = "fp32") -> int:
    """The LM head (MatMul(h, Transpose(W[V, D])) -> logits) as one BlockedMatMul node over int8 codes
    [V, D] in blocks of 32 along D with fp16 scales (the Q8_0 grid): the native library reads the
    codes in place (a token reads 1.06 bytes a weight instead of 4); without it, the op's function
    body dequantizes and multiplies. onnxruntime's own fusion of DequantizeLinear + MatMul into an
    8-bit MatMulNBits was 80% of an int4 decode step (it dequantizes the whole head every call at
    fp32 accuracy). The fp32 table stays for the embedding Gather when the head is tied (a Gather
    reads one row a token). blocks (`--weights gguf`): the file's own Q8_0 blocks of the head when it
    holds them (the same values as re-quantizing them). Returns the bytes of codes + scales."""
    import onnx_ir as ir

    logits = next(v for v in graph.outputs if v.name == "logits")
    head = logits.producer()
    matmul = head is not None and head.op_type == "MatMul"
    transpose = head.inputs[1].producer() if matmul else None
    perm = transpose.attributes.get("perm") if transpose is not None else None
    if matmul and transpose is None and head.inputs[1].const_value is not None:
        # an untied head: the exporter folded the transpose into a [D, V] initializer
        table, transpose = head.inputs[1], None
        w = torch.from_numpy(np.ascontiguousarray(table.const_value.numpy().T))
    elif (transpose is None or transpose.op_type != "Transpose" or transpose.inputs[0].const_value is None
            or (perm is not None and list(perm.value) != [1, 0])):
        raise ValueError("export: the LM head is not MatMul(h, Transpose(weight)) nor MatMul(h, constant); "
                         "cannot quantize it")
    else:
        table = transpose.inputs[0]
        w = torch.from_numpy(np.ascontiguousarray(table.const_value.numpy()))
    q = blocks.lookup(w, 1) if blocks is not None else None
    if q is None or q.fmt != HEAD_FORMAT:
        q = quantize(w, HEAD_FORMAT, 1)
    tensors = [ir.Tensor(q.codes.numpy(), name="lm_head.weight"),
               ir.Tensor(q.scale.numpy(), name="lm_head.weight_scale")]
    if q.minimum is not None:
        tensors.append(ir.Tensor(q.minimum.numpy(), name="lm_head.weight_min"))
    values = []
    for tensor in tensors:
        v = ir.Value(name=tensor.name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        graph.register_initializer(v)
        values.append(v)
    attributes = {"block_size": BLOCK, **({"activation_bits": 8} if activations == "int8" else {})}
    node = ir.node("BlockedMatMul", [head.inputs[0], *values], domain=DOMAIN, attributes=attributes,
                   name="lm_head/blocked_matmul")
    graph.insert_before(head, [node])
    logits_value = head.outputs[0]
    logits_value.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
    logits_value.name = "lm_head/fp32_logits"  # free the name before the new output takes it
    node.outputs[0].name = "logits"
    graph.remove(head, safe=True)
    if transpose is not None and not transpose.outputs[0].uses():
        graph.remove(transpose, safe=True)
    if not table.uses():
        graph.initializers.pop(table.name)
    return sum(t.nbytes for t in tensors)


def quantize_graph(ir_model, fmt: str, blocks=None, activations: str = "fp32") -> int:
    """Rewrite every sparse node's projections in `fmt` (int8 | int4), and the LM head in int8.
    blocks (models/gguf_blocks.py, `--weights gguf`): each projection's codes and scales are the GGUF
    file's own, found by value, instead of computed. activations int8: the nodes get activation_bits 8
    (their projections' inputs rounded to the int8 grid, docs/export-format.md). Returns the bytes the quantized weights now take
    (codes + scales)."""
    import onnx_ir as ir

    check_format(fmt)
    if fmt == "fp32":
        return 0
    graph = ir_model.graph
    done: dict[str, tuple] = {}  # initializer name -> its (codes, scale, min) values, shared by nodes
    total = 0
    for node in _nodes(graph):
        formal, weights = _OPS[node.op_type]
        layout = node.attributes.get("weight_layout")
        channel_major = layout is not None and layout.value == "channel_major"
        if len(node.inputs) < len(formal):
            node.resize_inputs(len(formal))
        for w in weights:
            value = node.inputs[formal.index(w)]
            if value is None:
                continue
            if value.name not in done:
                array = value.const_value.numpy() if value.const_value is not None else None
                if array is None:
                    raise ValueError(f"{node.name}: input {w} is not an initializer; cannot quantize it")
                axis = 0 if (w in _OUTPUT_PROJECTIONS or channel_major) else 1
                w_t = torch.from_numpy(np.ascontiguousarray(array))
                q = blocks.lookup(w_t, axis) if blocks is not None else quantize(w_t, fmt, axis)
                if q is None:
                    raise ValueError(f"{node.name}: {w} is not one of {blocks.path.name}'s carried matrices")
                codes = q.codes.numpy().astype(ml_dtypes.uint4 if fmt == "int4" else np.int8)
                name = f"{node.name}.{w}" if node.name else value.name  # layers.3.mlp.w_in, its _scale, _min
                parts = [(name, ir.Tensor(codes, name=name))]
                parts.append((f"{name}_scale", ir.Tensor(q.scale.numpy(), name=f"{name}_scale")))
                if q.minimum is not None:
                    parts.append((f"{name}_min", ir.Tensor(q.minimum.numpy(), name=f"{name}_min")))
                graph.initializers.pop(value.name)
                new = []
                for name, tensor in parts:
                    v = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
                    graph.register_initializer(v)
                    new.append(v)
                    total += tensor.nbytes
                done[value.name] = (new[0], new[1], new[2] if len(new) > 2 else None)
            codes, scale, minimum = done[value.name]
            node.replace_input_with(formal.index(w), codes)
            node.replace_input_with(formal.index(f"{w}_scale"), scale)
            if minimum is not None:
                node.replace_input_with(formal.index(f"{w}_min"), minimum)
        # trailing absent inputs are left off, as the exporter writes every node
        last = max(i for i, v in enumerate(node.inputs) if v is not None)
        node.resize_inputs(last + 1)
        node.attributes["block_size"] = ir.AttrInt64("block_size", BLOCK)
        if activations == "int8":
            node.attributes["activation_bits"] = ir.AttrInt64("activation_bits", 8)
    return total + quantize_lm_head(graph, blocks, activations)
