"""Model-level parity of exports (tiny OPT and tiny Llama, dense and static policies) against HF
PyTorch and the sparse PyTorch reference, through Polygraphy; stock onnxruntime loads the files."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from shadowllm.export.exporter import export
from shadowllm.models import ShadowError, adapter_for, sparse_forward
from shadowllm.predictor.predictors import load_predictor
from shadowllm.predictor.traces import calibrate
from shadowllm.predictor.train import train
from shadowllm.models.tiny import build_model, byte_tokenizer
from shadowllm.predictor.allocation import keep_mask
from shadowllm.runtime import generate
from shadowllm.runtime.ort_backend import OrtBackend
from shadowllm.parity.check import check
from tests.hf_oracle import hf_logits


@pytest.fixture(scope="module", params=["opt", "llama"])
def exported(request, tmp_path_factory):
    model = build_model(request.param, seed=7)
    tok = byte_tokenizer()
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    a = adapter_for(model).arch
    g = torch.Generator().manual_seed(3)
    scores = (torch.rand(a.num_layers, a.num_heads, generator=g), torch.rand(a.num_layers, a.ffn, generator=g))
    dense = export(model, tok, root / "dense")
    static = export(model, tok, root / "static", "static", scores)
    return model, tok, dense, static, scores


@pytest.fixture(scope="module")
def predictor_exports(exported, tmp_path_factory):
    """shadow/sequence, shadow/token and dejavu exports from predictors trained on quick traces."""
    model, tok, _, _, _ = exported
    root = tmp_path_factory.mktemp("predictor-exports")
    calibrate(model, tok, root / "traces", ["l2_norm"], samples=8, window=40, token_positions=8, shard_size=8,
              progress=False)
    out = {}
    for kind, gran in (("shadow", "sequence"), ("shadow", "token"), ("dejavu", "token")):
        name = f"{kind}-{gran}"
        predictor = train(str(root / "traces"), kind, gran, criterion="l2_norm", epochs=4, progress=False)
        predictor.save(root / f"p-{name}")
        out[name] = export(model, tok, root / name, kind, predictor=load_predictor(root / f"p-{name}", model),
                           predictor_dir=str(root / f"p-{name}"))
    return out


def test_dense_export_matches_hf_through_prefill_and_decode(exported):
    model, tok, dense, _, _ = exported
    backend = OrtBackend(dense)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    logits, state = backend.forward(ids, mask, None)
    with torch.no_grad():
        ref, cache = hf_logits(model, ids, mask)
        assert (logits - ref)[mask.bool()].abs().max() <= 1e-4
        for _ in range(3):
            step = torch.randint(0, 256, (2, 1), generator=g)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits, state = backend.forward(step, mask, state)
            ref, cache = hf_logits(model, step, mask, cache)
            assert (logits - ref).abs().max() <= 1e-4


def test_dense_export_applies_fed_masks_like_the_reference(exported):
    model, _, dense, _, _ = exported
    backend = OrtBackend(dense)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    L, H, F = backend.layers, backend.heads, backend.neurons
    heads, neurons = torch.rand(2, L, H, generator=g) < 0.6, torch.rand(2, L, F, generator=g) < 0.6
    logits, state = backend.forward(ids, mask, backend.initial_state(2, heads.numpy(), neurons.numpy()))
    with torch.no_grad():
        ref, _ = sparse_forward(model, ids, heads, neurons, mask)
    assert (logits - ref).abs().max() <= 1e-4
    assert np.array_equal(state["heads"].numpy(), heads.numpy())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_static_masks_follow_runtime_sparsity(exported, sparsity):
    model, _, _, static, scores = exported
    backend = OrtBackend(static, sparsity)
    ids = torch.randint(0, 256, (1, 5))
    logits, state = backend.forward(ids, torch.ones(1, 5, dtype=torch.long), None)
    heads, neurons = keep_mask(scores[0], sparsity), keep_mask(scores[1], sparsity)
    assert np.array_equal(state["heads"].numpy()[0], heads.numpy())
    assert np.array_equal(state["neurons"].numpy()[0], neurons.numpy())
    with torch.no_grad():
        ref, _ = sparse_forward(model, ids, heads[None], neurons[None])
    assert (logits - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("which", ["dense", "static"])
def test_parity_report_polygraphy_and_32_greedy_tokens(exported, which):
    model, tok, dense, static, _ = exported
    report = check(dense if which == "dense" else static, model, tok, sparsity=0.5, steps=32)
    assert report.passed, report.table()
    assert report.greedy_tokens == 32 and report.polygraphy_passed


@pytest.mark.parametrize("name", ["shadow-sequence", "shadow-token", "dejavu-token"])
def test_predictor_policies_parity(exported, predictor_exports, name):
    """The predictor inside the graph (If at prefill, or every decode step) picks the very masks the
    PyTorch reference picks, and logits and 32 greedy tokens agree."""
    model, tok, _, _, _ = exported
    report = check(predictor_exports[name], model, tok, sparsity=0.5, steps=32)
    assert report.passed, report.table()
    backend = OrtBackend(predictor_exports[name], 0.5)
    ids = torch.randint(0, 256, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    _, state = backend.forward(ids, mask, None)
    prefill_dense = bool(state["neurons"].numpy().all())
    _, state = backend.forward(ids[:, :1], torch.ones(1, 7, dtype=torch.long), state)
    kept = state["neurons"].numpy()[0, 1:].mean()  # layers 1..: half of the neurons are off
    assert abs(kept - 0.5) < 0.05
    assert prefill_dense == (name != "shadow-sequence")  # sequence masks come at prefill, the others decode


def test_stock_onnxruntime_loads_the_files(exported):
    """Nothing but onnxruntime: a fresh interpreter that never imports shadowllm."""
    _, _, dense, static, _ = exported
    for folder in (dense, static):
        code = ("import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1]); "
                "assert 'shadowllm' not in sys.modules; print('ok')")
        out = subprocess.run([sys.executable, "-c", code, str(folder / "model.onnx")], capture_output=True, text=True)
        assert out.stdout.strip() == "ok", out.stderr


def test_graph_names_and_plugin_attributes(exported):
    import onnx

    from shadowllm.export.onnx_ops import register_schemas

    _, _, dense, static, _ = exported
    register_schemas()
    for folder in (dense, static):  # schemas + shape inference accept the custom nodes
        onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    proto = onnx.load(str(dense / "model.onnx"), load_external_data=False)
    custom = [n for n in proto.graph.node if n.domain == "ai.shadowllm"]
    assert [n.name for n in custom][:2] == ["layers.0.attention", "layers.0.mlp"]
    attrs = {a.name: a.s for a in custom[0].attribute if a.type == onnx.AttributeProto.STRING}
    assert attrs["plugin_namespace"] == b"shadowllm" and attrs["plugin_version"] == b"1"
    assert {f.name for f in proto.functions} == {"SparseHeadAttention", "SparseNeuronMLP"}
    names = [i.name for i in proto.graph.input]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert names[-4:] == ["shadow_head_mask", "shadow_neuron_mask", "sparsity", "logits_to_keep"]
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "logits_to_keep"}
    assert defaults["logits_to_keep"].shape == () and int(defaults["logits_to_keep"]) == 0  # every position


def test_bad_export_folders_and_inputs(exported, tmp_path):
    import shutil

    model, tok, dense, _, _ = exported
    with pytest.raises(ShadowError, match="no such export folder"):
        OrtBackend(tmp_path / "nothing")
    partial = tmp_path / "partial"
    shutil.copytree(dense, partial)
    (partial / "model.onnx.data").unlink()
    with pytest.raises(ShadowError, match="partial export folder, missing model.onnx.data"):
        OrtBackend(partial)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(dense, corrupt)
    (corrupt / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ShadowError, match="onnxruntime cannot load it"):
        OrtBackend(corrupt)
    with pytest.raises(ShadowError, match=r"sparsity must lie in \[0, 1\)"):
        OrtBackend(dense, sparsity=1.0)
    backend = OrtBackend(dense)
    with pytest.raises(ShadowError, match="token ids must lie in"):
        backend.forward(torch.tensor([[10**6]]), torch.ones(1, 1, dtype=torch.long), None)
    with pytest.raises(ShadowError, match="exceeds the model's 128 positions"):
        generate(backend, tok, "x" * 120, max_new_tokens=20)
    with pytest.raises(ShadowError, match="folder exists and is not empty"):
        export(model, tok, dense)
    with pytest.raises(ShadowError, match="another model"):
        check(dense, build_model("llama", seed=99), tok)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_native_library_gives_the_same_greedy_tokens(exported, predictor_exports, sparsity):
    """End to end: the C++ kernels and the function bodies agree token for token (and nearly in logits)."""
    _, tok, dense, static, _ = exported
    prompts = ["The history of", "A note on the"]
    for folder in (dense, static, predictor_exports["shadow-token"], predictor_exports["dejavu-token"]):
        native, bodies = OrtBackend(folder, sparsity, native=True), OrtBackend(folder, sparsity, native=False)
        assert native.native and not bodies.native
        a = generate(native, tok, prompts, 32, eos_ids=[])
        b = generate(bodies, tok, prompts, 32, eos_ids=[])
        assert [x.token_ids for x in a] == [y.token_ids for y in b], folder
        ids = torch.randint(0, 256, (2, 7))
        la, _ = native.forward(ids, torch.ones(2, 7, dtype=torch.long), None)
        lb, _ = bodies.forward(ids, torch.ones(2, 7, dtype=torch.long), None)
        assert (la - lb).abs().max() <= 1e-4


def test_mask_agreement_tolerates_only_score_ties():
    from shadowllm.parity.check import mask_agreement

    scores = torch.tensor([[[0.1, 0.5, 0.5000001, 0.9]]])  # [B=1, L=1, X=4]
    expect = np.array([[[False, True, False, True]]])
    swapped_tie = np.array([[[False, False, True, True]]])
    swapped_far = np.array([[[True, True, False, False]]])
    assert mask_agreement(expect, expect, scores) == (True, 0)
    assert mask_agreement(swapped_tie, expect, scores) == (True, 2)
    assert mask_agreement(swapped_far, expect, scores)[0] is False
    assert mask_agreement(swapped_tie, expect, None)[0] is False  # no scores (fixed masks): exact only


def test_build_ort_cpu_keeps_parity(exported, predictor_exports):
    from shadowllm.compiler.build import build

    model, tok, _, _, _ = exported
    out = build(predictor_exports["shadow-token"], "ort-cpu")
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    report = check(out, model, tok, sparsity=0.5, steps=16)
    assert report.passed and report.native, report.table()
    with pytest.raises(ShadowError, match="--fp16 applies to --target tensorrt"):
        build(predictor_exports["shadow-token"], "ort-cpu", fp16=True)


def _tensorrt_available() -> str | None:
    """None when an engine can be built here, else why not."""
    try:
        from shadowllm.compiler.tensorrt import requirements

        requirements()
    except ShadowError as e:
        return str(e)
    return None


def test_tensorrt_preparation_feeds_the_plugins_what_they_expect(exported, predictor_exports):
    """The model TensorRT's parser gets: no empty inputs on custom nodes, `optional_inputs` naming the
    optional slots present (the bit order of the plugins' InputMap), no function bodies to inline."""
    import onnx

    from shadowllm.compiler.tensorrt import CONTRACT, MASK_SLOT, OPTIONAL, prepare_model
    from shadowllm.export.onnx_ops import DOMAIN, SCALES, THRESHOLDS

    for folder in (exported[2], predictor_exports["shadow-token"]):
        original = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        prepared = prepare_model(original)
        assert len(prepared.functions) == 0 and len(original.functions) == 2
        custom = list(zip([n for n in original.graph.node if n.domain == DOMAIN],
                          [n for n in prepared.graph.node if n.domain == DOMAIN]))
        assert custom and all(a.name == b.name for a, b in custom)
        # bool masks reach the plugins as int32 (TensorRT hands plugins no bool tensors), each cast once,
        # before its first consumer
        casts = {n.output[0]: n for n in prepared.graph.node if n.op_type == "Cast"}
        produced = set(i.name for i in prepared.graph.input) | set(i.name for i in prepared.graph.initializer)
        for n in prepared.graph.node:
            assert all(i in produced for i in n.input if i), f"{n.name} reads a tensor made later"
            produced.update(n.output)
        for before, after in custom:
            slots = CONTRACT[before.op_type]
            named = dict(zip(slots, list(before.input) + [""] * (len(slots) - len(before.input))))
            mask = MASK_SLOT[before.op_type]
            cast = casts[after.input[[s for s in slots if named[s]].index(mask)]]
            assert list(cast.input) == [named[mask]]
            assert next(a.i for a in cast.attribute if a.name == "to") == onnx.TensorProto.INT32
            named[mask] = cast.output[0]
            bits = next(x.i for x in after.attribute if x.name == "optional_inputs")
            assert list(after.input) == [named[s] for s in slots if named[s]]
            assert bits == sum(1 << i for i, s in enumerate(OPTIONAL[before.op_type]) if named[s])
            # thresholds and weight scales are optional too (absent here; the TensorRT preparation refuses
            # nodes that have them)
            required = [s for s in slots if s not in OPTIONAL[before.op_type] and s not in THRESHOLDS | SCALES]
            assert all(named[s] for s in required)


def test_build_tensorrt_names_what_is_missing(exported):
    missing = _tensorrt_available()
    if missing is None:
        pytest.skip("TensorRT and a GPU are present: test_tensorrt_engine_matches_onnxruntime builds for real")
    with pytest.raises(ShadowError, match="--target tensorrt: ") as err:
        from shadowllm.compiler.build import build

        build(exported[2], "tensorrt")
    assert str(err.value) == missing
    assert not (exported[2] / "tensorrt").exists()


@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_engine_matches_onnxruntime(exported, fp16):
    missing = _tensorrt_available()
    if missing is not None:
        pytest.skip(f"TensorRT engines cannot be built here: {missing}")
    from shadowllm.compiler.build import build
    from shadowllm.parity.check import check_tensorrt

    model, tok, _, static, _ = exported
    build(static, "tensorrt", fp16=fp16)
    report = check_tensorrt(static, tok, sparsity=0.5, steps=16)
    assert report.passed, report.table()


def test_bench_measures_every_cell(exported, tmp_path):
    """The benchmark end to end on a tiny model (speeds are measured and reported, never asserted)."""
    import json

    from shadowllm.bench.run import Plan, bench_model
    from shadowllm.bench.report import write

    model, tok, _, _, _ = exported
    plan = Plan(models=("tiny",), tokens=4, repeats=2, prompt_tokens=8,
                native_grid=((0.0, 0.0), (0.5, 0.5), (0.5, 0.75)), threshold_grid=(0.5,))
    rows = bench_model("tiny", plan, lambda: 20e9, model=model, tokenizer=tok, root=tmp_path / "cache")
    assert [(r.backend, r.policy, r.head_sparsity, r.neuron_sparsity, r.sparsity) for r in rows] == [
        ("hf-eager", "dense", 0, 0, None), ("ort-dense", "dense", 0, 0, None), ("ort-function", "random", 0.5, 0.5, None),
        ("ort-native", "dense", 0, 0, None), ("ort-native", "random", 0.5, 0.5, None),
        ("ort-native", "random", 0.5, 0.75, None), ("ort-native", "threshold", 0, 0, 0.5)]
    # the threshold cell's bound counts the entries its tokens kept: about half of the block weights
    assert rows[6].bytes_per_token < rows[3].bytes_per_token
    assert all(r.decode_tok_s > 0 and r.prefill_ms > 0 and r.peak_rss_mb > 0 and r.bound_tok_s > 0 for r in rows)
    assert all(r.repeats == 2 and r.decode_spread >= 0 for r in rows)  # one row per cell, its rounds aggregated
    shares = rows[4].decode_op_shares  # the profiled 50% cell: the custom ops show up by name
    assert {"SparseHeadAttention", "SparseNeuronMLP"} <= set(shares) and all(0 <= v <= 1 for v in shares.values())
    dense, sparse = rows[3], rows[5]
    assert sparse.bytes_per_token < dense.bytes_per_token == rows[1].bytes_per_token == rows[2].bytes_per_token
    assert all(abs(r.bound_tok_s - 20e9 / r.bytes_per_token) < 0.01 for r in rows)
    write(rows, {"bandwidth_gb_s": 20.0, "bandwidth_range_gb_s": [20.0, 20.0], "bandwidth_readings": 10, "threads": 2,
                 "notes": ["tensorrt cells not run: test"]}, tmp_path / "bench",
          "shadowllm bench ...")
    data = json.loads((tmp_path / "bench.json").read_text())
    required = {"model", "backend", "policy", "head_sparsity", "neuron_sparsity", "decode_tok_s", "prefill_ms",
                "bound_tok_s", "peak_rss_mb"}
    assert all(required <= set(row) for row in data["rows"])
    assert "vs ort-dense" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_decode_bytes_counts_kept_rows():
    from shadowllm.bench.bound import decode_bytes

    arch = dict(layers=2, heads=4, kv_heads=2, head_dim=8, neurons=10, hidden=32, vocab=50, gated=True)
    heads = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], bool)  # both layers read kv head 0 only under "active"
    neurons = np.zeros((2, 10), bool)
    neurons[0, :3] = True
    weights = lambda rows: 4 * (rows * 32 + 50 * 32 + 32)  # noqa: E731  rows + LM head + one embedding row
    assert decode_bytes(arch, heads, neurons) == weights(2 * 3 * 8 + 2 * 4 * 8 + 3 * 3)
    assert decode_bytes(arch, heads, neurons, kv_policy="active") == weights(2 * 3 * 8 + 2 * 2 * 8 + 3 * 3)
    assert decode_bytes(arch, context=5) == weights(2 * 8 * 8 + 2 * 4 * 8 + 3 * 20) + 4 * 2 * 2 * 2 * 5 * 8


