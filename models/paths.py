"""Output paths: refused before any work when they cannot be written, with the flag named."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ShadowError


def check_out(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a Path, once no parent of it is an existing non-folder (a long export or calibration
    would otherwise fail only at its end, e.g. with NotADirectoryError)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ShadowError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return path
