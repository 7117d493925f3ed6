"""What an export folder's policy asks of a backend that runs the model itself (PyTorch reference,
CUDA kernels): the masks, thresholds and predictor the graph would apply at a runtime sparsity,
read from the folder's manifest and side files (static_scores.safetensors, thresholds.safetensors,
the predictor folder the manifest names, checked by fingerprint)."""

from __future__ import annotations

from pathlib import Path

import torch

from shadowllm.models import ShadowError


def export_thresholds(folder: Path, manifest: dict, sparsity: float):
    """The [L, 4] thresholds an export applies at `sparsity` (its table's row), or None."""
    if not manifest.get("thresholds"):
        return None
    from safetensors.torch import load_file

    from shadowllm.predictor.thresholds import check_grid_sparsity

    row = check_grid_sparsity(sparsity)
    path = folder / "thresholds.safetensors"
    if not path.is_file():
        raise ShadowError(f"{folder}: partial export folder, missing thresholds.safetensors (the threshold table)")
    return load_file(str(path))["table"][row]


def export_policy(folder: Path, manifest: dict, model, sparsity: float, dense_masks: str = "none") -> dict:
    """Keyword arguments for TorchBackend / CudaBackend that make them apply the export's policy at
    `sparsity`. dense_masks: what a `dense` export (which applies whatever masks it is fed) gets:
    "none" (all kept, as generation feeds it) or "random" (per-layer random masks at `sparsity`,
    layer 0 kept: what parity feeds both sides)."""
    from shadowllm.predictor.allocation import keep_mask

    a = manifest["arch"]
    target = manifest.get("target", "both")
    hs = sparsity if target in ("heads", "both") else 0.0
    ns = sparsity if target in ("neurons", "both") else 0.0
    policy = manifest["policy"]
    thresholds = export_thresholds(folder, manifest, sparsity)
    if policy == "threshold":
        return {"thresholds": thresholds}
    if policy == "dense":
        if dense_masks == "none":
            return {}
        g = torch.Generator().manual_seed(1234)
        heads = torch.rand(a["layers"], a["heads"], generator=g) >= hs
        neurons = torch.rand(a["layers"], a["neurons"], generator=g) >= ns
        heads[0], neurons[0] = True, True
        return {"head_mask": heads, "neuron_mask": neurons}
    if policy == "static":
        from safetensors.torch import load_file

        scores = load_file(str(folder / "static_scores.safetensors"))
        return {"head_mask": keep_mask(scores["heads"], hs) if hs else None,
                "neuron_mask": keep_mask(scores["neurons"], ns) if ns else None}
    from shadowllm.export.exporter import predictor_fingerprint
    from shadowllm.predictor.predictors import load_predictor

    if not manifest.get("predictor"):
        raise ShadowError(f"{folder}: the manifest names no predictor folder for its {policy} policy")
    predictor = load_predictor(manifest["predictor"], model)
    if predictor_fingerprint(predictor) != manifest.get("predictor_fingerprint"):
        raise ShadowError(f"predictor {manifest['predictor']} changed since the export (fingerprint differs)")
    if policy == "shadow+threshold":
        hs, ns = manifest["head_sparsity"], 0.0
    return {"predictor": predictor, "head_sparsity": hs, "neuron_sparsity": ns, "thresholds": thresholds}
