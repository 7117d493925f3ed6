"""Quantized weights (models/quant.py, `export --weights int8|int4`): the formats, both ops in every
path (native kernels at decode and at prefill, function bodies) against a float64 NumPy reference
on fresh random inputs, and whole exports through `parity`."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shadowllm.cli import main
from shadowllm.compiler.native import session_options
from shadowllm.export.onnx_ops import (DOMAIN, OPSET, AttentionVariant, MLPVariant, attention_function, attention_node,
                                       blocked_matmul_function, mlp_function, mlp_node, register_schemas)
from shadowllm.models import ShadowError
from shadowllm.models.quant import BLOCK, fake_quantize, quantize
from shadowllm.models.tiny import save_tiny
from tests.parity import numpy_reference as ref
from tests.parity.cases import REL, rel_error

FORMATS = ("int8", "int4")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("axis", (0, 1))
def test_quantize_is_exact_on_its_own_grid(fmt, axis):
    """Codes and fp16 scales drawn at random, dequantized, then quantized again: the same values
    (what makes `--weights int4` give the shipped Q4_1 model back bit for bit)."""
    g = torch.Generator().manual_seed(7)
    shape = (64, 96) if axis == 1 else (96, 64)
    lo, hi = (0, 15) if fmt == "int4" else (-127, 127)
    codes = torch.randint(lo, hi + 1, shape, generator=g)
    blocks = list(shape)
    blocks[axis] //= BLOCK
    scale = (torch.rand(blocks, generator=g) * 0.01 + 1e-3).half().float().repeat_interleave(BLOCK, axis)
    w = codes.float() * scale
    if fmt == "int4":  # pin each block's range to the full code range, as a quantizer leaves it
        w = w + (torch.randn(blocks, generator=g) * 0.02).half().float().repeat_interleave(BLOCK, axis)
    once = fake_quantize(w, fmt, axis)
    assert torch.equal(fake_quantize(once, fmt, axis), once)
    err = (once - w).abs().max() / w.abs().max()
    assert err < 0.1  # random codes need not span their block's range; the grid still holds w closely


def test_quantize_refuses_a_ragged_input_dimension():
    with pytest.raises(ShadowError, match="not a multiple of the block"):
        quantize(torch.zeros(8, 40), "int4", 1)


def _quantized_initializers(name, w, fmt, axis):
    q = quantize(torch.from_numpy(w), fmt, axis)
    codes = q.codes.numpy().astype(ml_dtypes.uint4 if fmt == "int4" else np.int8)
    out = [numpy_helper.from_array(codes, name), numpy_helper.from_array(q.scale.numpy(), f"{name}_scale")]
    if q.minimum is not None:
        out.append(numpy_helper.from_array(q.minimum.numpy(), f"{name}_min"))
    return out, q.dequantize().double().numpy()


def _run(node, function, feeds, initializers, outputs, native):
    """outputs: {name: shape}."""
    register_schemas()
    dtype = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("bool"): TensorProto.BOOL,
             np.dtype("int64"): TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(k, dtype[v.dtype], list(v.shape)) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(shape)) for o, shape in outputs.items()]
    model = helper.make_model(helper.make_graph([node], "op", inputs, outs, initializers), functions=[function],
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    options, registered = session_options(native)
    assert registered == native
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(list(outputs),
                                                                                                            feeds)


def _within(ours, expect, flips):
    """|ours - expect| within REL of the reference's scale, plus what the int8 activation grid's boundary
    cases may move each output by (numpy_reference.on_grid; zero with fp32 activations)."""
    expect = np.asarray(expect, np.float64)
    scale = max(float(np.abs(expect).max()), 1e-30)
    excess = np.abs(np.asarray(ours, np.float64) - expect) - flips
    return float(excess.max() / scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ("row_major", "channel_major"))
@pytest.mark.parametrize("S", (1, 3, 9))  # decode (codes read in registers) and a prompt (dequantized once)
@pytest.mark.parametrize("activations", ("fp32", "int8"))  # int8: decode multiplies the codes as integers
def test_mlp_with_quantized_weights(fmt, layout, S, activations):
    rng = np.random.default_rng()  # fresh inputs every run; the tolerance holds for any draw
    B, D, F = 2, 96, 64
    w = {k: (rng.standard_normal((F, D)) * 0.1).astype(np.float32) for k in ("w_in", "w_gate", "w_out_t")}
    w["w_out_t"] = (rng.standard_normal((F, D)) * 0.1).astype(np.float32)
    cm = layout == "channel_major"
    inits, exact = [], {}
    for k in ("w_in", "w_gate"):
        stored = w[k].T.copy() if cm else w[k]  # channel-major: [D, F], blocks along axis 0 (D)
        parts, value = _quantized_initializers(k, stored, fmt, 0 if cm else 1)
        inits += parts
        exact[k] = value.T if cm else value
    parts, exact["w_out_t"] = _quantized_initializers("w_out_t", w["w_out_t"], fmt, 0)
    inits += parts
    x = rng.standard_normal((B, S, D)).astype(np.float32)
    mask = rng.random((B, F)) < 0.6
    t_x, t_h = np.array(0.5, np.float32), np.array(0.05, np.float32)
    grid = activations == "int8"
    flips = np.zeros((B, S, D))
    expect = ref.sparse_neuron_mlp(x, exact["w_in"], None, exact["w_gate"], exact["w_out_t"], None, mask, "silu",
                                   t_x=t_x, t_h=t_h, grid=grid, flips=flips)
    names = {k: k for k in ("x", "w_in", "w_gate", "w_out_t", "mask", "t_x", "t_h")}
    names.update({i.name: i.name for i in inits})
    node = mlp_node(names, "y", "silu", "mlp", layout)
    node.attribute.append(helper.make_attribute("block_size", BLOCK))
    if grid:
        node.attribute.append(helper.make_attribute("activation_bits", 8))
    function = mlp_function(MLPVariant("silu", True, False, False, True, layout, fmt, activations))
    feeds = {"x": x, "mask": mask, "t_x": t_x, "t_h": t_h}
    for native in (True, False):
        (y,) = _run(node, function, feeds, inits, {"y": (B, S, D)}, native)
        assert _within(y, expect, flips) < REL, (native, _within(y, expect, flips))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ("row_major", "channel_major"))
@pytest.mark.parametrize("S", (1, 5))
@pytest.mark.parametrize("activations", ("fp32", "int8"))
def test_attention_with_quantized_weights(fmt, layout, S, activations):
    rng = np.random.default_rng()
    B, D, H, G, E, P = 2, 64, 4, 2, 16, 3  # head_dim 16: a block of the context spans two heads
    v = AttentionVariant(H, G, E, E ** -0.5, True, False, False, "all", True, layout, fmt, activations=activations)
    grid = activations == "int8"
    flips = np.zeros((B, S, D))
    cm = layout == "channel_major"
    shapes = {"w_q": (H * E, D), "w_k": (G * E, D), "w_v": (G * E, D)}
    inits, exact = [], {}
    for k, shape in shapes.items():
        w = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        parts, value = _quantized_initializers(k, w.T.copy() if cm else w, fmt, 0 if cm else 1)
        inits += parts
        exact[k] = value.T if cm else value
    parts, exact["w_o_t"] = _quantized_initializers("w_o_t", (rng.standard_normal((H * E, D)) * 0.2).astype(np.float32),
                                                    fmt, 0)
    inits += parts
    T, M = P + S, 32
    inv = 1.0 / (10000 ** (np.arange(0, E, 2) / E))
    angles = np.arange(M)[:, None] * inv[None, :]
    feeds = {"x": rng.standard_normal((B, S, D)).astype(np.float32),
             "past_key": rng.standard_normal((B, G, P, E)).astype(np.float32),
             "past_value": rng.standard_normal((B, G, P, E)).astype(np.float32),
             "attention_mask": np.ones((B, T), np.int64),
             "position_ids": np.tile(np.arange(P, T), (B, 1)).astype(np.int64),
             "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
             "head_mask": rng.random((B, H)) < 0.7, "t_x": np.array(0.4, np.float32),
             "t_o": np.array(0.05, np.float32)}
    expect = ref.sparse_head_attention(feeds["x"], exact["w_q"], None, exact["w_k"], None, exact["w_v"], None,
                                       exact["w_o_t"], None, feeds["past_key"], feeds["past_value"],
                                       feeds["attention_mask"], feeds["position_ids"], feeds["cos"], feeds["sin"],
                                       feeds["head_mask"], H, G, E, v.scale, True, "all", t_x=feeds["t_x"],
                                       t_o=feeds["t_o"], grid=grid, flips=flips)
    names = {k: k for k in feeds} | {k: k for k in shapes} | {"w_o_t": "w_o_t"} | {i.name: i.name for i in inits}
    node = attention_node(names, ["y", "present_key", "present_value"], v, "attention")
    node.attribute.append(helper.make_attribute("block_size", BLOCK))
    if grid:
        node.attribute.append(helper.make_attribute("activation_bits", 8))
    for native in (True, False):
        got = _run(node, attention_function(v), feeds, inits,
                   {"y": (B, S, D), "present_key": (B, G, T, E), "present_value": (B, G, T, E)}, native)
        assert _within(got[0], expect[0], flips) < REL, native
        for ours, want in zip(got[1:], expect[1:]):
            assert rel_error(ours, want) < REL, native


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", ((1, 1), (2, 3), (1, 6)))  # decode steps, and a prompt's every position
@pytest.mark.parametrize("activations", ("fp32", "int8"))
@pytest.mark.parametrize("D", (96, 288))
def test_blocked_matmul(fmt, shape, activations, D):
    """The quantized LM head: y = x @ w^T from the codes, native kernel and function body, against the
    float64 product of the dequantized values (x on the int8 grid first with activation_bits 8: the
    same fp32 inputs round the same way everywhere, so no boundary case needs a bound). D 288: nine
    blocks a row, the decode dot's eight-block groups and a remainder (96: the remainder alone)."""
    rng = np.random.default_rng()  # fresh inputs every run; the tolerance holds for any draw
    N = 4160  # more than one 4,096-row chunk of the prompt path
    inits, exact = _quantized_initializers("w", (rng.standard_normal((N, D)) * 0.1).astype(np.float32), fmt, 1)
    x = rng.standard_normal((*shape, D)).astype(np.float32)
    names = ["x"] + [i.name for i in inits]
    bits = {"activation_bits": 8} if activations == "int8" else {}
    node = helper.make_node("BlockedMatMul", names, ["y"], domain=DOMAIN, block_size=BLOCK, **bits)
    x64 = x.astype(np.float64).reshape(-1, D)
    if bits:
        x64 = ref.on_grid(x64)
    want = (x64 @ exact.T).reshape(*shape, N)
    for native in (True, False):
        (got,) = _run(node, blocked_matmul_function(fmt, activations), {"x": x}, inits, {"y": (*shape, N)}, native)
        assert rel_error(got, want) < REL, native


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    # realistic proportions at test size: GQA 3:1, head_dim 16 (hidden 96 / 6 heads), F a multiple of 32
    folder = tmp_path_factory.mktemp("quantized") / "llama"
    save_tiny("llama", folder, intermediate_size=96)
    return folder


