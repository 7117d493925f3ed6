"""The device check for a lent GPU (no TensorRT needed): the CUDA kernel parity tests, then kernel
times at decode shapes against torch's dense matmul of the same shape (when torch sees the GPU).

Run on the GPU machine after `bash scripts/setup.sh`:
    .venv/bin/python -m pytest -q tests/parity/test_cuda_kernels.py && .venv/bin/python scripts/gpu_kernel_check.py
Prints one JSON object per shape: max rel. error vs float64 NumPy, kernel ms, dense matmul ms.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shadowllm.export.onnx_ops import MLPVariant  # noqa: E402
from tests.parity.cases import mlp_reference, rel_error  # noqa: E402
from tests.parity.test_cuda_kernels import run_mlp  # noqa: E402
from tests.parity.trt_library import load  # noqa: E402


def dense_ms(D: int, F: int, gated: bool) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    x = torch.randn(1, D, device="cuda")
    ws = [torch.randn(D, F, device="cuda") for _ in range(3 if gated else 2)]
    for _ in range(3):
        (x @ ws[0]) @ ws[-1].T
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for w in ws[:-1]:
        h = x @ w
    h @ ws[-1].T
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def main():
    lib = load()
    if lib.shadowllm_cuda_device_count() < 1:
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    rng = np.random.default_rng(0)
    for name, D, F in (("smollm2-135m", 576, 1536), ("tinyllama-1.1b", 2048, 5632)):
        for keep in (1.0, 0.5, 0.25):
            v = MLPVariant("silu", True, False, False)
            t = {k: rng.standard_normal(s).astype(np.float32) for k, s in
                 (("x", (1, 1, D)), ("w_in", (F, D)), ("w_gate", (F, D)), ("w_out_t", (F, D)))}
            t["mask"] = rng.random((1, F)) < keep
            expect, magnitude = mlp_reference(t, v)
            y, ms = run_mlp(lib, t, v)
            print(json.dumps({"op": "SparseNeuronMLP", "shape": name, "kept": keep, "rel_error": rel_error(y, expect, magnitude),
                              "kernel_ms": round(ms, 4), "dense_torch_ms": dense_ms(D, F, True)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
