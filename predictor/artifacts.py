"""Reading the JSON manifests that sit beside traces and predictors, with one clear line per problem."""

from __future__ import annotations

import json
from pathlib import Path

from shadowllm.models import ShadowError, fingerprint


def read_manifest(folder: Path, filename: str, fmt: str, flag: str, writer: str) -> dict:
    """The manifest `folder/filename` of format `fmt`; `flag` and `writer` name the CLI flag and command."""
    path = folder / filename
    if not path.is_file():
        raise ShadowError(f"{flag} {folder}: no {filename} (not a folder written by `shadowllm {writer}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShadowError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise ShadowError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {fmt!r}")
    return manifest


def check_model(manifest: dict, model, what: str) -> None:
    """Refuse an artifact made on another model (its recorded fingerprint differs)."""
    if model is not None and manifest["model_fingerprint"] != fingerprint(model):
        raise ShadowError(f"{what} on another model (fingerprint {manifest['model_fingerprint']}, "
                          f"this model {fingerprint(model)})")
