"""`shadowllm parity`: an export folder against the PyTorch references, output by output, token by token.

Comparisons go through Polygraphy: the ONNX model runs in an `OnnxrtRunner`, the PyTorch reference's
outputs (HF semantics through the sparse reference forward, given the same masks) are a golden
`RunResults`, and `Comparator.compare_accuracy` checks every output against the tolerance. The same
check takes a TensorRT runner where TensorRT exists. Then greedy decoding runs on both backends,
step by step: tokens identical, masks identical (up to score ties), logits within tolerance.

The golden outputs come from the reference run in float64 (softmax and RMSNorm in fp32, as HF
computes them; everything else float64). The tolerance is 1e-4, or twice PyTorch fp32's own distance from float64 on the same
inputs when that is larger: with half of the heads and neurons of every layer switched off, fp32
rounding alone moves a real model's logits by more than 1e-4 (any implementation, PyTorch
included), so a fixed 1e-4 would judge summation order, not correctness. Both numbers are in the
report.

Prefill logits get that tolerance per position, scaled by the magnitude of what the position's
logits were computed from: the largest |residual stream| entry it reaches over the layers (float64).
A Llama model's first token (the attention sink) carries residual entries tens of times larger than
the others', and every fp32 implementation's rounding there is larger, but by a few times, not tens
(the measurements: docs/parity.md). A single tolerance set by the largest fp32 error fails the sink
by chance of summation order; one linear in the magnitude would allow the sink far more error than
it shows. The tolerance grows with the square root of the magnitude: fp32's largest error over
sqrt(magnitude), x FP32_FACTOR, times each position's sqrt(magnitude), at least ATOL.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from shadowllm.models import ShadowError, adapter_for, fingerprint

from shadowllm.compiler.native import session_options
from shadowllm.export.folder import check_export_folder, weights_format
from shadowllm.runtime.policy import export_model, export_policy
from shadowllm.runtime.memory import release_memory
from shadowllm.runtime.ort_backend import OrtBackend
from shadowllm.runtime.torch_backend import TorchBackend

ATOL = 1e-4
TIE = 1e-5
OP_TOL = 1e-4  # threshold policies, per op and decode step: |y - reference| over the token's RMS of reference
KEPT_TIE = 1e-5  # an internal entry within this (x that input's largest magnitude) of its threshold is a tie
# ... and within this, a tie the float64 reference's own decode (whose inputs drift from the graph's by
# rounding over the layers) may decide differently: a step with one may differ beyond tolerance
NEAR_TIE = 1e-4
FP32_FACTOR = 2.0
# Exports with int8 activations (--activations int8): rounding to the grid is discontinuous; an entry
# whose fp32 value lies within rounding error of a boundary rounds either way, and PyTorch fp32 and the
# graph each flip their own entries (summation orders differ), whose effects then spread through the
# layers. Their distances from float64 are sums of such flips, alike in size, not in sign: twice fails
# by chance (a tiny random Llama: 1.01x PyTorch's distance on one decode step), four times does not.
# The op-level tests hold each op to a float64 reference with each boundary case's effect bounded
# (tests/parity/test_quantized.py).
GRID_FACTOR = 4.0


def _factor(manifest: dict) -> float:
    return GRID_FACTOR if (manifest.get("weights") or {}).get("activations", "fp32") != "fp32" else FP32_FACTOR


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    passed: bool


def mask_agreement(got: np.ndarray, expect: np.ndarray, scores) -> tuple[bool, int]:
    """(agree, flips). Masks agree when identical, or when every unit they disagree on sits at a score
    tie: within a row and layer, the disagreeing units' reference scores differ by <= TIE x the row's
    scale. Predictor scores are fp32 in two runtimes, and which of two equal-to-1e-5 scores a top-k
    keeps is rounding; such swaps are counted and reported, never ignored silently."""
    bad = got != expect
    flips = int(bad.sum())
    if not flips:
        return True, 0
    if scores is None:
        return False, flips
    s = scores.numpy() if hasattr(scores, "numpy") else np.asarray(scores)
    for b, layer in {(int(b), int(l)) for b, l, _ in np.argwhere(bad)}:
        row = s[b, layer][np.isfinite(s[b, layer])]
        units = s[b, layer][bad[b, layer]]
        if units.max() - units.min() > TIE * max(float(np.abs(row).max()) if row.size else 0.0, 1e-30):
            return False, flips
    return True, flips


@dataclass
class ParityReport:
    folder: str
    policy: str
    sparsity: float
    outputs: list = field(default_factory=list)
    masks_identical: bool = True
    mask_flips_at_ties: int = 0
    tolerance: float = ATOL
    fp32_reference_error: float = 0.0
    logits_tolerance: tuple = (ATOL, ATOL)  # prefill logits: the per-position tolerance's (min, max)
    greedy_tokens: int = 0
    native: bool = False
    tokens_identical: bool = True
    polygraphy_passed: bool = True
    against: str = "pytorch"
    threshold_ops_checked: int = 0  # threshold policies: op calls checked against the reference at decode steps
    threshold_ops_match: bool = True
    threshold_ties: int = 0  # entries of h / the context that fp32 and float64 kept differently at a tie
    tie_steps: int = 0  # decode steps whose logits a near-tie (NEAR_TIE) moved beyond tolerance
    token_mismatch_steps: list = field(default_factory=list)  # CUDA backend: decode steps whose token differed
    # quantized exports: (format, max |dense logits - the fp32 source's|, relative): what the weight
    # format changes in the model, reported apart from parity (which compares like with like)
    quantization: tuple | None = None

    @property
    def passed(self) -> bool:
        return (all(o.passed for o in self.outputs) and self.masks_identical and self.tokens_identical
                and self.polygraphy_passed and self.threshold_ops_match)

    def table(self) -> str:
        if self.against.startswith("cuda"):
            return self._cuda_table()
        kernels = "native kernels" if self.native else "function bodies"
        versus = "TensorRT engine vs onnxruntime" if self.against == "tensorrt" else "vs PyTorch reference"
        lines = [f"parity of {self.folder} (policy {self.policy}, sparsity {self.sparsity}, onnxruntime with "
                 f"{kernels}) {versus}",
                 f"{'output':<28}{'max abs':>12}{'max rel':>12}  result"]
        for o in self.outputs:
            lines.append(f"{o.name:<28}{o.max_abs:>12.3e}{o.max_rel:>12.3e}  {'pass' if o.passed else 'FAIL'}")
        ties = f" ({self.mask_flips_at_ties} swaps at score ties)" if self.mask_flips_at_ties else ""
        lines.append(f"{'masks identical' + ties:<52}  {'pass' if self.masks_identical else 'FAIL'}")
        if self.threshold_ops_checked:
            ties = f", {self.threshold_ties} entries at ties" if self.threshold_ties else ""
            lines.append(f"{f'thresholded ops ({self.threshold_ops_checked:,} op calls{ties})':<52}  "
                         f"{'pass' if self.threshold_ops_match else 'FAIL'}")
            if self.tie_steps:
                lines.append(f"decode steps whose logits a tie moved past tolerance: {self.tie_steps} (reported, "
                             "not compared)")
        lines.append(f"{f'greedy tokens ({self.greedy_tokens})':<52}  {'pass' if self.tokens_identical else 'FAIL'}")
        if self.quantization:
            fmt, max_abs, max_rel = self.quantization
            lines.append(f"weights {fmt}: dense float64 logits vs the fp32 source: max abs {max_abs:.3e}, max rel "
                         f"{max_rel:.3e} (the format's own error: reported, not compared)")
        comparator = ("polygraphy comparator (atol %.1e)" % self.tolerance if self.against == "tensorrt"
                      else "polygraphy comparator (each output / its tolerance)")
        lines.append(f"{comparator:<52}  {'pass' if self.polygraphy_passed else 'FAIL'}")
        if self.against == "pytorch":
            lines.append(f"golden: float64 reference; PyTorch fp32 is {self.fp32_reference_error:.1e} from it; "
                         f"tolerance {self.tolerance:.1e} (prefill logits: {self.logits_tolerance[0]:.1e} to "
                         f"{self.logits_tolerance[1]:.1e} by position, from each position's residual magnitude)")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


    def _cuda_table(self) -> str:
        dtype = self.against.split("-", 1)[1]
        lines = [f"parity of {self.folder} (policy {self.policy}, sparsity {self.sparsity}) on the CUDA backend "
                 f"({dtype}) vs PyTorch reference", f"{'output':<28}{'max abs':>12}{'max rel':>12}  result"]
        lines += [f"{o.name:<28}{o.max_abs:>12.3e}{o.max_rel:>12.3e}  {'pass' if o.passed else 'FAIL'}"
                  for o in self.outputs]
        differ = (f"; differ at steps {self.token_mismatch_steps}" if self.token_mismatch_steps else "; identical")
        verdict = ("pass" if self.tokens_identical else "FAIL") if dtype == "fp32" else "reported"
        lines.append(f"{f'greedy tokens ({self.greedy_tokens}{differ})':<52}  {verdict}")
        lines.append(f"golden: float64 reference; PyTorch fp32 is {self.fp32_reference_error:.1e} from it; tolerance "
                     f"{self.tolerance:.1e} (prefill logits: {self.logits_tolerance[0]:.1e} to "
                     f"{self.logits_tolerance[1]:.1e} by position{'' if dtype == 'fp32' else ', scaled to ' + dtype})")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _logit_tolerance(model64, ids, mask, logits32, logits64, factor: float = FP32_FACTOR) -> torch.Tensor:
    """[B, S]: each position's prefill-logit tolerance (module docstring). The magnitude comes from a
    dense float64 pass (masks change it by a small factor, not its order)."""
    from shadowllm.models import sparse_forward

    scale = torch.zeros(ids.shape, dtype=torch.float64)

    def observe(layer, name, t):
        if name == "residual":
            scale.copy_(torch.maximum(scale, t.detach().abs().amax(-1).double()))
        return None

    with torch.inference_mode():
        sparse_forward(model64, ids, attention_mask=mask, observer=observe)
    scale = scale.clamp(min=1e-30).sqrt()
    valid = mask.bool()
    ratio = float(((logits32.double() - logits64).abs().amax(-1) / scale)[valid].max())
    return (factor * ratio * scale).clamp(min=ATOL)


def _dense_logits64(model, ids, mask) -> torch.Tensor:
    """Dense float64 logits of `model`."""
    from shadowllm.models import sparse_forward

    with torch.inference_mode():
        logits, _ = sparse_forward(_float64(model), ids, attention_mask=mask)
    return logits


def _source_check(want, rotated, ids, mask, tolerance) -> OutputCheck:
    """The rotated model (models/rotation.py) computes its source's function: dense float64 logits of
    both (`want`: the source's), each position within its logit tolerance. (For a quantized model the
    same distance is the weight format's error, reported rather than compared.)"""
    from shadowllm.models import sparse_forward

    with torch.inference_mode():
        got, _ = sparse_forward(_float64(rotated), ids, attention_mask=mask)
    valid = mask.bool()
    per_position = (got - want).abs().amax(-1)[valid]
    max_abs = float(per_position.max())
    return OutputCheck("logits: rotated vs source", max_abs, max_abs / float(want[valid].abs().max()),
                       bool((per_position <= tolerance[valid]).all()))


def reference_backend(folder: Path, manifest: dict, model, sparsity: float) -> TorchBackend:
    """The PyTorch reference of an export: the sparse reference forward driven like the graph (a dense
    export is fed random masks, the same on both sides)."""
    return TorchBackend(model, **export_policy(folder, manifest, model, sparsity, dense_masks="random"))


class _Float64:
    """`model` computed in float64, the exact golden: everything the reference reads goes through its
    adapter, here a view that hands out each weight converted to float64 as it is read (exact: the
    weights are fp32), so no float64 copy of the model (twice its size) is ever held. Other attributes
    (fingerprint, rotation, config) are the model's."""

    def __init__(self, model):
        self._model = model
        self._shadowllm_adapter = adapter_for(model).in_dtype(torch.float64)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _float64(model) -> _Float64:
    return _Float64(model)


def _masks_numpy(masks, batch, a):
    heads, neurons = masks
    if heads is None:
        heads = torch.ones(batch, a["layers"], a["heads"], dtype=torch.bool)
    if neurons is None:
        neurons = torch.ones(batch, a["layers"], a["neurons"], dtype=torch.bool)
    return heads.numpy(), neurons.numpy()


def _past_of(state):
    return state[0] if isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], torch.Tensor) else state