@pytest.mark.parametrize("name", ["shadow-sequence", "dejavu-token"])
def test_predictor_share_from_the_profiler(predictor_exports, name):
    """The exporter names predictor nodes `predictor/...`; the profiler's share is a fraction, and a
    per-sequence predictor costs nothing in decode (its If takes the carry branch)."""
    import onnx

    from shadowllm.bench.run import profile

    folder = predictor_exports[name]
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)

    def names(graph):
        for node in graph.node:
            yield node.name
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from names(attr.g)
    assert any(n.startswith("predictor/") for n in names(model.graph))
    shares = profile(folder, 0.5, torch.randint(0, 250, (1, 12)), 4, None)
    prefill, decode = shares["predictor_prefill"], shares["predictor_decode"]
    assert 0.0 < prefill < 1.0
    assert decode == 0.0 if name == "shadow-sequence" else 0.0 < decode < 1.0
    assert not list(folder.glob(".bench-profile*"))  # the trace is read and removed


@pytest.mark.parametrize("max_tokens", [16, 128, 2048])
def test_tensorrt_profile_is_one_consistent_call_at_kopt(max_tokens):
    """TensorRT times the plugins at the kOPT shapes of every input together: there the attention mask
    must be exactly past + new long (it was 128 with past 128 + new 128: read past its end), every
    kOPT dim within [min, max], and max_tokens below the opt context still a valid profile."""
    from shadowllm.compiler.tensorrt import _profile_shapes

    arch = {"max_positions": 8192, "kv_heads": 3, "head_dim": 64, "layers": 4, "heads": 9, "neurons": 32}
    names = ["input_ids", "position_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value",
             "shadow_head_mask", "shadow_neuron_mask"]
    shapes = {n: _profile_shapes(n, arch, 4, max_tokens, 128) for n in names}
    for lo, opt, hi in shapes.values():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    new, mask, past = shapes["input_ids"][1][1], shapes["attention_mask"][1][1], shapes["past_key_values.0.key"][1][2]
    assert mask == past + new and shapes["position_ids"][1] == shapes["input_ids"][1]
    assert shapes["attention_mask"][2][1] == shapes["past_key_values.0.key"][2][2] + 1  # T = (T - 1) + 1


