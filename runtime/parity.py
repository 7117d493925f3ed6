"""`shadowllm parity`: an export folder against the PyTorch references, output by output, token by token.

Comparisons go through Polygraphy: the ONNX model runs in an `OnnxrtRunner`, the PyTorch reference's
outputs (HF semantics through the sparse reference forward, given the same masks) are a golden
`RunResults`, and `Comparator.compare_accuracy` checks every output against the tolerance. The same
check takes a TensorRT runner where TensorRT exists. Then greedy generation runs on both backends
and the tokens must be identical.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from shadowllm.models import ShadowError, fingerprint, sparse_forward

from .ort_backend import OrtBackend, check_export_folder
from .torch_backend import TorchBackend

ATOL = 1e-4


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class ParityReport:
    folder: str
    policy: str
    sparsity: float
    outputs: list = field(default_factory=list)
    masks_identical: bool = True
    greedy_tokens: int = 0
    tokens_identical: bool = True
    polygraphy_passed: bool = True

    @property
    def passed(self) -> bool:
        return (all(o.passed for o in self.outputs) and self.masks_identical and self.tokens_identical
                and self.polygraphy_passed)

    def table(self) -> str:
        lines = [f"parity of {self.folder} (policy {self.policy}, sparsity {self.sparsity}) vs PyTorch reference",
                 f"{'output':<28}{'max abs':>12}{'max rel':>12}  result"]
        for o in self.outputs:
            lines.append(f"{o.name:<28}{o.max_abs:>12.3e}{o.max_rel:>12.3e}  {'pass' if o.passed else 'FAIL'}")
        lines.append(f"{'masks identical':<52}  {'pass' if self.masks_identical else 'FAIL'}")
        lines.append(f"{f'greedy tokens ({self.greedy_tokens})':<52}  {'pass' if self.tokens_identical else 'FAIL'}")
        lines.append(f"{'polygraphy comparator (atol ' + str(ATOL) + ')':<52}  "
                     f"{'pass' if self.polygraphy_passed else 'FAIL'}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def reference_backend(folder: Path, manifest: dict, model, sparsity: float) -> TorchBackend:
    """The PyTorch reference of an export: the sparse reference forward driven like the graph."""
    from shadowllm.predictor.allocation import keep_mask

    a = manifest["arch"]
    target = manifest.get("target", "both")
    hs = sparsity if target in ("heads", "both") else 0.0
    ns = sparsity if target in ("neurons", "both") else 0.0
    policy = manifest["policy"]
    if policy == "dense":  # the graph applies whatever masks it is fed: feed random ones
        g = torch.Generator().manual_seed(1234)
        heads = torch.rand(a["layers"], a["heads"], generator=g) >= hs
        neurons = torch.rand(a["layers"], a["neurons"], generator=g) >= ns
        heads[0], neurons[0] = True, True
        return TorchBackend(model, heads, neurons)
    if policy == "static":
        from safetensors.torch import load_file

        scores = load_file(str(folder / "static_scores.safetensors"))
        return TorchBackend(model, keep_mask(scores["heads"], hs) if hs else None,
                            keep_mask(scores["neurons"], ns) if ns else None)
    from shadowllm.export.exporter import _predictor_fingerprint
    from shadowllm.predictor.predictors import load_predictor

    if not manifest.get("predictor"):
        raise ShadowError(f"{folder}: the manifest names no predictor folder to check the {policy} policy against")
    predictor = load_predictor(manifest["predictor"], model)
    if _predictor_fingerprint(predictor) != manifest.get("predictor_fingerprint"):
        raise ShadowError(f"predictor {manifest['predictor']} changed since the export (fingerprint differs)")
    return TorchBackend(model, predictor=predictor, head_sparsity=hs, neuron_sparsity=ns)


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
          seed: int = 0) -> ParityReport:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import CompareFunc, Comparator, RunResults
    from polygraphy.logger import G_LOGGER

    folder = Path(folder)
    manifest = check_export_folder(folder)
    if manifest["model_fingerprint"] != fingerprint(model):
        raise ShadowError(f"{folder} was exported from another model (fingerprint {manifest['model_fingerprint']}, "
                          f"this model {fingerprint(model)}); pass the right one with --model")
    a = manifest["arch"]
    report = ParityReport(str(folder), manifest["policy"], sparsity)
    reference = reference_backend(folder, manifest, model, sparsity)

    # 1. prefill, output by output, through Polygraphy
    g = torch.Generator().manual_seed(seed)
    B, S = 2, 12
    ids = torch.randint(0, a["vocab"], (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0  # left padding on the second row
    logits, state = reference.forward(ids, mask, None)
    heads, neurons = _masks_numpy(reference.last_masks, B, a)
    fed_heads, fed_neurons = (heads, neurons) if manifest["policy"] == "dense" else (np.ones_like(heads),
                                                                                       np.ones_like(neurons))
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).numpy(), "shadow_head_mask": fed_heads,
             "shadow_neuron_mask": fed_neurons, "sparsity": np.array(sparsity, dtype=np.float32)}
    for i in range(a["layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((B, a["kv_heads"], 0, a["head_dim"]), np.float32)
    golden = {"logits": logits.numpy(), "shadow_head_mask_out": heads, "shadow_neuron_mask_out": neurons}
    for i, (k, v) in enumerate(_past_of(state)):
        golden[f"present.{i}.key"], golden[f"present.{i}.value"] = k.numpy(), v.numpy()

    G_LOGGER.module_severity = G_LOGGER.ERROR  # our table reports per output; keep Polygraphy's log short
    runner = OnnxrtRunner(SessionFromOnnx(str(folder / "model.onnx")), name="onnxruntime")
    results = Comparator.run([runner], data_loader=[feeds])
    golden_results = RunResults()
    golden_results.add([golden], runner_name="pytorch-reference")
    results.extend(golden_results)
    ours = results[0][1][0]
    valid = mask.bool().numpy()
    for name, expect in golden.items():
        got = ours[name]
        if expect.dtype == bool:
            same = bool(np.array_equal(got, expect))
            report.masks_identical &= same
            report.outputs.append(OutputCheck(name, float(np.sum(got != expect)), 0.0, same))
            continue
        diff = np.abs(got - expect)
        if name == "logits":  # padded positions' logits are not used by anyone
            diff = diff[valid]
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = max_abs / max(float(np.abs(expect).max()), 1e-30)
        report.outputs.append(OutputCheck(name, max_abs, max_rel, max_abs <= ATOL))
    # Polygraphy's own verdict on the same pair. Logits at padded positions belong to no one (their
    # queries see no key), so both sides keep only the real positions.
    for runner_results in (results[0][1], results[1][1]):
        runner_results[0]["logits"] = runner_results[0]["logits"][valid]
    report.polygraphy_passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(
        atol=ATOL, rtol=0.0)))

    # 2. greedy decoding step by step on both backends: tokens, masks and last-position logits
    onnx_backend = OrtBackend(folder, sparsity)
    from .generate import encode_batch

    ids, mask = encode_batch(tokenizer, ["The history of the city", "A short note"],
                             tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    B = ids.shape[0]
    if manifest["policy"] == "dense":  # feed the reference's (row-shared) masks
        start = onnx_backend.initial_state(B, np.repeat(heads[:1], B, 0), np.repeat(neurons[:1], B, 0))
    else:
        start = onnx_backend.initial_state(B)
    o_logits, o_state = onnx_backend.forward(ids, mask, start)
    t_logits, t_state = reference.forward(ids, mask, None)
    decode_diff = 0.0
    for _ in range(steps):
        o_next, t_next = o_logits[:, -1].argmax(-1), t_logits[:, -1].argmax(-1)
        report.tokens_identical &= bool(torch.equal(o_next, t_next))
        decode_diff = max(decode_diff, float((o_logits[:, -1] - t_logits[:, -1]).abs().max()))
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
        o_logits, o_state = onnx_backend.forward(t_next[:, None], mask, o_state)
        t_logits, t_state = reference.forward(t_next[:, None], mask, t_state)
        th, tn = _masks_numpy(reference.last_masks, B, a)
        report.masks_identical &= bool(np.array_equal(o_state["heads"].numpy(), th)
                                       and np.array_equal(o_state["neurons"].numpy(), tn))
    report.greedy_tokens = steps
    report.outputs.append(OutputCheck(f"decode logits ({steps} steps)", decode_diff, 0.0, decode_diff <= ATOL))
    return report


def write_report(report: ParityReport, path: str | os.PathLike):
    data = asdict(report)
    data["passed"] = report.passed
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