def check(folder: str | os.PathLike, model, tokenizer, sparsity: float = 0.5, steps: int = 32,
          seed: int = 0, golden_path: str | os.PathLike | None = None, native: bool | None = None) -> ParityReport:
    """Prefill through Polygraphy + `steps` greedy decode steps; `golden_path` saves the PyTorch
    RunResults (Polygraphy JSON) so the same comparison can be rerun against another runner."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import CompareFunc, Comparator, RunResults
    from polygraphy.logger import G_LOGGER

    folder = Path(folder)
    manifest = check_export_folder(folder)
    if manifest["model_fingerprint"] != fingerprint(model):
        raise ShadowError(f"{folder} was exported from another model (fingerprint {manifest['model_fingerprint']}, "
                          f"this model {fingerprint(model)}); pass the right one with --model")
    a = manifest["arch"]
    report = ParityReport(str(folder), manifest["policy"], sparsity)
    source, model = model, export_model(folder, manifest, model)  # the model the graph computes (rotated?)
    g = torch.Generator().manual_seed(seed)
    B, S = 2, 12
    ids = torch.randint(0, a["vocab"], (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0  # left padding on the second row
    # the source's float64 logits, for the rotation / quantization check below
    source_logits = _dense_logits64(source, ids, mask) if model is not source else None
    reference = reference_backend(folder, manifest, model, sparsity)  # fp32: its own error sets the tolerance
    exact = reference_backend(folder, manifest, _float64(model), sparsity)  # the golden

    # 1. prefill, output by output, through Polygraphy
    heads, neurons = _masks_numpy((reference._rows(reference.head_mask, B), reference._rows(reference.neuron_mask, B)),
                                  B, a)  # the fixed masks of dense / static (all kept for predictor policies)
    predicted = manifest["policy"] in ("shadow", "dejavu", "shadow+threshold")
    fed_heads, fed_neurons = (heads, neurons) if manifest["policy"] == "dense" else (np.ones_like(heads),
                                                                                       np.ones_like(neurons))
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).numpy(), "shadow_head_mask": fed_heads,
             "shadow_neuron_mask": fed_neurons, "sparsity": np.array(sparsity, dtype=np.float32)}
    for i in range(a["layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((B, a["kv_heads"], 0, a["head_dim"]), np.float32)
    G_LOGGER.module_severity = G_LOGGER.ERROR  # our table reports per output; keep Polygraphy's log short
    options, report.native = session_options(native)
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    runner = OnnxrtRunner(session, name="onnxruntime")
    results = Comparator.run([runner], data_loader=[feeds])
    ours = results[0][1][0]
    # A predictor picks masks in both runtimes; the reference computes with the graph's masks (so that
    # logits compare like with like) and its own picks are checked against them separately.
    if predicted:
        reference.force = exact.force = (ours["shadow_head_mask_out"], ours["shadow_neuron_mask_out"])
    logits32, _ = reference.forward(ids, mask, None)
    mask_heads, mask_neurons = _masks_numpy(reference.last_masks, B, a)
    logits, state = exact.forward(ids, mask, None)
    valid = mask.bool().numpy()
    report.fp32_reference_error = float((logits32.double() - logits)[mask.bool()].abs().max())
    report.tolerance = max(ATOL, _factor(manifest) * report.fp32_reference_error)
    logit_tolerance = _logit_tolerance(_float64(model), ids, mask, logits32, logits, _factor(manifest))  # [B, S]
    report.logits_tolerance = (float(logit_tolerance[mask.bool()].min()), float(logit_tolerance[mask.bool()].max()))
    weights = weights_format(manifest)
    if weights != "fp32":
        check = _source_check(source_logits, model, ids, mask, logit_tolerance)
        report.quantization = (weights, check.max_abs, check.max_rel)
    elif model is not source:
        report.outputs.append(_source_check(source_logits, model, ids, mask, logit_tolerance))
    for name, expect, scores in (("shadow_head_mask_out", mask_heads, reference.last_scores[0]),
                                 ("shadow_neuron_mask_out", mask_neurons, reference.last_scores[1])):
        same, flips = mask_agreement(ours[name], expect, scores)
        report.masks_identical &= same
        report.mask_flips_at_ties += flips if same else 0
        report.outputs.append(OutputCheck(name, float(flips), 0.0, same))
    golden = {"logits": logits.float().numpy()}
    for i, (k, v) in enumerate(_past_of(state)):
        golden[f"present.{i}.key"], golden[f"present.{i}.value"] = k.float().numpy(), v.float().numpy()
    golden_results = RunResults()
    golden_results.add([golden], runner_name="pytorch-reference")  # masks: checked above, up to ties
    if golden_path:
        golden_results.save(str(golden_path))
    results.extend(golden_results)
    for name, expect in golden.items():
        diff = np.abs(ours[name] - expect)
        if name == "logits":  # per position; padded positions' logits are not used by anyone
            per_position = diff.max(-1)[valid]
            passed = bool((per_position <= logit_tolerance.numpy()[valid]).all())
            diff = diff[valid]
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = max_abs / max(float(np.abs(expect).max()), 1e-30)
        report.outputs.append(OutputCheck(name, max_abs, max_rel, passed if name == "logits"
                                          else max_abs <= report.tolerance))
    # Polygraphy's own verdict on the same pair, the logits divided by their positions' tolerance
    # (so that its single atol, 1, is each position's own). Logits at padded positions belong to no
    # one (their queries see no key), so both sides keep only the real positions.
    per_position = logit_tolerance.numpy()[valid][:, None]
    for runner_results in (results[0][1], results[1][1]):
        outputs = runner_results[0]
        outputs["logits"] = outputs["logits"][valid] / per_position
        for key in [k for k in outputs.keys() if k.startswith("present.")]:
            outputs[key] = outputs[key] / report.tolerance
    report.polygraphy_passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(
        atol=1.0, rtol=0.0)))
    del runner, session, results
    release_memory()  # the prefill's session, before the decode's opens

    # 2. greedy decoding step by step on both backends: tokens, masks and last-position logits (and, with
    # thresholds, the kept entries of every op's input x)
    thresholded = reference.thresholds is not None
    onnx_backend = OrtBackend(folder, sparsity, native=report.native, probe=thresholded)
    from shadowllm.runtime.generate import encode_batch

    ids, mask = encode_batch(tokenizer, ["The history of the city", "A short note"],
                             tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    B = ids.shape[0]
    if manifest["policy"] == "dense":  # feed the reference's (row-shared) masks
        start = onnx_backend.initial_state(B, np.repeat(heads[:1], B, 0), np.repeat(neurons[:1], B, 0))
    else:
        start = onnx_backend.initial_state(B)
    o_logits, o_state = onnx_backend.forward(ids, mask, start)
    if predicted:
        reference.force = exact.force = (o_state["heads"].numpy(), o_state["neurons"].numpy())
    t_logits, t_state = reference.forward(ids, mask, None)
    e_logits, e_state = exact.forward(ids, mask, None)
    decode_diff, decode_tol = 0.0, report.tolerance
    tie_step = False  # the step just compared had an entry of h / the context decided at a tie
    for _ in range(steps):
        o_next, t_next = o_logits[:, -1].argmax(-1), e_logits[:, -1].argmax(-1)
        step_diff = float((o_logits[:, -1].double() - e_logits[:, -1]).abs().max())
        # thresholds: each step on its own (a tie's effect must not widen the bound of later steps)
        torch_step = _factor(manifest) * float((t_logits[:, -1].double() - e_logits[:, -1]).abs().max())
        # (with the int8 activation grid a thresholded step takes its own PyTorch distance too, still not
        # carried into later steps: every step starts from the graph's cache)
        step_tol = max(decode_tol, torch_step) if not thresholded else \
            max(report.tolerance, torch_step) if _factor(manifest) == GRID_FACTOR else report.tolerance
        if tie_step and (step_diff > step_tol or not torch.equal(o_next, t_next)):
            report.tie_steps += 1  # a near-tie there (op check); the logits of this step are not comparable
        else:
            report.tokens_identical &= bool(torch.equal(o_next, t_next))
            decode_diff, decode_tol = max(decode_diff, step_diff), max(decode_tol, step_tol)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
        o_previous = o_state
        o_logits, o_state = onnx_backend.forward(t_next[:, None], mask, o_state)
        if predicted:
            reference.force = exact.force = (o_state["heads"].numpy(), o_state["neurons"].numpy())
        if thresholded:
            tie_step = _check_thresholded_ops(report, _float64(model), manifest, exact.thresholds, o_previous,
                                              o_state, mask) > 0
            reference.force_kept = exact.force_kept = _graph_kept(o_state["probe"], exact.thresholds, a["layers"])
            # Thresholds are discontinuous: one entry that fp32 and float64 decide differently at a tie
            # (checked op by op above) would send the two free-running decodes down different paths.
            # So each reference step starts from the graph's own cache: every step is compared on the
            # same history, and nothing a tie changes carries into the next step.
            t_state, e_state = _with_past(t_state, o_previous, torch.float32), _with_past(e_state, o_previous,
                                                                                           torch.float64)
        t_logits, t_state = reference.forward(t_next[:, None], mask, t_state)
        e_logits, e_state = exact.forward(t_next[:, None], mask, e_state)
        th, tn = _masks_numpy(reference.last_masks, B, a)
        for got, expect, scores in ((o_state["heads"].numpy(), th, reference.last_scores[0]),
                                    (o_state["neurons"].numpy(), tn, reference.last_scores[1])):
            agree, flips = mask_agreement(got, expect, scores)
            report.masks_identical &= agree
            report.mask_flips_at_ties += flips if agree else 0
    report.greedy_tokens = steps
    report.outputs.append(OutputCheck(f"decode logits ({steps} steps)", decode_diff, 0.0, decode_diff <= decode_tol))
    return report


def _with_past(state, graph_state: dict, dtype):
    """A reference backend state whose KV cache is the graph's (the state's masks, if any, kept)."""
    arrays = OrtBackend.past_arrays(graph_state)
    past = tuple((torch.from_numpy(arrays[2 * i].copy()).to(dtype), torch.from_numpy(arrays[2 * i + 1].copy()).to(dtype))
                 for i in range(len(arrays) // 2))
    if isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], torch.Tensor):
        return (past, state[1], state[2])  # per-sequence predictor: (past, heads, neurons)
    return past


def _graph_kept(probe: dict, thresholds: torch.Tensor, layers: int) -> dict:
    """{(reference input, layer): bool [B, S, D]}: the entries of each op's input x the graph kept."""
    from shadowllm.predictor.thresholds import OBSERVED

    return {(name, l): torch.from_numpy(np.abs(probe[f"layers.{l}.{op}.x"]) >= float(thresholds[l, OBSERVED[name]]))
            for l in range(layers) for name, op in (("attn_in", "attention"), ("mlp_in", "mlp"))}


