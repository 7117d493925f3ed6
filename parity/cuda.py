"""`shadowllm parity DIR --backend cuda [--dtype fp32|bf16|fp16]`: an export run by the CUDA backend
(the model the manifest names, the export's policy and predictor, the plugins' kernels) against the
PyTorch reference of the same policy on the CPU — fp32 and the float64 golden, as `parity` checks
onnxruntime.

- fp32: prefill logits per position within parity/check.py's tolerance (twice the fp32 reference's
  own distance from float64, scaled by each position's residual magnitude); then `steps` greedy
  decode steps, both sides fed the golden's tokens: the backend's tokens identical to the golden's
  and its last-position logits within the same tolerance. A dense export is fed random masks.
- bf16 / fp16: the weights and activations themselves are rounded to 8 / 11 significant bits, so the
  fp32 tolerance is scaled by the unit roundoff ratio (2^-8 / 2^-24 for bf16, 2^-11 / 2^-24 for
  fp16) and the prefill's last-position greedy token must agree; decode tokens are compared and
  their mismatches reported (a 16-bit run may take a different branch at a near-tie: reported, not
  failed).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from shadowllm.models import ShadowError, fingerprint

from shadowllm.export.folder import check_export_folder
from .check import ATOL, FP32_FACTOR, OutputCheck, ParityReport, _float64, _logit_tolerance
from shadowllm.runtime.policy import export_model, export_policy
from shadowllm.runtime.torch_backend import TorchBackend

ROUNDOFF = {"fp32": 1.0, "bf16": 2.0 ** -8 / 2.0 ** -24, "fp16": 2.0 ** -11 / 2.0 ** -24}


def check_cuda(folder: str | os.PathLike, model, tokenizer, sparsity: float = 0.5, steps: int = 32,
               dtype: str = "fp32", seed: int = 0, device: str = "cuda") -> ParityReport:
    from shadowllm.runtime.cuda_backend import CudaBackend, own_copy
    from shadowllm.runtime.generate import encode_batch

    folder = Path(folder)
    manifest = check_export_folder(folder, graph=False)
    if manifest["model_fingerprint"] != fingerprint(model):
        raise ShadowError(f"{folder} was exported from another model; pass the right one with --model")
    if dtype not in ROUNDOFF:
        raise ShadowError(f"--dtype {dtype!r}: expected one of {', '.join(ROUNDOFF)}")
    report = ParityReport(str(folder), manifest["policy"], sparsity, against=f"cuda-{dtype}")
    a = manifest["arch"]
    model = export_model(folder, manifest, model)  # the model the export computes (rotated?)
    golden_model = _float64(model)
    config = export_policy(folder, manifest, model, sparsity, dense_masks="random")
    reference = TorchBackend(model, **config)
    exact = TorchBackend(golden_model, **export_policy(folder, manifest, golden_model, sparsity, dense_masks="random"))
    ours = CudaBackend(own_copy(model), **config, kv_policy=manifest.get("kv_policy", "all"), dtype=dtype, device=device)
    scale = ROUNDOFF[dtype]

    # prefill: two rows, the second left-padded
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a["vocab"], (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits32, _ = reference.forward(ids, mask, None)
    logits64, _ = exact.forward(ids, mask, None)
    got, _ = ours.forward(ids, mask, None)
    valid = mask.bool()
    report.fp32_reference_error = float((logits32.double() - logits64)[valid].abs().max())
    report.tolerance = max(ATOL, FP32_FACTOR * report.fp32_reference_error) * scale
    tolerance = _logit_tolerance(golden_model, ids, mask, logits32, logits64) * scale
    report.logits_tolerance = (float(tolerance[valid].min()), float(tolerance[valid].max()))
    per_position = (got.double() - logits64).abs().amax(-1)
    worst = float(per_position[valid].max())
    report.outputs.append(OutputCheck("prefill logits", worst, worst / float(logits64.abs().max()),
                                      bool((per_position <= tolerance)[valid].all())))
    same_last = bool(torch.equal(got[:, -1].argmax(-1), logits64[:, -1].argmax(-1)))
    report.outputs.append(OutputCheck("prefill greedy token", 0.0 if same_last else 1.0, 0.0, same_last))

    # decode: both fed the golden's greedy tokens
    ids, mask = encode_batch(tokenizer, ["The history of the city", "A short note"],
                             tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    o_logits, o_state = ours.forward(ids, mask, None)
    e_logits, e_state = exact.forward(ids, mask, None)
    t_logits, t_state = reference.forward(ids, mask, None)
    decode_diff, decode_tol, mismatches = 0.0, report.tolerance, []
    for step in range(steps):
        e_next = e_logits[:, -1].argmax(-1)
        if not torch.equal(o_logits[:, -1].argmax(-1), e_next):
            mismatches.append(step)
        decode_diff = max(decode_diff, float((o_logits[:, -1].double() - e_logits[:, -1]).abs().max()))
        decode_tol = max(decode_tol, FP32_FACTOR * scale * float((t_logits[:, -1].double() - e_logits[:, -1]).abs().max()))
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], 1)
        o_logits, o_state = ours.forward(e_next[:, None], mask, o_state)
        t_logits, t_state = reference.forward(e_next[:, None], mask, t_state)
        e_logits, e_state = exact.forward(e_next[:, None], mask, e_state)
    report.greedy_tokens = steps
    report.tokens_identical = not mismatches or dtype != "fp32"
    report.token_mismatch_steps = mismatches
    report.outputs.append(OutputCheck(f"decode logits ({steps} steps)", decode_diff, 0.0, decode_diff <= decode_tol))
    report.polygraphy_passed = True  # no ONNX graph runs here: the comparisons above are the verdict
    return report

