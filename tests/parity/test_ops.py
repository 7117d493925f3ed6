"""Op-level parity: the torch eager kernels, the ONNX function bodies (run by onnxruntime) and the C++
kernels of the native library (registered in onnxruntime) against the float64 NumPy reference, on
random shapes, masks and padding (hypothesis). fp32 relative error < 1e-5, relative to the scale of
what was combined: max |error| / max(max |reference|, max sum of |terms| of an output, with each
activation value counted at its own rounding scale). Without the second term, an output that
cancels (terms of size 1 summing to 0.005, or gelu / silu far in their negative tail) would judge
fp32's rounding, which every fp32 implementation shares, instead of the kernel."""

import numpy as np
import onnx
import onnxruntime as ort
import torch
from hypothesis import example, given
from onnx import TensorProto, helper

from shadowllm.export import ops  # noqa: F401  (registers the torch ops)
from shadowllm.export.onnx_ops import (ATTENTION_INPUTS, DOMAIN, MLP_INPUTS, OPSET, MLPVariant,
                                       attention_function, attention_node, mlp_function, mlp_node,
                                       register_schemas)
from tests.parity.cases import (REL, SETTINGS, attention_case, attention_reference, attention_tensors, mlp_case,
                                mlp_reference, mlp_tensors, rel_error)


def native_library():
    from shadowllm.runtime.native import ort_ops_library

    path = ort_ops_library()
    assert path is not None, "build/libshadowllm_ort_ops.so is not built: run scripts/setup.sh"
    return str(path)


def run_function(node, function, feeds, outputs, native=False):
    """A one-node model carrying the op's function body, run by onnxruntime: with native=True the
    C++ kernel of the registered library runs instead of the body.

    outputs: {name: shape}."""
    register_schemas()
    dtype = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("bool"): TensorProto.BOOL,
             np.dtype("int64"): TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(k, dtype[v.dtype], list(v.shape)) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(shape)) for o, shape in outputs.items()]
    graph = helper.make_graph([node], "op", inputs, outs)
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    if native:
        options.register_custom_ops_library(native_library())
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(list(outputs), feeds)


@given(mlp_case())
@example((1, 1, 8, 1, MLPVariant('gelu', False, False, False), 90269, 0.3))  # activation tails: once flaky
@example((1, 1, 9, 1, MLPVariant('silu', False, False, False), 2_147_483_647, 0.7))
@SETTINGS
def test_sparse_neuron_mlp(case):
    B, S, D, F, v, seed, keep = case
    t = mlp_tensors(case)
    expect, magnitude = mlp_reference(t, v)
    tt = {k: torch.from_numpy(a) for k, a in t.items()}
    eager = torch.ops.shadowllm.sparse_neuron_mlp(tt["x"], tt["w_in"], tt.get("b_in"), tt.get("w_gate"), tt["w_out_t"],
                                                  tt.get("b_out"), tt["mask"], v.activation)
    assert rel_error(eager.numpy(), expect, magnitude) < REL
    for native in (False, True):  # the function body, then the C++ kernel
        (onnx_y,) = run_function(mlp_node({k: k for k in t}, "y", v.activation, "mlp"), mlp_function(v), t,
                                 {"y": (B, S, D)}, native)
        assert rel_error(onnx_y, expect, magnitude) < REL, f"native={native}"


@given(attention_case())
@SETTINGS
def test_sparse_head_attention(case):
    B, S, P, D, v, seed, keep = case
    H, G, E = v.num_heads, v.num_kv_heads, v.head_dim
    T = P + S
    t = attention_tensors(case)
    expect, magnitudes = attention_reference(t, v)
    tt = {k: torch.from_numpy(a) for k, a in t.items()}
    eager = torch.ops.shadowllm.sparse_head_attention(*[tt.get(k) for k in ATTENTION_INPUTS], H, G, E, v.scale,
                                                      int(v.rope), v.kv_policy)
    names = ["y", "present_key", "present_value"]
    shapes = dict(zip(names, [(B, S, D), (B, G, T, E), (B, G, T, E)]))
    got = run_function(attention_node({k: k for k in t}, names, v, "attn"), attention_function(v), t, shapes)
    native = run_function(attention_node({k: k for k in t}, names, v, "attn"), attention_function(v), t, shapes,
                          native=True)
    for ours_eager, ours_onnx, ours_native, reference, mag in zip(eager, got, native, expect, magnitudes):
        assert rel_error(ours_eager.numpy(), reference, mag) < REL
        assert rel_error(ours_onnx, reference, mag) < REL
        assert rel_error(ours_native, reference, mag) < REL


def test_schemas_make_shape_inference_work():
    register_schemas()
    v = MLPVariant("silu", True, False, False)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])
    ins = [x] + [helper.make_tensor_value_info(k, TensorProto.FLOAT, [4, 8]) for k in ("w_in", "w_gate", "w_out_t")]
    ins.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 4]))
    graph = helper.make_graph([mlp_node({k: k for k in MLP_INPUTS if k not in ("b_in", "b_out")}, "y", "silu", "m")],
                              "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=[mlp_function(v)],
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    y = next(vi for vi in inferred.graph.output if vi.name == "y")
    assert [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim] == ["B", "S", 8]
