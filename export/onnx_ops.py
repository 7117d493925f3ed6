"""The ONNX side of the sparse ops: domain `ai.shadowllm` v1 schemas and model-local function bodies.

Each exported model carries one FunctionProto per op, written for that model's variant (biases or
not, gated or not, RoPE or not, its activation): a standard-op body that computes densely and
multiplies by the mask, so stock onnxruntime runs the model with no native code. When the native
library is registered, ORT runs its kernel for the node instead. Absent optional inputs are passed
as "" by the node and never referenced by the body of that variant.

Quantized weights (`export --weights int8|int4`, models/quant.py): a projection's input holds the
codes (INT8 / UINT4, in the node's layout) and its trailing `<weight>_scale` (fp16, blocks of
`block_size` along the input dimension) and, for UINT4, `<weight>_min` inputs are present; the bodies
rebuild the fp32 weight with the standard blocked DequantizeLinear (opset 21) plus the minimum.

Schemas are registered with `onnx.defs` so `onnx.checker.check_model(full_check=True)` and shape
inference accept the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from shadowllm.models.quant import BLOCK

DOMAIN = "ai.shadowllm"
VERSION = 1
OPSET = 21  # standard opset of the bodies (Gelu needs >= 20)
PLUGIN_ATTRS = {"plugin_namespace": "shadowllm", "plugin_version": "1"}
MLP_WEIGHTS = ["w_in", "w_gate", "w_out_t"]
ATTENTION_WEIGHTS = ["w_q", "w_k", "w_v", "w_o_t"]


def _scales(weights):
    """The optional inputs that make a projection quantized: its block scales, then minimums (int4)."""
    return [f"{w}_{part}" for w in weights for part in ("scale", "min")]


# Input order is the contract (the native kernels and TensorRT plugins index by position): scales
# were appended in export revision 5, so older nodes, which end earlier, keep their meaning.
# *_BASE_INPUTS: what the torch ops take (they hold weights as values).
MLP_BASE_INPUTS = ["x", "w_in", "b_in", "w_gate", "w_out_t", "b_out", "mask", "t_x", "t_h"]
ATTENTION_BASE_INPUTS = ["x", "w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o_t", "b_o", "past_key", "past_value",
                         "attention_mask", "position_ids", "cos", "sin", "head_mask", "t_x", "t_o"]
MLP_INPUTS = MLP_BASE_INPUTS + _scales(MLP_WEIGHTS)
MATMUL_INPUTS = ["x", "w", "w_scale", "w_min"]  # BlockedMatMul: the LM head of a quantized export
# q_norm / k_norm (per-head RMSNorm weights [E], qwen3 / gemma3_text) were appended in revision 6
QK_NORMS = ["q_norm", "k_norm"]
ATTENTION_SCALES = _scales(ATTENTION_WEIGHTS)
ATTENTION_INPUTS = ATTENTION_BASE_INPUTS + ATTENTION_SCALES + QK_NORMS
THRESHOLDS = {"t_x", "t_h", "t_o"}  # optional fp32 scalars: an entry v of that input counts when |v| >= t
SCALES = set(_scales(MLP_WEIGHTS + ATTENTION_WEIGHTS))
WEIGHTS = set(MLP_WEIGHTS + ATTENTION_WEIGHTS)
OPTIONAL = {"b_in", "w_gate", "b_out", "b_q", "b_k", "b_v", "b_o", "cos", "sin", "w_min"} | THRESHOLDS | SCALES | set(QK_NORMS)
ATTENTION_OUTPUTS = ["y", "present_key", "present_value"]
MASKED = float(np.finfo(np.float32).min)  # score of a hidden key: a fully hidden row attends uniformly


class _Body:
    """Collects the nodes of a function body; each call returns its output name."""

    def __init__(self):
        self.nodes, self.n = [], 0

    def __call__(self, op, *inputs, **attrs):
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.int64):
        self.n += 1
        out = f"c{self.n}"
        self.nodes.append(helper.make_node("Constant", [], [out], value=onnx.numpy_helper.from_array(
            np.array(value, dtype=dtype), out)))
        return out

    def rename(self, src, dst):
        self.nodes.append(helper.make_node("Identity", [src], [dst]))


def _weight(b: _Body, w: str, weights: str, axis: int):
    """The fp32 weight of input `w`: itself, or its codes dequantized in blocks along `axis` (the
    projection's input dimension): DequantizeLinear(codes, scale) (+ each block's minimum, int4)."""
    if weights == "fp32":
        return w
    scale = b("Cast", f"{w}_scale", to=TensorProto.FLOAT)
    value = b("DequantizeLinear", w, scale, axis=axis, block_size=BLOCK)
    if weights == "int4":  # w = d*q + m: the minimum repeated over its block, back in the weight's shape
        minimum = b("Unsqueeze", b("Cast", f"{w}_min", to=TensorProto.FLOAT), b.const([axis + 1]))
        repeated = b("Expand", minimum, b.const([1, BLOCK, 1] if axis == 0 else [1, 1, BLOCK]))
        value = b("Add", value, b("Reshape", repeated, b("Shape", w)))
    return b("CastLike", value, "x")


def _linear(b: _Body, x, w, bias, channel_major=False, weights="fp32"):
    """x @ w^T (+ bias) for an input projection: blocks run along its input, axis 1 of [out, in]
    (row_major) or axis 0 of [in, out] (channel_major)."""
    w = _weight(b, w, weights, 0 if channel_major else 1)
    y = b("MatMul", x, w if channel_major else b("Transpose", w, perm=[1, 0]))
    return b("Add", y, bias) if bias else y


def _on_grid(b: _Body, t, activations: str):
    """t [B, S, N] on the int8 activation grid (activation_bits 8; models/quant.round_activations): in
    blocks of 32 along N, d = max|v| / 127, v -> Round(v / d) * d (ties to even; zero blocks stay zero)."""
    if activations == "fp32":
        return t
    blocks = b("Reshape", t, b.const([0, 0, -1, BLOCK]))
    d = b("Div", b("ReduceMax", b("Abs", blocks), b.const([-1]), keepdims=1), b("CastLike", b.const(127.0, np.float32), t))
    zero, one = b("CastLike", b.const(0.0, np.float32), t), b("CastLike", b.const(1.0, np.float32), t)
    q = b("Round", b("Div", blocks, b("Where", b("Equal", d, zero), one, d)))
    return b("Reshape", b("Mul", q, d), b("Shape", t))


def _keep_large(b: _Body, t, threshold):
    """t with the entries below the threshold in magnitude set to zero (ties kept)."""
    return b("Mul", t, b("CastLike", b("GreaterOrEqual", b("Abs", t), b("CastLike", threshold, t)), t))


def _activation(b: _Body, name: str, t):
    if name == "relu":
        return b("Relu", t)
    if name == "gelu":
        return b("Gelu", t)
    if name == "gelu_tanh":
        return b("Gelu", t, approximate="tanh")
    if name == "silu":
        return b("Mul", t, b("Sigmoid", t))
    raise ValueError(f"activation {name!r}")


@dataclass(frozen=True)
class MLPVariant:
    activation: str
    gated: bool
    bias_in: bool
    bias_out: bool
    thresholds: bool = False  # t_x and t_h are inputs
    weight_layout: str = "row_major"  # of w_in / w_gate: row_major [F, D] | channel_major [D, F]
    weights: str = "fp32"  # fp32 | int8 | int4 (models/quant.py): the projections' format
    activations: str = "fp32"  # fp32 | int8: the projections' inputs rounded to the int8 grid (activation_bits 8)


@dataclass(frozen=True)
class AttentionVariant:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rope: bool
    bias_qkv: bool
    bias_o: bool
    kv_policy: str  # all | active
    thresholds: bool = False  # t_x and t_o are inputs
    weight_layout: str = "row_major"  # of w_q / w_k / w_v: row_major [out, D] | channel_major [D, out]
    weights: str = "fp32"  # fp32 | int8 | int4 (models/quant.py): the projections' format
    qk_norm_eps: float | None = None  # q_norm and k_norm are inputs (RMSNorm with this eps); None: absent
    windowed: bool = False  # some layer has a sliding window: the body reads the node's sliding_window
    rotary_dim: int = 0  # dimensions RoPE rotates (the cos/sin tables' width x 2); 0: head_dim
    activations: str = "fp32"  # fp32 | int8: the projections' inputs rounded to the int8 grid (activation_bits 8)


def mlp_function(v: MLPVariant) -> onnx.FunctionProto:
    """y = (act(x w_gate^T) * (x w_in^T) | act(x w_in^T + b_in)) * mask @ w_out_t + b_out, with x and h
    thresholded by t_x and t_h in the variants that take them."""
    b = _Body()
    cm = v.weight_layout == "channel_major"
    x = _on_grid(b, _keep_large(b, "x", "t_x") if v.thresholds else "x", v.activations)
    up = _linear(b, x, "w_in", "b_in" if v.bias_in else None, cm, v.weights)
    h = b("Mul", _activation(b, v.activation, _linear(b, x, "w_gate", None, cm, v.weights)), up) if v.gated \
        else _activation(b, v.activation, up)
    mask = b("Unsqueeze", b("CastLike", "mask", "x"), b.const([1]))  # [B, 1, F]
    h = b("Mul", h, mask)
    if v.thresholds:
        h = _keep_large(b, h, "t_h")
    y = b("MatMul", _on_grid(b, h, v.activations), _weight(b, "w_out_t", v.weights, 0))
    b.rename(b("Add", y, "b_out") if v.bias_out else y, "y")
    return helper.make_function(DOMAIN, "SparseNeuronMLP", MLP_INPUTS, ["y"], b.nodes,
                                [helper.make_opsetid("", OPSET)],
                                attributes=["activation", "weight_layout", "block_size", "activation_bits",
                                            "plugin_namespace", "plugin_version"])


def _heads(b: _Body, t, n, E):
    """[B, S, n*E] -> [B, n, S, E]."""
    return b("Transpose", b("Reshape", t, b.const([0, 0, n, E])), perm=[0, 2, 1, 3])


def _rope(b: _Body, t, cos, sin, E, R):
    """Rotate-half RoPE on the first R dimensions of t [B, n, S, E]; the rest pass through."""
    half = R // 2
    t1 = b("Slice", t, b.const([0]), b.const([half]), b.const([3]))
    t2 = b("Slice", t, b.const([half]), b.const([R]), b.const([3]))
    first = b("Sub", b("Mul", t1, cos), b("Mul", t2, sin))
    second = b("Add", b("Mul", t2, cos), b("Mul", t1, sin))
    if R == E:
        return b("Concat", first, second, axis=3)
    return b("Concat", first, second, b("Slice", t, b.const([R]), b.const([E]), b.const([3])), axis=3)


def _rms_norm(b: _Body, t, weight, eps: float):
    """RMSNorm over the last axis: t / sqrt(mean(t^2) + eps) * weight."""
    mean = b("ReduceMean", b("Mul", t, t), b.const([-1]), keepdims=1)
    rms = b("Sqrt", b("Add", mean, b("CastLike", b.const(eps, np.float32), t)))
    return b("Mul", b("Div", t, rms), weight)


def _attribute_int(b: _Body, name: str):
    """The calling node's int attribute `name` as an int64 scalar tensor (an attribute reference)."""
    b.n += 1
    out = f"a{b.n}"
    node = helper.make_node("Constant", [], [out])
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_int", name, onnx.AttributeProto.INT
    node.attribute.append(ref)
    b.nodes.append(node)
    return out