@pytest.mark.parametrize("fmt,policy", [("int4", "threshold"), ("int8", "dense")])
def test_quantized_export_passes_parity(tiny_llama, tmp_path, monkeypatch, capsys, fmt, policy):
    """`export --weights` then `parity` at two sparsities, native kernels and function bodies; the
    report states the format's own distance from the fp32 source apart."""
    monkeypatch.setenv("SHADOWLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / f"{fmt}-{policy}"
    assert main(["export", str(tiny_llama), "--weights", fmt, "--policy", policy, "--out", str(out)]) in (0, None)
    init = {i.name: i for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    want = TensorProto.UINT4 if fmt == "int4" else TensorProto.INT8
    assert init["layers.0.attention.w_q"].data_type == want and init["layers.0.mlp.w_out_t"].data_type == want
    assert init["layers.0.attention.w_q_scale"].data_type == TensorProto.FLOAT16
    assert init["lm_head.weight"].data_type == TensorProto.INT8  # the head: int8 whatever the blocks
    for sparsity in ("0.25", "0.5"):
        for native in ("on", "off"):
            capsys.readouterr()
            assert main(["parity", str(out), "--sparsity", sparsity, "--steps", "8", "--native", native]) in (0, None)
            report = capsys.readouterr().out
            assert "PASSED" in report and f"weights {fmt}: dense float64 logits vs the fp32 source" in report


def test_int8_activations_are_recorded_and_refused_where_fp32_runs(tiny_llama, tmp_path):
    """Quantized weights take int8 activations by default: the nodes say activation_bits 8 (the LM head
    too), the manifest says so, and the CUDA backend (fp32 activations) refuses the export in one line."""
    from shadowllm.runtime.cuda_backend import CudaBackend

    out = tmp_path / "int4"
    assert main(["export", str(tiny_llama), "--weights", "int4", "--out", str(out)]) in (0, None)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    bits = {n.op_type: {a.name: a.i for a in n.attribute}.get("activation_bits") for n in graph.node
            if n.domain == DOMAIN}
    assert bits == {"SparseHeadAttention": 8, "SparseNeuronMLP": 8, "BlockedMatMul": 8}
    assert not any(n.op_type == "Round" for n in graph.node)  # the ops round; the graph around them does not
    assert json.loads((out / "shadowllm.json").read_text())["weights"]["activations"] == "int8"
    with pytest.raises(ShadowError, match=r"round activations to int8 .* export with --activations fp32"):
        CudaBackend.from_export(out, 0.0, dtype="fp32", device="cpu")
    fp32 = tmp_path / "int4-fp32-activations"
    assert main(["export", str(tiny_llama), "--weights", "int4", "--activations", "fp32", "--out", str(fp32)]) in (0, None)
    graph = onnx.load(str(fp32 / "model.onnx"), load_external_data=False).graph
    assert not any(a.name == "activation_bits" for n in graph.node for a in n.attribute)


def test_bad_weights_and_unsupported_targets_are_one_line(tiny_llama, tmp_path, capsys):
    assert main(["export", str(tiny_llama), "--weights", "int3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--weights 'int3': expected one of fp32, int8, int4, gguf") and not (tmp_path / "x").exists()
    assert main(["export", str(tiny_llama), "--weights", "int4", "--activations", "int4", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--activations 'int4': expected one of fp32, int8")
    assert main(["export", str(tiny_llama), "--activations", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "--activations int8 applies to quantized weights" in capsys.readouterr().err and not (tmp_path / "x").exists()
    save_tiny("llama", tmp_path / "ragged")  # F = 80: not a whole number of blocks
    assert main(["export", str(tmp_path / "ragged"), "--weights", "int4", "--out", str(tmp_path / "y")]) == 2
    assert "not a multiple of the block (32)" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_eval_scores_the_quantized_values_and_counts_their_bytes(tiny_llama, tmp_path, capsys):
    """`eval --weights`: the rows name the format, the dense perplexity is the fake-quantized model's
    (not the fp32 one's), and bytes per token count the blocks at the format's rate plus an int8 head."""
    runs = {}
    for fmt in ("fp32", "int4"):
        out = tmp_path / f"eval-{fmt}"
        assert main(["eval", str(tiny_llama), "--method", "dense", "--weights", fmt, "--max-windows", "2",
                     "--window", "64", "--prompt", "32", "--lastword", "0", "--out", str(out)]) in (0, None)
        runs[fmt] = json.loads(out.with_suffix(".json").read_text())
    fp32, int4 = (runs[f]["rows"][0] for f in ("fp32", "int4"))
    assert (fp32["weights"], int4["weights"]) == ("fp32", "int4") and runs["int4"]["weights"] == "int4"
    assert fp32["ppl"] != int4["ppl"]  # a random model is off the grid: the int4 values are scored
    cfg = json.loads((tiny_llama / "config.json").read_text())
    D, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    E = D // cfg["num_attention_heads"]
    blocks = L * (2 * D * D + 2 * cfg["num_key_value_heads"] * E * D + 3 * D * F)
    assert fp32["bytes_per_token"] == int(4 * blocks + 4 * V * D)
    assert int4["bytes_per_token"] == int((0.5 + 4 / 32) * blocks + (1 + 2 / 32) * V * D)
    assert main(["eval", str(tiny_llama), "--weights", "int2", "--out", str(tmp_path / "x")]) == 2
    assert "--weights 'int2': expected one of fp32, int8, int4, gguf" in capsys.readouterr().err


@pytest.mark.parametrize("folded", (False, True))
def test_lm_head_is_quantized_tied_or_folded(folded):
    """The LM head as the exporter leaves it: MatMul(h, Transpose(table)) when the embedding is tied, or
    MatMul(h, constant [D, V]) when an untied head's transpose was folded (TinyLlama's shape): both
    become one BlockedMatMul over the int8 codes of W [V, D], and the float table leaves the graph."""
    import onnx_ir as ir

    from shadowllm.export.weights import quantize_lm_head

    rng = np.random.default_rng()
    V, D = 64, 96
    w = (rng.standard_normal((V, D)) * 0.1).astype(np.float32)
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, D])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, V])
    if folded:
        nodes, table = [helper.make_node("MatMul", ["h", "table"], ["logits"])], numpy_helper.from_array(w.T.copy(), "table")
    else:
        nodes = [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
                 helper.make_node("MatMul", ["h", "table_t"], ["logits"])]
        table = numpy_helper.from_array(w, "table")
    model = ir.serde.deserialize_model(helper.make_model(helper.make_graph(nodes, "head", [h], [logits], [table])))
    quantize_lm_head(model.graph)
    assert [n.op_type for n in model.graph] == ["BlockedMatMul"] and "table" not in model.graph.initializers
    codes = model.graph.initializers["lm_head.weight"].const_value.numpy()
    assert np.array_equal(codes, quantize(torch.from_numpy(w), "int8", 1).codes.numpy())
