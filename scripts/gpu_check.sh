#!/usr/bin/env bash
# The device check for a lent GPU (no TensorRT there): the CUDA kernel and CUDA backend tests, the
# kernel benchmark (with its knob sweep and a correctness column) and the decode benchmark. Run from
# the repository root on the GPU machine with the library built here (build/ carried: CUDA 13.0,
# configured with -DCMAKE_CUDA_ARCHITECTURES="80;90": with no GPU here the default is sm_80 only); if
# it does not load there it is rebuilt from the carried headers. Writes into
# $OUT (default /tmp/gpu-check): gpu-kernels.*, bench-gpu.*, and a log per step.
#   bash scripts/gpu_check.sh [gpu_bench.py flags]
# SMOLLM2_PARITY=1 (with build/gpu-bundle/ carried, scripts/gpu_bundle.py): only `parity --backend cuda`
# of the real model's export skeletons, fp32 and bf16.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
LIB=$PWD/build/libshadowllm_trt_plugins.so
if ! python3 -c "import ctypes, sys; sys.exit(ctypes.CDLL('$LIB').shadowllm_cuda_device_count() < 1)"; then
  echo "the carried library does not run here: rebuilding" | tee "$OUT/build.log"
  cmake -S . -B build-gpu -DORT_INCLUDE_DIR="$PWD/build/ort-headers" -DTRT_INCLUDE_DIR="$PWD/build/trt-headers" \
    >>"$OUT/build.log" 2>&1 && cmake --build build-gpu -j16 >>"$OUT/build.log" 2>&1
  LIB=$PWD/build-gpu/libshadowllm_trt_plugins.so
fi
export SHADOWLLM_TRT_PLUGINS=$LIB PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The package from the source tree without installing it (its folders map to shadowllm.<stage>).
SHIM=$(mktemp -d)
mkdir "$SHIM/shadowllm"
ln -s "$PWD"/shadowllm/*.py "$SHIM/shadowllm/"
for stage in models predictor export compiler runtime; do ln -s "$PWD/$stage" "$SHIM/shadowllm/$stage"; done
export PYTHONPATH=$SHIM:$PWD
PYTEST="python3 -P -m pytest --noconftest -p no:cacheprovider --import-mode=append -q"
if [ -n "${SMOLLM2_PARITY:-}" ]; then
  B=$PWD/build/gpu-bundle
  W=$(mktemp -d)
  cat "$B/part-1" "$B/part-2" > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
  tar -xzf "$B/extra.tar.gz" -C "$W"
  sed -i "s#@BUNDLE@#$W#g" "$W"/exports/*/shadowllm.json
  export SHADOWLLM_GGUF=$W/SmolLM2-135M-Instruct.Q4_1.gguf SHADOWLLM_CACHE=$W/cache PYTHONPATH=$PYTHONPATH:$W/python
  for d in "$W"/exports/*/; do
    for dtype in fp32 bf16; do
      echo "== $(basename "$d") $dtype" | tee -a "$OUT/smollm2-parity.log"
      timeout 240 python3 -P -m shadowllm parity "$d" --backend cuda --dtype "$dtype" --sparsity 0.5 --steps 32 \
        --json "$OUT/parity-$(basename "$d")-$dtype.json" 2>&1 | tee -a "$OUT/smollm2-parity.log"
    done
  done
  exit 0
fi
KERNELS=tests/parity/test_cuda_kernels.py
timeout 90 $PYTEST $KERNELS -k "batches or decode or in_place or refuses" 2>&1 | tee "$OUT/tests-decode.log"
timeout 120 $PYTEST tests/runtime/test_cuda_backend.py 2>&1 | tee "$OUT/tests-backend.log"
# the backend's policies on the GPU: predictors (per sequence / token, DejaVu), export folders, parity
# in fp32 / bf16 / fp16 (their CPU halves run in CI); needs onnx + onnxscript for the tiny exports
timeout 240 $PYTEST tests/runtime/test_cuda_backend_logic.py -k cuda 2>&1 | tee "$OUT/tests-backend-policies.log"
[ -n "${SKIP_KERNEL_BENCH:-}" ] || timeout 150 python3 -P scripts/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
[ -n "${SKIP_DECODE_BENCH:-}" ] || timeout 150 python3 -P -m shadowllm.bench.cuda --out "$OUT/bench-gpu" 2>&1 | tee "$OUT/decode.log"
timeout "${TEST_TIMEOUT:-120}" $PYTEST -x $KERNELS -k "not (batches or decode or in_place or refuses)" 2>&1 | tee "$OUT/tests.log"
