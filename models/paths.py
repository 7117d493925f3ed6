"""Output paths: refused before any work when they cannot be written, with the flag named."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
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


@contextmanager
def atomic_folder(out: Path):
    """Yields a temporary folder beside `out` (an absent or empty folder); when the block succeeds it
    becomes `out`, when it fails (or is interrupted) it is removed: never a half-written folder."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            if not out.is_dir() or any(out.iterdir()):  # another process wrote it while this one worked
                raise ShadowError(f"{out}: was written by another process meanwhile; this run's result "
                                  "is discarded")
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