@torch.no_grad()
def _check_thresholded_ops(report: ParityReport, model64, manifest: dict, thresholds, before: dict, after: dict,
                           mask: torch.Tensor):
    """Every sparse op of one decode step against the float64 reference of docs/export-format.md, fed the graph's own
    input x (and cache, masks): the entries of x kept are then the same by construction, and a
    difference in y must come from an entry of h / the context that fp32 and float64 decide
    differently at its threshold. Such a difference passes when toggling the reference's near-tie
    entries (within KEPT_TIE of the threshold) explains it to OP_TOL; anything else fails. Returns the
    number of internal entries within NEAR_TIE of their threshold this step."""
    from shadowllm.models import adapter_for
    from shadowllm.models.reference import attention_block, in_window, mlp_block

    adapter = adapter_for(model64)
    arch = adapter.arch
    probe = after["probe"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
    ropes = adapter.ropes(positions)
    allowed = mask.bool()[:, None, :]
    heads = torch.from_numpy(after["heads"].numpy())
    neurons = torch.from_numpy(after["neurons"].numpy())
    activations = (manifest.get("weights") or {}).get("activations", "fp32")
    near = 0
    for layer in range(arch.num_layers):
        t = thresholds[layer].double()
        for op in ("attention", "mlp"):
            x = torch.from_numpy(probe[f"layers.{layer}.{op}.x"]).double()
            y = torch.from_numpy(probe[f"layers.{layer}.{op}.y"]).double()
            seen = {}

            def observe(_, name, v):
                seen[name] = v
            if op == "attention":
                past = tuple(torch.from_numpy(OrtBackend.past_arrays(before)[2 * layer + i]).double() for i in (0, 1))
                on = heads[:, layer]
                ref, _, _ = attention_block(arch, adapter.attention(layer), x, past,
                                            in_window(allowed, arch.window(layer)), ropes.get(arch.rope_kind(layer)),
                                            token_mask=on[:, None, :], kv_policy="all", observer=observe,
                                            layer=layer, t_x=t[0], t_o=t[1], activations=activations)
                internal, threshold, rows = (seen["head_context"] * on[:, None, :, None]).flatten(2), t[1], \
                    adapter.attention(layer).w_o_t
            else:
                on = neurons[:, layer]
                w = adapter.mlp(layer)
                ref = mlp_block(arch.activation, w, x, token_mask=on[:, None, :], observer=observe, layer=layer,
                                t_x=t[2], t_h=t[3], activations=activations)
                internal, threshold, rows = seen["neuron_act"] * on[:, None, :], t[3], w.w_out_t
            report.threshold_ops_checked += 1
            gap = (internal.abs() - threshold).abs()
            near += int(((gap <= NEAR_TIE * internal.abs().amax(-1, keepdim=True)) & (internal != 0)).sum())
            scale = ref.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-30)  # per token (outlier channels)
            tol = OP_TOL * scale
            if activations != "fp32":  # the int8 grid's boundary cases of h / the context (x is the graph's own)
                tol = tol + _grid_bound(torch.where(internal.abs() >= threshold, internal, 0.0), rows)
            if bool(((y - ref).abs() <= tol).all()):
                continue
            ties = (gap <= KEPT_TIE * internal.abs().amax(-1, keepdim=True)) & (internal != 0)
            report.threshold_ops_match &= _explained_by_ties(y - ref, internal, ties, threshold, rows, tol)
            report.threshold_ties += int(ties.sum())
    return near


