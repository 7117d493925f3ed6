"""`shadowllm export`: trace model + masks into one model.onnx with the sparse custom ops.

The dynamo exporter traces `ExportModule`; a custom translation table turns the two torch ops into
`ai.shadowllm` nodes (with plugin_namespace / plugin_version for TensorRT's parser); then each node is
named after its layer (`layers.3.attention`, `layers.3.mlp`), the model-local function bodies of this
model's variant are attached (so stock onnxruntime runs it), and the folder of docs/design.md §4 is written:
model.onnx + model.onnx.data, config.json, tokenizer files, genai_config.json, shadowllm.json. It is
written to a temporary folder and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import onnxscript
import torch

from shadowllm.models import ShadowError, adapter_for, fingerprint
from shadowllm.models.quant import BLOCK, HEAD_FORMAT, check_format
from shadowllm.models.rotation import rotation_tensors, same_rotation

from .graph import POLICIES, THRESHOLDED, ExportModule
from .names import cache_names
from .weights import quantize_graph
from .onnx_ops import (ATTENTION_SCALES, DOMAIN, OPSET, PLUGIN_ATTRS, AttentionVariant, MLPVariant, attention_function,
                       blocked_matmul_function, family_attrs, layout_attrs, mlp_function, register_schemas)

MANIFEST = "shadowllm.json"
FORMAT = "shadowllm-export/1"
# Bumped whenever the exporter writes a different graph for the same model (4: `logits_to_keep`, the
# KV cache written in place); folders cached under it (demo, bench) are made again.
# 5: quantized projections (--weights int8|int4: codes + `<weight>_scale` / `_min` inputs); 6: q_norm / k_norm
# inputs, the sliding_window and qk_norm_eps attributes, partial rotary tables, post-norms (the newer families)
# 7: RMSNorm written as x / sqrt(mean(x^2) + eps) * w (onnxruntime fuses it: one node per norm, not seven), the
# mask outputs handed on whole, --weights gguf (the source file's own blocks; manifest weights.gguf)
REVISION = 7
_custom = onnxscript.values.Opset(domain=DOMAIN, version=1)


def _mlp_translation(x, w_in, b_in, w_gate, w_out_t, b_out, mask, t_x, t_h, activation: str, weight_layout: str):
    return _custom.SparseNeuronMLP(x, w_in, b_in, w_gate, w_out_t, b_out, mask, t_x, t_h, activation=activation,
                                   **layout_attrs(weight_layout), **PLUGIN_ATTRS)


def _attention_translation(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o_t, b_o, past_key, past_value, attention_mask,
                           position_ids, cos, sin, head_mask, t_x, t_o, q_norm, k_norm, num_heads: int,
                           num_kv_heads: int, head_dim: int, scale: float, rope: int, kv_policy: str,
                           weight_layout: str, sliding_window: int, qk_norm_eps: float):
    # q_norm / k_norm follow the eight scale / minimum slots, which quantize_graph fills (or not)
    norms = [None] * len(ATTENTION_SCALES) + [q_norm, k_norm] if q_norm is not None else []
    return _custom.SparseHeadAttention(
        x, w_q, b_q, w_k, b_k, w_v, b_v, w_o_t, b_o, past_key, past_value, attention_mask, position_ids, cos, sin,
        head_mask, t_x, t_o, *norms, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale,
        rope=rope, kv_policy=kv_policy, **layout_attrs(weight_layout),
        **family_attrs(sliding_window or None, qk_norm_eps if q_norm is not None else None), **PLUGIN_ATTRS)


LOGITS_TO_KEEP = "logits_to_keep"  # optional input (default 0 = every position), added after tracing


def io_names(num_layers: int):
    past, present = cache_names(num_layers)
    inputs = ["input_ids", "attention_mask", "position_ids", *past, "shadow_head_mask", "shadow_neuron_mask",
              "sparsity", LOGITS_TO_KEEP]
    outputs = ["logits", *present, "shadow_head_mask_out", "shadow_neuron_mask_out"]
    return inputs, outputs


def _example(arch, B=2, S=3, P=2):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch.vocab, (B, S), generator=g)
    mask = torch.ones(B, P + S, dtype=torch.long)
    pos = torch.arange(P, P + S).expand(B, S).contiguous()
    past = [torch.randn(B, arch.num_kv_heads, P, arch.head_dim, generator=g) for _ in range(2 * arch.num_layers)]
    heads = torch.ones(B, arch.num_layers, arch.num_heads, dtype=torch.bool)
    neurons = torch.ones(B, arch.num_layers, arch.ffn, dtype=torch.bool)
    return ids, mask, pos, past, heads, neurons, torch.tensor(0.0)


def _dynamic_shapes(num_layers):
    batch, seq, past, total = (torch.export.Dim(n, min=1, max=65536) for n in ("batch", "sequence", "past", "total"))
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
            [{0: batch, 2: past} for _ in range(2 * num_layers)], {0: batch}, {0: batch}, None)


def check_threshold_table(thresholds, num_layers: int):
    """(grid [R], table [R, L, 4]) as the threshold policies need them; one clear line otherwise."""
    from shadowllm.predictor.thresholds import GRID

    if thresholds is None:
        raise ShadowError("the threshold policies need a threshold table (from --thresholds, or the built-in calibration)")
    grid, table = thresholds
    if tuple(grid.shape) != (len(GRID),) or tuple(table.shape) != (len(GRID), num_layers, 4):
        raise ShadowError(f"threshold table of shape {tuple(table.shape)} (grid {tuple(grid.shape)}); this model "
                          f"needs [{len(GRID)}, {num_layers}, 4] (grid [{len(GRID)}]): calibrated on another model?")
    if not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
        raise ShadowError("threshold table holds negative or non-finite thresholds")
    return grid, table


def trace(model, policy: str = "dense", static_scores=None, target: str = "both", predictor=None,
          thresholds=None, head_sparsity: float = 0.0, weights: str = "fp32", blocks=None,
          activations: str = "fp32"):
    """The ONNX model for `model` under `policy`, as an onnx_ir Model whose initializers still point at
    the traced module's tensors (written out by `export` one at a time: no in-memory proto holding
    every weight a second time)."""
    if policy not in POLICIES:
        raise ShadowError(f"--policy {policy!r}: expected one of {', '.join(POLICIES)}")
    register_schemas()
    arch = adapter_for(model).arch
    if policy == "static" and static_scores is None:
        raise ShadowError("--policy static needs importance scores (from --traces, or the built-in calibration)")
    if policy in ("shadow", "dejavu", "shadow+threshold"):
        kind = policy.split("+")[0]
        if predictor is None:
            raise ShadowError(f"--policy {policy} needs a trained predictor (--predictor DIR from `shadowllm train`)")
        if predictor.kind != kind:
            raise ShadowError(f"--policy {policy} needs a {kind} predictor; --predictor holds a {predictor.kind} one")
    if policy in THRESHOLDED:
        thresholds = check_threshold_table(thresholds, arch.num_layers)
    module = ExportModule(model, policy, static_scores, target, predictor, thresholds, head_sparsity).eval()
    inputs, outputs = io_names(arch.num_layers)
    with torch.no_grad(), _one_line_errors():
        program = torch.onnx.export(
            module, _example(arch), dynamo=True, opset_version=OPSET, input_names=inputs[:-1], output_names=outputs,
            dynamic_shapes=_dynamic_shapes(arch.num_layers), verbose=False,
            custom_translation_table={torch.ops.shadowllm.sparse_neuron_mlp.default: _mlp_translation,
                                      torch.ops.shadowllm.sparse_head_attention.default: _attention_translation})
    import onnx_ir as ir

    ir_model = program.model
    _name_nodes(ir_model.graph)
    _add_logits_to_keep(ir_model.graph)
    w0 = adapter_for(model).attention(0)
    m0 = adapter_for(model).mlp(0)
    thresholded = policy in THRESHOLDED
    weight_bytes = quantize_graph(ir_model, weights, blocks, activations)
    for body in (mlp_function(MLPVariant(arch.activation, m0.w_gate is not None, m0.b_in is not None,
                                         m0.b_out is not None, thresholded, module.weight_layout, weights,
                                         activations)),
                 attention_function(AttentionVariant(arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.scale,
                                                     arch.rope, w0.b_q is not None, w0.b_o is not None,
                                                     "active" if module.granularity == "sequence" else "all",
                                                     thresholded, module.weight_layout, weights,
                                                     module.qk_norm_eps, arch.sliding_window is not None,
                                                     arch.rotary_dim, activations)),
                 *([blocked_matmul_function(HEAD_FORMAT, activations)] if weights != "fp32" else [])):
        function = ir.serde.deserialize_function(body)
        ir_model.functions[function.identifier()] = function
    ir_model._shadowllm_module = module  # the initializers' tensors live as long as the model
    ir_model._shadowllm_weight_bytes = weight_bytes
    return ir_model


class _one_line_errors:
    """The exporter's failure is a long report; the user gets its last line, the report stays on stderr."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is not None and not isinstance(err, (ShadowError, KeyboardInterrupt)):
            root = err
            while root.__cause__ is not None:  # the exporter wraps the real failure several times
                root = root.__cause__
            line = (str(root).strip().splitlines() or [type(root).__name__])[0]
            raise ShadowError(f"ONNX export failed: {type(root).__name__}: {line[:300]}") from err
        return False


