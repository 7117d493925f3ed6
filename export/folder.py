"""Reading an export folder (what `export/exporter.py` writes): its manifest, checked whole, and the
runtime `sparsity` value the graph takes. Every stage above export (compiler targets, backends,
parity, serving) opens a folder through these two, so a partial folder or a value the export cannot
take is the same one line everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shadowllm.models import ShadowError

REQUIRED = ("model.onnx", "config.json", "shadowllm.json")


def check_export_folder(folder: Path, graph: bool = True) -> dict:
    """The manifest of an export folder; one clear line if the folder is missing or partial. graph=False:
    a backend that runs the export's policy with the model's own weights (CUDA) needs the manifest and
    its side files only, not model.onnx and its data."""
    if not folder.is_dir():
        raise ShadowError(f"{folder}: no such export folder (expected the output of `shadowllm export`)")
    missing = [f for f in (REQUIRED if graph else REQUIRED[1:]) if not (folder / f).is_file()]
    if missing:
        raise ShadowError(f"{folder}: partial export folder, missing {', '.join(missing)}")
    try:
        manifest = json.loads((folder / "shadowllm.json").read_text())
    except json.JSONDecodeError as e:
        raise ShadowError(f"{folder / 'shadowllm.json'}: not valid JSON ({e})") from None
    data = folder / "model.onnx.data"
    if graph and not data.is_file():
        raise ShadowError(f"{folder}: partial export folder, missing model.onnx.data (the weights)")
    return manifest


def weights_format(manifest: dict) -> str:
    """The projections' format an export holds (models/quant.py); fp32 before export revision 5."""
    return (manifest.get("weights") or {}).get("format", "fp32")


def weights_label(manifest: dict) -> str:
    """What a result row calls the export's weights: the GGUF block type of a `--weights gguf` export
    (e.g. Q4_1), else its format."""
    return (manifest.get("weights") or {}).get("gguf") or weights_format(manifest)


def sparsity_value(manifest: dict, sparsity, flag: str = "--sparsity") -> np.ndarray:
    """The graph's `sparsity` input (fp32 scalar) for a requested sparsity; one clear line naming `flag`
    when the export cannot take it (outside [0, 1), or off a threshold table's grid)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ShadowError(f"{flag} must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise ShadowError(f"{flag} must lie in [0, 1), got {sparsity}")
    if manifest.get("thresholds"):  # the graph picks a row of its threshold table: only grid values
        from shadowllm.predictor.thresholds import check_grid_sparsity

        check_grid_sparsity(value, flag)
    return np.array(value, dtype=np.float32)