def test_bench_peer_matmulnbits_is_onnxruntime_int4_of_our_dense_export(exported, tmp_path):
    """The `ort-matmulnbits` peer of `shadowllm bench`: our dense export with its bodies inlined, every
    projection and the LM head as onnxruntime's own MatMulNBits (4 bits, blocks of 32, int8 activations),
    run by the same backend; its logits are the dense model's to 4-bit rounding. A missing llama.cpp is
    a row saying why."""
    import onnx

    from shadowllm.bench.peers import MATMULNBITS_ACCURACY, llama_cpp_missing, matmulnbits_bytes, matmulnbits_folder
    from shadowllm.bench.report import markdown
    from shadowllm.bench.run import Plan, _missing_peer_rows

    model, tok, dense, _, _ = exported
    folder = matmulnbits_folder(dense, tmp_path / "mnb")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert quantized and not [n for n in graph.node if n.domain == "ai.shadowllm"]
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == MATMULNBITS_ACCURACY for n in quantized)
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in graph.initializer}]
    assert 0 < matmulnbits_bytes(folder) < matmulnbits_bytes(dense)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    reference = OrtBackend(dense, native=False).forward(ids, mask, None)[0]
    # the plain-ONNX graph the quantizer starts from (bodies inlined, weights folded) is the export itself
    plain = OrtBackend(matmulnbits_folder(dense, tmp_path / "plain", quantize=False), native=False)
    assert torch.allclose(plain.forward(ids, mask, None)[0], reference, atol=1e-4, rtol=1e-4)
    ours = OrtBackend(folder, native=False).forward(ids, mask, None)[0]
    assert torch.isfinite(ours).all()
    # 4-bit weights (random, std 0.15: ~12% rounding error per weight) and int8 activations through 3 layers
    assert float((ours - reference).norm() / reference.norm()) < 0.6
    rows = _missing_peer_rows("smollm2-135m", Plan())
    if llama_cpp_missing() is None:
        assert rows == []
    else:
        assert [r.weights for r in rows] == ["Q4_1", "Q8_0", "F32"] and all("not installed" in r.note for r in rows)
        assert "not run: llama-cpp-python is not installed" in markdown(rows, {"bandwidth_gb_s": 1, "threads": 2},
                                                                        "shadowllm bench")