def attention_function(v: AttentionVariant) -> onnx.FunctionProto:
    """Dense attention for every head, then head outputs x head_mask; see docs/export-format.md."""
    b = _Body()
    H, G, E = v.num_heads, v.num_kv_heads, v.head_dim
    cm = v.weight_layout == "channel_major"
    x = _on_grid(b, _keep_large(b, "x", "t_x") if v.thresholds else "x", v.activations)
    q = _heads(b, _linear(b, x, "w_q", "b_q" if v.bias_qkv else None, cm, v.weights), H, E)
    k = _heads(b, _linear(b, x, "w_k", "b_k" if v.bias_qkv else None, cm, v.weights), G, E)
    val = _heads(b, _linear(b, x, "w_v", "b_v" if v.bias_qkv else None, cm, v.weights), G, E)
    if v.qk_norm_eps is not None:  # per-head RMSNorm over head_dim, before RoPE
        q, k = _rms_norm(b, q, "q_norm", v.qk_norm_eps), _rms_norm(b, k, "k_norm", v.qk_norm_eps)
    if v.rope:
        cos = b("Unsqueeze", b("Gather", "cos", "position_ids", axis=0), b.const([1]))  # [B, 1, S, R/2]
        sin = b("Unsqueeze", b("Gather", "sin", "position_ids", axis=0), b.const([1]))
        R = v.rotary_dim or E
        q, k = _rope(b, q, cos, sin, E, R), _rope(b, k, cos, sin, E, R)
    if v.kv_policy == "active":  # kv heads no active query head reads: zeros in the new cache slots
        groups = b("ReduceMax", b("Reshape", b("Cast", "head_mask", to=TensorProto.INT64), b.const([0, G, H // G])),
                   b.const([2]), keepdims=0)  # [B, G]
        group_on = b("Unsqueeze", b("CastLike", groups, "x"), b.const([2, 3]))
        k, val = b("Mul", k, group_on), b("Mul", val, group_on)
    # the past: the first P = T - S positions of past_key; present = past_key with P..T-1 written
    S = b("Slice", b("Shape", "x"), b.const([1]), b.const([2]))
    T = b("Slice", b("Shape", "attention_mask"), b.const([1]), b.const([2]))
    past = b("Sub", T, S)
    valid_k = b("Concat", b("Slice", "past_key", b.const([0]), past, b.const([2])), k, axis=2)
    valid_v = b("Concat", b("Slice", "past_value", b.const([0]), past, b.const([2])), val, axis=2)
    end = b.const([np.iinfo(np.int64).max])
    b.rename(b("Concat", valid_k, b("Slice", "past_key", T, end, b.const([2])), axis=2), "present_key")
    b.rename(b("Concat", valid_v, b("Slice", "past_value", T, end, b.const([2])), axis=2), "present_value")

    def per_head(t):  # [B, G, T, E] -> [B, H, T, E]: query head h reads kv head h // (H/G)
        shape = b("Shape", t)
        expanded = b("Expand", b("Unsqueeze", t, b.const([2])),
                     b("Concat", b("Slice", shape, b.const([0]), b.const([2])), b.const([H // G]),
                       b("Slice", shape, b.const([2]), b.const([4])), axis=0))
        return b("Reshape", expanded, b.const([0, H, -1, E]))
    keys, values = per_head(valid_k), per_head(valid_v)
    scores = b("Mul", b("MatMul", q, b("Transpose", keys, perm=[0, 1, 3, 2])), b.const(v.scale, np.float32))
    # causal and padding mask: key j visible to new token i when j <= past + i and attention_mask[b, j]
    zero, one = b.const(0), b.const(1)
    i = b("Add", b("Range", zero, b("Squeeze", S), one), b("Squeeze", past))
    j = b("Range", zero, b("Squeeze", T), one)
    causal = b("LessOrEqual", b("Unsqueeze", j, b.const([0])), b("Unsqueeze", i, b.const([1])))  # [S, T]
    padding = b("Unsqueeze", b("Cast", "attention_mask", to=TensorProto.BOOL), b.const([1, 2]))  # [B, 1, 1, T]
    if v.windowed:  # and i's cache index - j < sliding_window, unless the node's window is 0 (whole cache)
        window = _attribute_int(b, "sliding_window")
        distance = b("Sub", b("Unsqueeze", i, b.const([1])), b("Unsqueeze", j, b.const([0])))
        inside = b("Or", b("Less", distance, window), b("LessOrEqual", window, zero))
        causal = b("And", causal, inside)
    visible = b("And", causal, padding)
    scores = b("Where", visible, scores, b("CastLike", b.const(MASKED, np.float32), "x"))
    context = b("MatMul", b("Softmax", scores, axis=-1), values)  # [B, H, S, E]
    on = b("Unsqueeze", b("CastLike", "head_mask", "x"), b.const([2, 3]))
    context = b("Reshape", b("Transpose", b("Mul", context, on), perm=[0, 2, 1, 3]), b.const([0, 0, H * E]))
    if v.thresholds:
        context = _keep_large(b, context, "t_o")
    y = b("MatMul", _on_grid(b, context, v.activations), _weight(b, "w_o_t", v.weights, 0))
    b.rename(b("Add", y, "b_o") if v.bias_o else y, "y")
    return helper.make_function(DOMAIN, "SparseHeadAttention", ATTENTION_INPUTS, ATTENTION_OUTPUTS, b.nodes,
                                [helper.make_opsetid("", OPSET)],
                                attributes=["num_heads", "num_kv_heads", "head_dim", "scale", "rope", "kv_policy",
                                            "weight_layout", "block_size", "activation_bits", "qk_norm_eps",
                                            "plugin_namespace",
                                            "plugin_version"],
                                # a node without sliding_window (a global layer) reads the whole cache
                                attribute_protos=[helper.make_attribute("sliding_window", 0)])


def blocked_matmul_function(weights: str, activations: str = "fp32") -> onnx.FunctionProto:
    """y = x @ w^T with w [N, D] as codes in blocks of 32 along D (the LM head of a quantized export):
    the dequantized matrix, then a MatMul (x on the int8 activation grid first with activation_bits 8).
    The native kernel reads the codes in place instead."""
    b = _Body()
    x = _on_grid(b, "x", activations)
    b.rename(b("MatMul", x, b("Transpose", _weight(b, "w", weights, 1), perm=[1, 0])), "y")
    return helper.make_function(DOMAIN, "BlockedMatMul", MATMUL_INPUTS, ["y"], b.nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["block_size", "activation_bits"])


def _node_inputs(inputs: dict, formal: list[str]) -> list[str]:
    """Tensor names in formal order; absent optional inputs are "" and trailing ones are left off."""
    names = [inputs.get(k, "") for k in formal]
    while names and not names[-1]:
        names.pop()
    return names


def layout_attrs(weight_layout: str) -> dict:
    """The node attribute naming the input projections' layout; row_major (the default) is left off."""
    return {} if weight_layout == "row_major" else {"weight_layout": weight_layout}


def mlp_node(inputs: dict, output: str, activation: str, name: str, weight_layout: str = "row_major") -> onnx.NodeProto:
    """A SparseNeuronMLP node; `inputs` maps formal names to tensor names (absent optional: missing)."""
    return helper.make_node("SparseNeuronMLP", _node_inputs(inputs, MLP_INPUTS), [output], name=name,
                            domain=DOMAIN, activation=activation, **layout_attrs(weight_layout), **PLUGIN_ATTRS)


def family_attrs(sliding_window: int | None, qk_norm_eps: float | None) -> dict:
    """The attributes of revision 6, written only where a model uses them: `sliding_window` on the nodes
    of windowed layers (absent: 0, the whole cache), `qk_norm_eps` with q/k norms."""
    attrs = {}
    if sliding_window:
        attrs["sliding_window"] = int(sliding_window)
    if qk_norm_eps is not None:
        attrs["qk_norm_eps"] = float(qk_norm_eps)
    return attrs


def attention_node(inputs: dict, outputs: list[str], v: AttentionVariant, name: str, window: int = 0) -> onnx.NodeProto:
    return helper.make_node("SparseHeadAttention", _node_inputs(inputs, ATTENTION_INPUTS), outputs,
                            name=name, domain=DOMAIN, num_heads=v.num_heads, num_kv_heads=v.num_kv_heads,
                            head_dim=v.head_dim, scale=float(v.scale), rope=int(v.rope), kv_policy=v.kv_policy,
                            **layout_attrs(v.weight_layout),
                            **family_attrs(window, v.qk_norm_eps), **PLUGIN_ATTRS)


# ---------------------------------------------------------------- schemas
def _schema(name, inputs, outputs, attrs, doc, infer):
    P, S = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption
    types = {"mask": "B", "head_mask": "B", "attention_mask": "I", "position_ids": "I", "t_x": "F", "t_h": "F",
             "t_o": "F", **{w: "W" for w in WEIGHTS | {"w"}}, **{s: "H" for s in SCALES | {"w_scale", "w_min"}}}
    formal_in = [P(n, types.get(n, "T"), "", param_option=S.Optional if n in OPTIONAL else S.Single)
                 for n in inputs]
    formal_out = [P(n, "T", "") for n in outputs]
    constraints = [("T", ["tensor(float)", "tensor(float16)"], "activations and weights"),
                   ("B", ["tensor(bool)"], "masks"), ("I", ["tensor(int64)"], "positions and attention mask"),
                   ("F", ["tensor(float)"], "activation thresholds (scalars)"),
                   ("W", ["tensor(float)", "tensor(float16)", "tensor(int8)", "tensor(uint4)"],
                    "projection weights: values, or block codes with their scales"),
                   ("H", ["tensor(float16)"], "block scales and minimums of quantized weights")]
    schema = onnx.defs.OpSchema(name, DOMAIN, VERSION, doc, inputs=formal_in, outputs=formal_out,
                                type_constraints=constraints, attributes=attrs)
    schema.set_type_and_shape_inference_function(infer)
    return schema


def _attr(name, kind, required=True):
    return onnx.defs.OpSchema.Attribute(name, kind, "", required=required)


def _infer_mlp(ctx):
    ctx.set_output_type(0, ctx.get_input_type(0))


def _infer_matmul(ctx):
    x, w = ctx.get_input_type(0), ctx.get_input_type(1)
    t = onnx.TypeProto()
    t.tensor_type.elem_type = x.tensor_type.elem_type
    if x.tensor_type.HasField("shape") and w.tensor_type.HasField("shape"):
        for d in list(x.tensor_type.shape.dim)[:-1] + [w.tensor_type.shape.dim[0]]:
            t.tensor_type.shape.dim.add().CopyFrom(d)
    ctx.set_output_type(0, t)


def _infer_attention(ctx):
    x = ctx.get_input_type(0)
    ctx.set_output_type(0, x)
    past = ctx.get_input_type(9)
    elem = x.tensor_type.elem_type
    dims = [d for d in past.tensor_type.shape.dim] if past.tensor_type.HasField("shape") else None
    for out in (1, 2):
        t = onnx.TypeProto()
        t.tensor_type.elem_type = elem
        if dims is not None and len(dims) == 4:
            for k, d in enumerate(dims):
                nd = t.tensor_type.shape.dim.add()
                if k != 2 and d.HasField("dim_value"):
                    nd.dim_value = d.dim_value
                elif k != 2 and d.HasField("dim_param"):
                    nd.dim_param = d.dim_param
        ctx.set_output_type(out, t)


def register_schemas() -> None:
    """Register the domain's schemas once per process (idempotent)."""
    if onnx.defs.has("SparseNeuronMLP", DOMAIN):
        return
    A = onnx.defs.OpSchema.AttrType
    plugin = [_attr("weight_layout", A.STRING, False), _attr("block_size", A.INT, False),
              _attr("activation_bits", A.INT, False), _attr("plugin_namespace", A.STRING, False), _attr("plugin_version", A.STRING, False)]
    onnx.defs.register_schema(_schema(
        "SparseNeuronMLP", MLP_INPUTS, ["y"], [_attr("activation", A.STRING)] + plugin,
        "FFN that computes only the neurons kept by mask[B,F] (docs/export-format.md).", _infer_mlp))
    onnx.defs.register_schema(_schema(
        "SparseHeadAttention", ATTENTION_INPUTS, ATTENTION_OUTPUTS,
        [_attr("num_heads", A.INT), _attr("num_kv_heads", A.INT), _attr("head_dim", A.INT), _attr("scale", A.FLOAT),
         _attr("rope", A.INT), _attr("kv_policy", A.STRING), _attr("sliding_window", A.INT, False),
         _attr("qk_norm_eps", A.FLOAT, False)] + plugin,
        "Attention that computes only the heads kept by head_mask[B,H], with KV cache (docs/export-format.md).",
        _infer_attention))
    onnx.defs.register_schema(_schema(
        "BlockedMatMul", MATMUL_INPUTS, ["y"], [_attr("block_size", A.INT, False), _attr("activation_bits", A.INT, False)],
        "y = x @ w^T, w as block codes with fp16 scales (docs/export-format.md).", _infer_matmul))