NEAR_HALF = 1e-2  # code units of the int8 activation grid: a boundary case fp32 and float64 may round apart


def _grid_bound(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """What rounding v [B, S, N] onto the int8 activation grid (models/quant.round_activations) may
    move v @ rows by between two implementations whose values of v differ by rounding: d x |row| for
    each entry within NEAR_HALF of a rounding boundary (d its block's scale)."""
    from shadowllm.models.quant import BLOCK

    blocks = v.reshape(*v.shape[:-1], v.shape[-1] // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    r = blocks / d.clamp(min=1e-300)
    near = ((r - r.floor() - 0.5).abs() < NEAR_HALF) & (d > 0)
    return (near * d).reshape(v.shape) @ rows.abs().to(v.dtype)


def _explained_by_ties(diff, internal, ties, threshold, rows, tol) -> bool:
    """Whether some choice of keep / drop for the near-tie entries turns the reference into the graph's
    output: each toggled entry adds (graph kept, reference dropped) or removes its value times its row."""
    import itertools

    where = ties.nonzero().tolist()
    if not where or len(where) > 6:
        return False
    terms = []
    for b, s, i in where:
        v = float(internal[b, s, i])
        kept = abs(v) >= float(threshold)
        terms.append((b, s, (-v if kept else v) * rows[i].double()))
    for choice in itertools.product((0, 1), repeat=len(terms)):
        rest = diff.clone()
        for on, (b, s, term) in zip(choice, terms):
            if on:
                rest[b, s] -= term
        if bool((rest.abs() <= tol).all()):
            return True
    return False


def write_report(report: ParityReport, path: str | os.PathLike):
    data = asdict(report)
    data["passed"] = report.passed
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


# TensorRT against ONNX Runtime: fp32 engines are held to this; fp16 engines to fp16's rounding.
TRT_ATOL = {False: 1e-3, True: 5e-2}


def check_tensorrt(folder: str | os.PathLike, tokenizer, sparsity: float = 0.5, steps: int = 16,
                   seed: int = 0) -> ParityReport:
    """The engine of `build --target tensorrt` against the same export on onnxruntime (native kernels
    when built): prefill outputs through Polygraphy's Comparator (OnnxrtRunner vs TrtRunner), then
    greedy decoding step by step on both backends with identical tokens."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import CompareFunc, Comparator

    from shadowllm.runtime.trt_backend import TrtBackend, engine_folder

    folder = Path(folder)
    manifest = check_export_folder(folder)
    fp16 = bool(json.loads((engine_folder(folder) / "shadowllm.json").read_text())["build"].get("fp16"))
    report = ParityReport(str(folder), manifest["policy"], sparsity, tolerance=TRT_ATOL[fp16], against="tensorrt")
    a = manifest["arch"]
    trt_backend = TrtBackend(folder, sparsity)
    g = torch.Generator().manual_seed(seed)
    B, S = 2, 12
    ids = torch.randint(0, a["vocab"], (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0
    ones = trt_backend.initial_state(B)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).numpy(), "shadow_head_mask": ones["heads"],
             "shadow_neuron_mask": ones["neurons"], "sparsity": np.array(sparsity, dtype=np.float32)}
    for i in range(a["layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = ones["past"][2 * i]
    options, report.native = session_options(None)
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    results = Comparator.run([OnnxrtRunner(session, name="onnxruntime"), trt_backend.make_runner()],
                             data_loader=[feeds])
    valid = mask.bool().numpy()
    for runner_results in (results[0][1], results[1][1]):
        runner_results[0]["logits"] = runner_results[0]["logits"][valid]
    ours, theirs = results[0][1][0], results[1][1][0]
    for name in ours.keys():
        diff = np.abs(np.asarray(theirs[name], dtype=np.float64) - np.asarray(ours[name], dtype=np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = max_abs / max(float(np.abs(np.asarray(ours[name], dtype=np.float64)).max()), 1e-30)
        report.outputs.append(OutputCheck(f"tensorrt {name}", max_abs, max_rel, max_abs <= report.tolerance))
    report.polygraphy_passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(
        atol=report.tolerance, rtol=0.0)))

    from shadowllm.runtime.generate import encode_batch

    onnx_backend = OrtBackend(folder, sparsity, native=report.native)
    ids, mask = encode_batch(tokenizer, ["The history of the city", "A short note"],
                             tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    o_logits, o_state = onnx_backend.forward(ids, mask, None)
    t_logits, t_state = trt_backend.forward(ids, mask, None)
    for _ in range(steps):
        o_next, t_next = o_logits[:, -1].argmax(-1), t_logits[:, -1].argmax(-1)
        report.tokens_identical &= bool(torch.equal(o_next, t_next))
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], 1)
        o_logits, o_state = onnx_backend.forward(o_next[:, None], mask, o_state)
        t_logits, t_state = trt_backend.forward(o_next[:, None], mask, t_state)
    report.greedy_tokens = steps
    return report