# Where a node came from, as the dynamo exporter records it (module scopes, and the source line in
# ExportModule.forward it was traced from): the predictor's own modules, or turning its scores
# into masks.
_PREDICTOR_FRAMES = ("self.predictor", "keep_rows(", "_shadow_masks(", "self._targeted(")


def _is_predictor_node(node) -> bool:
    meta = node.metadata_props
    scopes = meta.get("pkg.torch.onnx.name_scopes", "")
    return "'predictor" in scopes or any(f in meta.get("pkg.torch.onnx.stack_trace", "") for f in _PREDICTOR_FRAMES)


def _name_nodes(graph):
    """Name each custom node after its layer, in graph order, for readable graphs (Netron), and prefix
    the predictor's nodes (and mask selection) with `predictor/`, so profiles can tell its share."""
    import onnx_ir as ir

    counts = {"SparseHeadAttention": 0, "SparseNeuronMLP": 0}

    def walk(graph):
        for node in graph:
            if node.domain == DOMAIN and node.op_type in counts:
                kind = "attention" if node.op_type == "SparseHeadAttention" else "mlp"
                node.name = f"layers.{counts[node.op_type]}.{kind}"
                counts[node.op_type] += 1
            elif _is_predictor_node(node) and not (node.name or "").startswith("predictor/"):
                node.name = f"predictor/{node.name}"
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    walk(attr.value)

    walk(graph)


