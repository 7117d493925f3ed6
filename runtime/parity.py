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

from .generate import generate
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


def reference_masks(folder: Path, manifest: dict, batch: int, sparsity: float):
    """The masks the export must produce, derived in PyTorch (static) or chosen here (dense)."""
    from shadowllm.predictor.allocation import keep_mask

    a = manifest["arch"]
    if manifest["policy"] == "static":
        from safetensors.torch import load_file

        scores = load_file(str(folder / "static_scores.safetensors"))
        heads = keep_mask(scores["heads"], sparsity) if manifest.get("target", "both") != "neurons" else \
            torch.ones(a["layers"], a["heads"], dtype=torch.bool)
        neurons = keep_mask(scores["neurons"], sparsity) if manifest.get("target", "both") != "heads" else \
            torch.ones(a["layers"], a["neurons"], dtype=torch.bool)
        return heads.expand(batch, -1, -1), neurons.expand(batch, -1, -1)
    g = torch.Generator().manual_seed(1234)
    keep = 1.0 - sparsity
    heads = torch.rand(batch, a["layers"], a["heads"], generator=g) < keep
    neurons = torch.rand(batch, a["layers"], a["neurons"], generator=g) < keep
    heads[:, 0], neurons[:, 0] = True, True
    return heads, neurons


def check(folder: str | os.PathLike, model, tokenizer, sparsity: float = 0.5, steps: int = 32,
          seed: int = 0) -> ParityReport:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import CompareFunc, Comparator, RunResults

    folder = Path(folder)
    manifest = check_export_folder(folder)
    if manifest["model_fingerprint"] != fingerprint(model):
        raise ShadowError(f"{folder} was exported from another model (fingerprint {manifest['model_fingerprint']}, "
                          f"this model {fingerprint(model)}); pass the right one with --model")
    a = manifest["arch"]
    report = ParityReport(str(folder), manifest["policy"], sparsity)
    g = torch.Generator().manual_seed(seed)
    B, S = 2, 12
    ids = torch.randint(0, a["vocab"], (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0  # left padding on the second row
    heads, neurons = reference_masks(folder, manifest, B, sparsity)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(),
             "shadow_head_mask": heads.numpy() if manifest["policy"] == "dense" else np.ones_like(heads.numpy()),
             "shadow_neuron_mask": neurons.numpy() if manifest["policy"] == "dense" else np.ones_like(neurons.numpy()),
             "sparsity": np.array(sparsity, dtype=np.float32)}
    for i in range(a["layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((B, a["kv_heads"], 0, a["head_dim"]), np.float32)

    with torch.no_grad():
        logits, past = sparse_forward(model, ids, heads, neurons, mask)
    golden = {"logits": logits.numpy(), "shadow_head_mask_out": heads.numpy(), "shadow_neuron_mask_out": neurons.numpy()}
    for i, (k, v) in enumerate(past):
        golden[f"present.{i}.key"], golden[f"present.{i}.value"] = k.numpy(), v.numpy()

    runner = OnnxrtRunner(SessionFromOnnx(str(folder / "model.onnx")), name="onnxruntime")
    results = Comparator.run([runner], data_loader=[feeds])
    reference = RunResults()
    reference.add([golden], runner_name="pytorch-reference")
    results.extend(reference)
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
    # Polygraphy's own verdict on the same pair (padded logits rows compare too: they must match as well)
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=ATOL, rtol=0.0))
    report.polygraphy_passed = bool(accuracy)

    prompts = ["The history of the city", "A short note"]
    onnx_out = generate(OrtBackend(folder, sparsity), tokenizer, prompts, steps, eos_ids=[])
    torch_masks = reference_masks(folder, manifest, 1, sparsity)
    torch_backend = TorchBackend(model, torch_masks[0][0], torch_masks[1][0]) if manifest["policy"] == "static" \
        else TorchBackend(model)
    torch_out = generate(torch_backend, tokenizer, prompts, steps, eos_ids=[])
    report.greedy_tokens = steps
    report.tokens_identical = all(o.token_ids == t.token_ids for o, t in zip(onnx_out, torch_out))
    return report


def write_report(report: ParityReport, path: str | os.PathLike):
    data = asdict(report)
    data["passed"] = report.passed
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
