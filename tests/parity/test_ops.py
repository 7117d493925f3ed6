"""Op-level parity: the torch eager kernels, the ONNX function bodies (run by onnxruntime) and the C++
kernels of the native library (registered in onnxruntime) against the float64 NumPy reference, on
random shapes, masks and padding (hypothesis). fp32 relative error < 1e-5, relative to the scale of
what was combined: max |error| / max(max |reference|, max sum of |terms| of an output, with each
activation value counted at its own rounding scale). Without the second term, an output that
cancels (terms of size 1 summing to 0.005, or gelu / silu far in their negative tail) would judge
fp32's rounding, which every fp32 implementation shares, instead of the kernel."""

import numpy as np
import pytest
import onnx
import onnxruntime as ort
import torch
from dataclasses import replace

from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from shadowllm.export import ops  # noqa: F401  (registers the torch ops)
from shadowllm.export.onnx_ops import (ATTENTION_BASE_INPUTS, DOMAIN, MLP_BASE_INPUTS, OPSET, AttentionVariant,
                                       MLPVariant, attention_function, attention_node, mlp_function, mlp_node,
                                       register_schemas)
from tests.parity import numpy_reference as ref
from tests.parity.cases import (COMPUTED_MODES, INPUT_MODES, REL, SETTINGS, SPARE, attention_args, attention_case,
                                attention_reference, attention_tensors, case_window, channel_major, eager_attention, mlp_case, mlp_reference, mlp_tensors, mlp_threshold_case, rel_error,
                                threshold_for_computed, threshold_for_input)


def native_library():
    from shadowllm.compiler.native import ort_ops_library

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
    feeds = {k: np.asarray(v) for k, v in feeds.items()}
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
                                                  tt.get("b_out"), tt["mask"], None, None, v.activation, "row_major")
    assert rel_error(eager.numpy(), expect, magnitude) < REL
    for native in (False, True):  # the function body, then the C++ kernel
        (onnx_y,) = run_function(mlp_node({k: k for k in t}, "y", v.activation, "mlp"), mlp_function(v), t,
                                 {"y": (B, S, D)}, native)
        assert rel_error(onnx_y, expect, magnitude) < REL, f"native={native}"


@given(attention_case(), SPARE)
@SETTINGS
def test_sparse_head_attention(case, spare):
    B, S, P, D, v, seed, keep = case
    H, G, E = v.num_heads, v.num_kv_heads, v.head_dim
    T = max(P + spare, P + S)  # present's positions
    t = attention_tensors(case, spare)
    window = case_window(case)
    expect, magnitudes = attention_reference(t, v, window)
    tt = {k: torch.from_numpy(a) for k, a in t.items()}
    eager = eager_attention(tt, v, window=window)
    names = ["y", "present_key", "present_value"]
    shapes = dict(zip(names, [(B, S, D), (B, G, T, E), (B, G, T, E)]))
    node = attention_node({k: k for k in t}, names, v, "attn", window)
    got = run_function(node, attention_function(v), t, shapes)
    native = run_function(node, attention_function(v), t, shapes, native=True)
    for ours_eager, ours_onnx, ours_native, reference, mag in zip(eager, got, native, expect, magnitudes):
        assert rel_error(ours_eager.numpy(), reference, mag) < REL
        assert rel_error(ours_onnx, reference, mag) < REL
        assert rel_error(ours_native, reference, mag) < REL


@pytest.mark.parametrize("S, window", [(1, 0), (1, 100), (3, 0)])
def test_native_attention_splits_long_contexts_over_key_blocks(S, window):
    """700 past positions: the native kernel splits a step's keys into blocks (64..512 keys, about 8
    tasks) whose softmax partials it merges; a sliding window hides whole blocks of them."""
    v = AttentionVariant(4, 2, 8, 8 ** -0.5, False, False, False, "all", windowed=window > 0)
    case = (1, S, 700, 64, v, int(np.random.default_rng().integers(2**31)), 1.0)  # fresh inputs each run
    t = attention_tensors(case)
    expect, magnitudes = attention_reference(t, v, window)
    names = ["y", "present_key", "present_value"]
    shapes = dict(zip(names, [(1, S, 64), (1, 2, 700 + S, 8), (1, 2, 700 + S, 8)]))
    node = attention_node({k: k for k in t}, names, v, "attn", window)
    native = run_function(node, attention_function(v), t, shapes, native=True)
    for ours, reference, mag in zip(native, expect, magnitudes):
        assert rel_error(ours, reference, mag) < REL


LAYOUTS = st.sampled_from(["row_major", "channel_major"])


@given(mlp_case(), st.sampled_from(INPUT_MODES), st.sampled_from(COMPUTED_MODES), LAYOUTS)
# every x thresholded away: h is act(b_in) in every token, all equal, and "gap" once sat on them (a tie)
@example((1, 2, 2, 2, MLPVariant('gelu', False, True, False), 0, 0.3), "above", "gap", "row_major")
@example((1, 2, 2, 1, MLPVariant('gelu', False, True, False), 0, 0.7), "above", "gap", "row_major")
@SETTINGS
def test_sparse_neuron_mlp_with_thresholds(case, x_mode, h_mode, layout):
    """Thresholds on x and h (an entry counts when |v| >= t: exact ties kept, all kept, none kept), on
    top of the mask, in either weight layout: eager, function body and C++ kernel vs float64 NumPy."""
    B, S, D, F, v, seed, keep = case
    v = replace(v, thresholds=True, weight_layout=layout)
    t, t_x, t_h, expect, magnitude = mlp_threshold_case(case, x_mode, h_mode)
    if layout == "channel_major":
        t = channel_major(t, ("w_in", "w_gate"))
    t.update(t_x=np.array(t_x), t_h=np.array(t_h))
    tt = {k: torch.from_numpy(np.asarray(a)) for k, a in t.items()}
    eager = torch.ops.shadowllm.sparse_neuron_mlp(tt["x"], tt["w_in"], tt.get("b_in"), tt.get("w_gate"), tt["w_out_t"],
                                                  tt.get("b_out"), tt["mask"], tt["t_x"], tt["t_h"], v.activation,
                                                  layout)
    assert rel_error(eager.numpy(), expect, magnitude) < REL
    for native in (False, True):
        (onnx_y,) = run_function(mlp_node({k: k for k in t}, "y", v.activation, "mlp", layout), mlp_function(v), t,
                                 {"y": (B, S, D)}, native)
        assert rel_error(onnx_y, expect, magnitude) < REL, f"native={native}"