def _add_logits_to_keep(graph):
    """The optional int64 scalar input `logits_to_keep` (transformers' name and meaning): k > 0 runs the
    LM head on the last k positions only, 0 (its default, an initializer of the same name) on all.
    Generation asks for 1 at prefill: a 2,000-token prompt otherwise computes and returns 2,000 rows of
    vocabulary logits (375 MB of fp32 on SmolLM2) to sample from the last. Added to the traced graph
    rather than to ExportModule, whose slice bound would be data-dependent for torch.export: the
    LM head's MatMul reads Slice(h, -k, end) (-0 = 0 keeps every row)."""
    import numpy as np
    import onnx_ir as ir

    logits = next(v for v in graph.outputs if v.name == "logits")
    head = logits.producer()
    if head is None or head.op_type != "MatMul":
        raise ShadowError(f"export: expected the LM head (a MatMul) to produce `logits`, found "
                          f"{head.op_type if head else 'a graph input'}")
    keep = ir.Value(name=LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]),
                    const_value=ir.tensor(np.array(0, dtype=np.int64), name=LOGITS_TO_KEEP))
    graph.inputs.append(keep)
    graph.register_initializer(keep)

    def const(name, values):
        return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(values, dtype=np.int64), name=name)},
                       outputs=[ir.Value(name=name)])

    end, axis = const("logits_to_keep/end", [np.iinfo(np.int64).max]), const("logits_to_keep/axis", [1])
    one = const("logits_to_keep/one", [1])
    neg = ir.node("Neg", [keep], outputs=[ir.Value(name="logits_to_keep/neg")])
    start = ir.node("Reshape", [neg.outputs[0], one.outputs[0]], outputs=[ir.Value(name="logits_to_keep/start")])
    rows = ir.node("Slice", [head.inputs[0], start.outputs[0], end.outputs[0], axis.outputs[0]],
                   outputs=[ir.Value(name="logits_to_keep/hidden")])
    graph.insert_before(head, [end, axis, one, neg, start, rows])
    head.replace_input_with(0, rows.outputs[0])
    if logits.shape is not None and len(logits.shape) == 3:  # no longer the input's sequence length
        logits.shape = ir.Shape([logits.shape[0], "logits_sequence", logits.shape[2]])


