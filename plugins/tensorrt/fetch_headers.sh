#!/usr/bin/env bash
# Fetch the TensorRT 10.14 plugin headers (NvInfer*.h) from the PyPI wheel kernel-lens==2.0.1, which
# carries them under kernel_lens/include/tensorrt/, pinned by sha256. Usage: fetch_headers.sh DEST
# Only headers: no registry reachable here serves libnvinfer, and the plugin library needs none of
# it at link time (the interfaces it implements are header-only virtual classes).
set -euo pipefail
dest=${1:?usage: fetch_headers.sh DEST}
version="2.0.1"
sha256="07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
[ -f "$dest/NvInferRuntime.h" ] && exit 0
python=${PYTHON:-python3}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$python" -m pip download --disable-pip-version-check -q --no-deps "kernel-lens==$version" -d "$work" 2>/dev/null
wheel=$(ls "$work"/kernel_lens-*.whl)
echo "$sha256  $wheel" | sha256sum -c --quiet - || { echo "fetch_headers.sh: sha256 mismatch for $wheel" >&2; exit 1; }
"$python" - "$wheel" "$dest" <<'PY'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
dest.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("kernel_lens/include/tensorrt/") and name.endswith(".h"):
            (dest / pathlib.Path(name).name).write_bytes(z.read(name))
PY