@given(attention_case(), st.sampled_from(INPUT_MODES), st.sampled_from(COMPUTED_MODES), LAYOUTS, SPARE)
@SETTINGS
def test_sparse_head_attention_with_thresholds(case, x_mode, o_mode, layout, spare):
    B, S, P, D, v, seed, keep = case
    v = replace(v, thresholds=True, weight_layout=layout)
    H, G, E = v.num_heads, v.num_kv_heads, v.head_dim
    T = max(P + spare, P + S)  # present's positions
    t = attention_tensors(case, spare)
    t_x = threshold_for_input(t["x"], x_mode, seed)
    args = [t.get(k) for k in ATTENTION_BASE_INPUTS[:16]] + [H, G, E, v.scale, v.rope, v.kv_policy]
    window = case_window(case)
    extra = attention_args(t, v, window)
    seen = []
    ref.sparse_head_attention(*args, t_x=t_x, seen=seen, **extra)
    t_o = threshold_for_computed(seen, o_mode)
    *expect, magnitude = ref.sparse_head_attention(*args, magnitude=True, t_x=t_x, t_o=t_o, **extra)
    magnitudes = [magnitude, None, None]
    if layout == "channel_major":
        t = channel_major(t, ("w_q", "w_k", "w_v"))
    t.update(t_x=np.array(t_x), t_o=np.array(t_o))
    tt = {k: torch.from_numpy(np.asarray(a)) for k, a in t.items()}
    eager = eager_attention(tt, v, layout, window)
    names = ["y", "present_key", "present_value"]
    shapes = dict(zip(names, [(B, S, D), (B, G, T, E), (B, G, T, E)]))
    node = attention_node({k: k for k in t}, names, v, "attn", window)
    got = run_function(node, attention_function(v), t, shapes)
    native = run_function(node, attention_function(v), t, shapes, native=True)
    for ours_eager, ours_onnx, ours_native, reference, mag in zip(eager, got, native, expect, magnitudes):
        assert rel_error(ours_eager.numpy(), reference, mag) < REL
        assert rel_error(ours_onnx, reference, mag) < REL
        assert rel_error(ours_native, reference, mag) < REL


def test_thresholds_skip_the_weights_of_dropped_entries():
    """Poison (NaN) the weights that dropped entries would multiply: x channels below t_x (columns
    of a channel-major w_in / w_gate) and neurons whose h never reaches t_h (rows of w_out_t). The
    native kernel must not read them: its output stays finite and equals the reference."""
    rng = np.random.default_rng(7)
    B, S, D, F = 1, 1, 64, 96
    x, w_in, w_gate, w_out_t = (rng.standard_normal(s).astype(np.float32) for s in ((B, S, D), (F, D), (F, D), (F, D)))
    mask = np.ones((B, F), bool)
    t_x = np.float32(np.median(np.abs(x)))
    seen = []
    ref.sparse_neuron_mlp(x, w_in, None, w_gate, w_out_t, None, mask, "silu", t_x=t_x, seen=seen)
    t_h = threshold_for_computed(seen, "gap")
    expect = ref.sparse_neuron_mlp(x, w_in, None, w_gate, w_out_t, None, mask, "silu", t_x=t_x, t_h=t_h)
    dropped_x = np.abs(x[0, 0]) < t_x
    h = np.asarray(seen)
    assert dropped_x.any() and (np.abs(h) < t_h).any()
    w_in_c, w_gate_c, w_out_p = w_in.T.copy(), w_gate.T.copy(), w_out_t.copy()
    w_in_c[dropped_x], w_gate_c[dropped_x] = np.nan, np.nan
    w_out_p[np.abs(h) < t_h] = np.nan
    v = MLPVariant("silu", True, False, False, thresholds=True, weight_layout="channel_major")
    feeds = dict(x=x, w_in=w_in_c, w_gate=w_gate_c, w_out_t=w_out_p, mask=mask, t_x=np.array(t_x), t_h=np.array(t_h))
    (y,) = run_function(mlp_node({k: k for k in feeds}, "y", "silu", "mlp", "channel_major"), mlp_function(v), feeds,
                        {"y": (B, S, D)}, native=True)
    assert np.isfinite(y).all()
    assert rel_error(y, expect) < REL


def test_schemas_make_shape_inference_work():
    register_schemas()
    v = MLPVariant("silu", True, False, False)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])
    ins = [x] + [helper.make_tensor_value_info(k, TensorProto.FLOAT, [4, 8]) for k in ("w_in", "w_gate", "w_out_t")]
    ins.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 4]))
    graph = helper.make_graph([mlp_node({k: k for k in MLP_BASE_INPUTS if k not in ("b_in", "b_out", "t_x", "t_h")}, "y", "silu", "m")],
                              "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=[mlp_function(v)],
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    y = next(vi for vi in inferred.graph.output if vi.name == "y")
    assert [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim] == ["B", "S", 8]
