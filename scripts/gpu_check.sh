#!/usr/bin/env bash
# The device check for a lent GPU (no TensorRT there): the GPU kernel benchmark (with its knob sweep
# and a correctness column), then the CUDA kernel parity tests. Run from the repository root on the
# GPU machine with the library built here (build/ carried: CUDA 13.0, sm_80 + sm_90); if it does
# not load there it is rebuilt from the carried headers. Writes into $OUT (default /tmp/gpu-check):
# gpu-kernels.json / .md, bench.log, tests.log.
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
export SHADOWLLM_TRT_PLUGINS=$LIB PYTHONUNBUFFERED=1
# The package from the source tree without installing it (its folders map to shadowllm.<stage>).
SHIM=$(mktemp -d)
mkdir "$SHIM/shadowllm"
ln -s "$PWD"/shadowllm/*.py "$SHIM/shadowllm/"
for stage in models predictor export compiler runtime; do ln -s "$PWD/$stage" "$SHIM/shadowllm/$stage"; done
export PYTHONPATH=$SHIM:$PWD
TESTS="python3 -P -m pytest --noconftest -p no:cacheprovider --import-mode=append -q tests/parity/test_cuda_kernels.py"
# decode shapes first (quick), then the benchmark, then the random cases (hypothesis)
timeout 90 $TESTS -k "batches or decode or in_place or refuses" 2>&1 | tee "$OUT/tests-decode.log"
timeout 180 python3 -P scripts/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
timeout "${TEST_TIMEOUT:-150}" $TESTS -x -k "not (batches or decode or in_place or refuses)" 2>&1 | tee "$OUT/tests.log"
