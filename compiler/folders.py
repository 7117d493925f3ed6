"""A build target's output folder, DIR/<target>/, written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

# The export's side files every built folder carries, so it loads like an export folder.
COPIED = ("config.json", "genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "special_tokens_map.json", "static_scores.safetensors", "thresholds.safetensors")


@contextmanager
def target_folder(source: Path, target: str, side_files: bool = True):
    """Yields a temporary folder beside DIR/<target>; when the block succeeds the export's side files
    are copied in (unless side_files is False) and it replaces DIR/<target>, when it fails it is
    removed."""
    out = source / target
    tmp = source / f".{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for name in COPIED if side_files else ():
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict):
    (folder / "shadowllm.json").write_text(json.dumps(manifest, indent=2) + "\n")
