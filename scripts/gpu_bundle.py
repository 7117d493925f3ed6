"""What a GPU machine (no network, 64 MiB carried per call) needs to run the real model's exports on
the CUDA backend: the embedded SmolLM2 GGUF (98 MB) in two parts, plus one archive with the `gguf`
package (to convert it there) and export *skeletons* — each export folder's manifest and side files
(config, tokenizer, static scores, thresholds, its predictor), without model.onnx and its data, which
the CUDA backend does not read.

    .venv/bin/python scripts/gpu_bundle.py EXPORT_DIR [EXPORT_DIR ...]   # writes build/gpu-bundle/

Then two device calls back to back (what a call carries stays on the machine while it is warm):
carry build/gpu-bundle/part-1 with the library and headers, then build/gpu-bundle/part-2 and
build/gpu-bundle/extra.tar.gz with `SMOLLM2_PARITY=1 bash scripts/gpu_check.sh`, which joins the
parts, converts the model and runs `parity DIR --backend cuda` (fp32, then bf16) on every skeleton.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

PART = 48 * 2**20  # with the 11.5 MB library and the headers, the first call stays under 64 MiB
SIDE = ("shadowllm.json", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "static_scores.safetensors", "thresholds.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("build/gpu-bundle"))
    args = ap.parse_args()
    from shadowllm.models.loading import EMBEDDED, locate_gguf

    gguf = locate_gguf(EMBEDDED["smollm2-135m"])
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    data = gguf.read_bytes()
    (args.out / "part-1").write_bytes(data[:PART])
    (args.out / "part-2").write_bytes(data[PART:])
    with tarfile.open(args.out / "extra.tar.gz", "w:gz") as tar:
        tar.add(Path(importlib.util.find_spec("gguf").origin).parent, arcname="python/gguf")
        for folder in args.exports:
            manifest = json.loads((folder / "shadowllm.json").read_text())
            name = folder.name
            if manifest.get("predictor"):  # carried beside it; the manifest names it relative to the bundle
                tar.add(manifest["predictor"], arcname=f"exports/{name}.predictor")
                manifest["predictor"] = f"@BUNDLE@/exports/{name}.predictor"
            manifest["model"] = "smollm2-135m"
            for side in SIDE:
                if (folder / side).is_file() and side != "shadowllm.json":
                    tar.add(folder / side, arcname=f"exports/{name}/{side}")
            blob = (json.dumps(manifest, indent=2) + "\n").encode()
            info = tarfile.TarInfo(f"exports/{name}/shadowllm.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(args.out.iterdir())}
    print(f"{args.out}: {sizes} MiB ({gguf.name}: {len(data) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