def predictor_fingerprint(predictor) -> str | None:
    if predictor is None:
        return None
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(predictor.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def genai_config(model, arch) -> dict:
    cfg = model.config
    _, outputs = io_names(arch.num_layers)
    return {
        "model": {
            "type": arch.model_type, "vocab_size": arch.vocab, "context_length": arch.max_positions,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "decoder": {
                "filename": "model.onnx", "hidden_size": arch.hidden, "num_hidden_layers": arch.num_layers,
                "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
                "head_size": arch.head_dim,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"max_length": arch.max_positions, "do_sample": False},
    }


def export(model, tokenizer, out: str | os.PathLike, policy: str = "dense", static_scores=None,
           static_source: dict | None = None, target: str = "both", predictor=None,
           predictor_dir: str | None = None, thresholds=None, threshold_source: dict | None = None,
           head_sparsity: float = 0.0, weights: str = "fp32") -> Path:
    """Write the export folder `out` (atomically). Returns its path.

    thresholds: (grid [R], table [R, L, 4]) for the threshold policies; threshold_source describes
    their calibration and allocation (recorded in the manifest). weights: the projections' format
    (models/quant.py); the model must already be on its grid (`fake_quantize_(model, weights)`, done
    before any calibration so that the policy is measured on the weights it runs with)."""
    from shadowllm.models.paths import check_out

    out = check_out(out, "--out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShadowError(f"--out {out}: " + ("folder exists and is not empty" if out.is_dir() else "is a file") +
                          "; choose a new folder")
    arch = adapter_for(model).arch
    print(f"[shadowllm] tracing {arch.model_type} ({arch.num_layers} layers) with policy {policy}", file=sys.stderr)
    if target not in ("heads", "neurons", "both"):
        raise ShadowError(f"--target {target!r}: expected heads, neurons or both")
    if policy == "shadow+threshold":
        target = "heads"  # the predictor picks heads; the runtime sparsity picks the threshold row
    # a rotated model (models/rotation.py: the calibration's bases folded into the weights) is exported as
    # itself; its manifest names the model it was rotated from, and the rotation rides with the table
    rotation = getattr(model, "_shadowllm_rotation", None)
    if rotation is not None and policy not in THRESHOLDED:
        raise ShadowError(f"--policy {policy}: a rotated model is exported only with a threshold policy")
    if policy in THRESHOLDED and not same_rotation(getattr(thresholds, "rotation", rotation), rotation):
        raise ShadowError("the threshold table was calibrated on the model " +
                          ("rotated into other bases; export Calibration.model_for(model), the rotated model"
                           if rotation is None else "in other bases than this rotated model's"))
    check_format(weights)
    on_grid = getattr(model, "_shadowllm_weights", "fp32")
    if weights != on_grid:
        raise ShadowError(f"--weights {weights}: the model's projections are {on_grid}; put them on the grid first "
                          f"(shadowllm.models.quant.fake_quantize_(model, {weights!r}))")
    blocks = getattr(model, "_shadowllm_gguf", None)  # --weights gguf: the file's own codes (models/gguf_blocks.py)
    activations = getattr(model, "_shadowllm_activations", "fp32")  # --activations int8: fake_quantize_ set it
    traced = trace(model, policy, static_scores, target, predictor, thresholds, head_sparsity, weights, blocks,
                   activations)
    from shadowllm.models.paths import atomic_folder

    with atomic_folder(out) as tmp:
        import onnx_ir as ir

        ir.save(traced, tmp / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=1024)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if policy == "static":  # kept beside the graph so parity can derive the masks independently
            from safetensors.torch import save_file
            save_file({"heads": static_scores[0].float().contiguous(), "neurons": static_scores[1].float().contiguous()},
                      str(tmp / "static_scores.safetensors"))
        if policy in THRESHOLDED:  # kept beside the graph so parity can derive the thresholds independently
            from safetensors.torch import save_file
            save_file({"grid": thresholds[0].float().contiguous(), "table": thresholds[1].float().contiguous(),
                       **rotation_tensors(rotation)}, str(tmp / "thresholds.safetensors"))
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(model, arch), indent=2) + "\n")
        inputs, outputs = io_names(arch.num_layers)
        manifest = {
            "format": FORMAT, "policy": policy,
            "granularity": predictor.granularity if predictor else None,
            "criterion": predictor.manifest["criterion"] if predictor else (static_source or {}).get("criterion"),
            "kv_policy": "active" if predictor is not None and predictor.granularity == "sequence" else "all",
            "allocation": "per_layer", "target": target,
            "model_fingerprint": getattr(model, "_shadowllm_source_fingerprint", None) or fingerprint(model),
            "model": getattr(model, "_shadowllm_source", None),
            "predictor": predictor_dir, "predictor_fingerprint": predictor_fingerprint(predictor),
            "static_source": static_source,
            "thresholds": None if policy not in THRESHOLDED else {
                **(threshold_source or {}), "grid": [round(float(v), 4) for v in thresholds[0]],
                "weight_layout": "channel_major", "inputs": ["attn_x", "attn_o", "mlp_x", "mlp_h"],
                "prefill": "dense (thresholds 0)",
                "rotation": None if rotation is None else [k for k, q in rotation.items() if q is not None]},
            "head_sparsity": head_sparsity if policy == "shadow+threshold" else None,
            "weights": {"format": weights, "block": BLOCK if weights != "fp32" else None,
                        "lm_head": HEAD_FORMAT if weights != "fp32" else "fp32",
                        "quantized_bytes": traced._shadowllm_weight_bytes or None, "activations": activations,
                        **({"gguf": blocks.gguf_types(), "gguf_file": blocks.path.name} if blocks else {})},
            "ops": {f"{DOMAIN}::SparseHeadAttention": 1, f"{DOMAIN}::SparseNeuronMLP": 1},
            "arch": {"family": arch.family, "layers": arch.num_layers, "hidden": arch.hidden, "heads": arch.num_heads,
                     "kv_heads": arch.num_kv_heads, "head_dim": arch.head_dim, "neurons": arch.ffn,
                     "vocab": arch.vocab, "max_positions": arch.max_positions},
            "inputs": inputs, "outputs": outputs, "parity": None,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
