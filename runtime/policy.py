"""What an export folder's policy asks of a backend that runs the model itself (PyTorch reference,
CUDA kernels): the masks, thresholds and predictor the graph would apply at a runtime sparsity,
read from the folder's manifest and side files (static_scores.safetensors, thresholds.safetensors,
the predictor folder the manifest names, checked by fingerprint)."""

from __future__ import annotations

from pathlib import Path

import torch

from shadowllm.models import ShadowError


def _threshold_file(folder: Path) -> dict:
    """The tensors of an export's thresholds.safetensors: table, grid, and its rotation if any."""
    from safetensors.torch import load_file

    path = folder / "thresholds.safetensors"
    if not path.is_file():
        raise ShadowError(f"{folder}: partial export folder, missing thresholds.safetensors (the threshold table)")
    return load_file(str(path))


def export_thresholds(folder: Path, manifest: dict, sparsity: float):
    """The [L, 4] thresholds an export applies at `sparsity` (its table's row), or None."""
    if not manifest.get("thresholds"):
        return None
    from shadowllm.predictor.thresholds import check_grid_sparsity

    row = check_grid_sparsity(sparsity)
    return _threshold_file(folder)["table"][row]


def exported_model(folder: Path, manifest: dict, model=None):
    """export_model of the model the manifest names (loaded when `model` is None), refused in one line
    when it is not the one exported (fingerprint)."""
    from shadowllm.models import fingerprint, load

    if model is None:
        if not manifest.get("model"):
            raise ShadowError(f"{folder}: the manifest names no model folder (exported from a model built in "
                              "code); pass the model")
        model, _ = load(manifest["model"])
    if fingerprint(model) != manifest.get("model_fingerprint"):
        raise ShadowError(f"{folder}: the model {manifest.get('model')} is not the one exported (fingerprint differs)")
    return export_model(folder, manifest, model)


def export_model(folder: Path, manifest: dict, model):
    """The model an export folder's graph computes: `model` (the one it was exported from, checked by
    the caller), or its copy rotated as the export's threshold calibration asks (models/rotation.py;
    the rotation is stored beside the table), or its copy with the projections on the export's
    weight grid (models/quant.py; a quantized export is never rotated)."""
    from shadowllm.export.folder import weights_format

    weights = weights_format(manifest)
    if weights != "fp32":
        import copy

        from shadowllm.models.quant import fake_quantize_

        blocks = None
        if (manifest.get("weights") or {}).get("gguf"):  # the file's own blocks, as the export carried them
            from shadowllm.models.gguf_blocks import GgufBlocks, gguf_of

            blocks = GgufBlocks(gguf_of(model))
        quantized = copy.deepcopy(model)
        fake_quantize_(quantized, weights, blocks, manifest["weights"].get("activations", "fp32"))
        return quantized
    if not (manifest.get("thresholds") or {}).get("rotation"):
        return model
    from shadowllm.models.rotation import rotated, rotation_from_tensors

    where = folder / "thresholds.safetensors"
    return rotated(model, rotation_from_tensors(_threshold_file(folder), where), str(where))


def export_policy(folder: Path, manifest: dict, model, sparsity: float, dense_masks: str = "none") -> dict:
    """Keyword arguments for TorchBackend / CudaBackend that make them apply the export's policy at
    `sparsity` to `model` (export_model's). dense_masks: what a `dense` export (which applies whatever masks it is fed) gets:
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
    # a rotated model's own fingerprint is not its source's; the predictor's fingerprint, recorded when the
    # export checked it against the source, is checked below
    rotated = getattr(model, "_shadowllm_rotation", None) is not None
    predictor = load_predictor(manifest["predictor"], None if rotated else model)
    if predictor_fingerprint(predictor) != manifest.get("predictor_fingerprint"):
        raise ShadowError(f"predictor {manifest['predictor']} changed since the export (fingerprint differs)")
    if policy == "shadow+threshold":
        hs, ns = manifest["head_sparsity"], 0.0
        predictor = predictor.fed_by(model)
    return {"predictor": predictor, "head_sparsity": hs, "neuron_sparsity": ns, "thresholds": thresholds}
