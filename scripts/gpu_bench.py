"""GPU kernel benchmark of both ops (the CUDA kernels behind the TensorRT plugins and the CUDA
backend), through the library's device-pointer C ABI, against the HBM bound and cuBLAS.

Per row (op, shape, dtype, path, kept fraction, batch, context): the median of >= 20 CUDA-event
timings of one launch, L2 flushed before each by reading 512 MB (> 8x the H200's 60 MB L2; a read,
not a write, so that the timed launch does not pay for writing back someone else's dirty lines); the bytes
the launch must read (kept / needed weight rows, the union over a batch's rows; for attention also
the K/V of the needed kv heads) over the device-to-device copy bandwidth measured in the same run
(bytes read + written / time, as the issue's 4.26 TB/s); cuBLAS dense (torch matmuls of the same
step; attention: cuBLAS projections + SDPA over the cache) and cuBLAS on compacted weights (the kept
rows gathered beforehand, untimed) beside it. Each row also checks the kernel's output against an
fp32 torch computation of the same step (max |error| / max |reference|).

First a sweep of the launch-shape knobs (shadowllm_cuda_set_tuning) on three sentinel rows; the
best value of each knob is kept for the table.

    python3 scripts/gpu_bench.py --out docs/results      # writes gpu-kernels.json and gpu-kernels.md
Needs torch with CUDA, the shadowllm package importable and build/libshadowllm_trt_plugins.so (or
$SHADOWLLM_TRT_PLUGINS).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # hidden D, FFN F, heads H, kv heads G, head dim E
    "tinyllama-1.1b": dict(D=2048, F=5632, H=32, G=4, E=64),
    "llama-2-7b": dict(D=4096, F=11008, H=32, G=32, E=128),
    "llama-3-8b": dict(D=4096, F=14336, H=32, G=8, E=128),
}
DTYPES = {"fp32": (torch.float32, 0), "fp16": (torch.float16, 1), "bf16": (torch.bfloat16, 2)}
SILU = 3
I32 = ctypes.c_int32


def load_library() -> ctypes.CDLL:
    """The kernels' C ABI as the CUDA backend binds it, plus the launch-shape knobs this sweeps."""
    from shadowllm.runtime.cuda_kernels import library

    lib = library()
    lib.shadowllm_cuda_set_tuning.argtypes = [I32] * 4
    return lib


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def check(lib, rc: int):
    if rc != 0:
        raise RuntimeError(lib.shadowllm_cuda_last_error().decode())


class Timer:
    def __init__(self, reps: int, profile: bool = False):
        self.reps = reps
        self.profile = profile
        self.flush = torch.ones(128 << 20, dtype=torch.float32, device="cuda")

    def flush_l2(self):
        self.flush.max()  # reads 512 MB: the L2 ends up holding clean lines of this buffer only

    def kernels(self, fn) -> dict | None:
        """Per kernel name, its mean device time in us over the timed launches (torch.profiler, CUPTI),
        when profiling was asked for."""
        if not self.profile:
            return None
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                self.flush_l2()
                fn()
            torch.cuda.synchronize()
        out = {}
        for e in prof.key_averages():
            total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            if total and "reduce" not in e.key.lower():
                out[e.key[:90]] = round(total / 10, 2)
        return out

    def median_ms(self, fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush_l2()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read and written."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timer.median_ms(lambda: b.copy_(a))
    return 2 * (2 << 30) / (ms * 1e-3)


def rel(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def quantile(values: torch.Tensor, q: float) -> float:
    v = values.float().abs().flatten()
    return float(v.kthvalue(max(1, min(v.numel(), int(round(q * v.numel()))))).values) if q > 0 else 0.0


# ---------------------------------------------------------------- SparseNeuronMLP
def mlp_row(lib, timer, bw, shape, dtype, path, kept, batch, seed=0):
    D, Fd = SHAPES[shape]["D"], SHAPES[shape]["F"]
    tdt, code = DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s, scale=0.02: (torch.randn(*s, device="cuda", generator=g) * scale).to(tdt)  # noqa: E731
    w_in, w_gate, w_out_t = rnd(Fd, D), rnd(Fd, D), rnd(Fd, D)
    x = rnd(batch, 1, D, scale=1.0)
    esize = x.element_size()
    xf = x.float().view(batch, D)
    t_x = t_h = None
    if path == "mask":
        mask = torch.rand(batch, Fd, device="cuda", generator=g) < kept
        if kept >= 1.0:
            mask[:] = True
        union = mask.any(0)
        read_bytes = int(union.sum()) * 3 * D * esize
        wi, wg = w_in, w_gate
        xt = xf
    else:  # thresholds: kept x channels' rows of the channel-major gate/up, kept neurons' w_out_t rows
        mask = torch.ones(batch, Fd, dtype=torch.bool, device="cuda")
        t_x = quantile(xf, 1 - kept)
        xt = torch.where(xf.abs() >= t_x, xf, torch.zeros_like(xf))
        h = F.silu(xt @ w_gate.float().T) * (xt @ w_in.float().T)
        t_h = quantile(h, 1 - kept)
        kept_x = int((xt != 0).any(0).sum())
        kept_h = int((h.abs() >= t_h).any(0).sum())
        read_bytes = (2 * kept_x * Fd + kept_h * D) * esize
        wi, wg = w_in.T.contiguous(), w_gate.T.contiguous()
    # fp32 reference of the same step
    h = F.silu(xt @ w_gate.float().T) * (xt @ w_in.float().T) * mask.float()
    if t_h is not None:
        h = torch.where(h.abs() >= t_h, h, torch.zeros_like(h))
    reference = h @ w_out_t.float()
    y = torch.empty_like(x)
    workspace = torch.zeros(lib.shadowllm_cuda_mlp_workspace_bytes(batch, 1, D, Fd, int(path == "threshold")),
                            dtype=torch.uint8, device="cuda")
    tx = None if t_x is None else torch.tensor([t_x], dtype=torch.float32, device="cuda")
    th = None if t_h is None else torch.tensor([t_h], dtype=torch.float32, device="cuda")
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def launch():
        check(lib, lib.shadowllm_cuda_mlp_launch(ptr(x), ptr(wi), None, ptr(wg), ptr(w_out_t), None, ptr(mask),
                                                 ptr(tx), ptr(th), int(path == "threshold"), ptr(y), batch, 1, D, Fd,
                                                 SILU, code, ptr(workspace), 1, stream))

    kernel_ms = timer.median_ms(launch)
    kernels = timer.kernels(launch) if batch in (1, 8) and kept == 0.5 else None
    error = rel(y.view(batch, D), reference)
    x2 = x.view(batch, D)
    dense_ms = timer.median_ms(lambda: (F.silu(x2 @ w_gate.T) * (x2 @ w_in.T)) @ w_out_t)
    compact_ms = None
    if path == "mask":
        idx = union.nonzero().flatten()
        ci, cg, co = w_in[idx].contiguous(), w_gate[idx].contiguous(), w_out_t[idx].contiguous()
        compact_ms = timer.median_ms(lambda: (F.silu(x2 @ cg.T) * (x2 @ ci.T)) @ co)
    bound_ms = read_bytes / bw * 1e3
    return dict(op="SparseNeuronMLP", shape=shape, dtype=dtype, path=path, kept=kept, batch=batch, context=None,
                kernel_ms=kernel_ms, bound_ms=bound_ms, fraction_of_bound=bound_ms / kernel_ms,
                cublas_dense_ms=dense_ms, cublas_compact_ms=compact_ms, read_bytes=read_bytes, max_rel_error=error,
                kernels_us=kernels)


# ---------------------------------------------------------------- SparseHeadAttention
def rope(t, cos, sin):
    half = t.shape[-1] // 2
    t1, t2 = t[..., :half], t[..., half:]
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)


def attention_row(lib, timer, bw, shape, dtype, kept, batch, context, seed=0):
    s = SHAPES[shape]
    D, H, G, E = s["D"], s["H"], s["G"], s["E"]
    P, per = context, s["H"] // s["G"]
    tdt, code = DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *sh, scale=0.02: (torch.randn(*sh, device="cuda", generator=g) * scale).to(tdt)  # noqa: E731
    w_q, w_k, w_v, w_o_t = rnd(H * E, D), rnd(G * E, D), rnd(G * E, D), rnd(H * E, D)
    x = rnd(batch, 1, D, scale=1.0)
    capacity = P + 16
    k_cache, v_cache = rnd(batch, G, capacity, E, scale=1.0), rnd(batch, G, capacity, E, scale=1.0)
    k_before, v_before = k_cache.float().clone(), v_cache.float().clone()
    attention_mask = torch.ones(batch, P + 1, dtype=torch.int64, device="cuda")
    position_ids = torch.full((batch, 1), P, dtype=torch.int64, device="cuda")
    inv = 1.0 / (10000 ** (torch.arange(0, E, 2, device="cuda").float() / E))
    angles = torch.arange(capacity, device="cuda").float()[:, None] * inv[None, :]
    cos, sin = angles.cos().to(tdt), angles.sin().to(tdt)
    head_mask = torch.rand(batch, H, device="cuda", generator=g) < kept
    head_mask[:, 0] = True
    if kept >= 1.0:
        head_mask[:] = True
    groups = head_mask.view(batch, G, per).any(-1)  # [B, G] needed kv heads
    esize = x.element_size()
    union_heads, union_groups = int(head_mask.any(0).sum()), int(groups.any(0).sum())
    read_bytes = (2 * union_heads * E * D + 2 * union_groups * E * D + int(groups.sum()) * 2 * (P + 1) * E) * esize
    y = torch.empty_like(x)
    workspace = torch.zeros(lib.shadowllm_cuda_attention_workspace_bytes(batch, 1, D, H, G, E), dtype=torch.uint8,
                            device="cuda")
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def launch():
        check(lib, lib.shadowllm_cuda_attention_launch(
            ptr(x), ptr(w_q), None, ptr(w_k), None, ptr(w_v), None, ptr(w_o_t), None, ptr(k_cache), ptr(v_cache),
            ptr(attention_mask), ptr(position_ids), ptr(cos), ptr(sin), capacity, ptr(head_mask), None, None,
            ptr(y), ptr(k_cache), ptr(v_cache), batch, 1, D, P, H, G, E, capacity, E ** -0.5, 1, 1, code,
            ptr(workspace), 1, stream, None, 0))

    kernel_ms = timer.median_ms(launch)
    kernels = timer.kernels(launch) if kept == 0.5 and batch == 1 else None
    # fp32 reference of the same step
    xf = x.float().view(batch, D)
    c, sn = cos.float()[P], sin.float()[P]
    q = rope((xf @ w_q.float().T).view(batch, H, E), c, sn)
    k_new = rope((xf @ w_k.float().T).view(batch, G, E), c, sn)
    v_new = (xf @ w_v.float().T).view(batch, G, E)
    keys, values = k_before[:, :, :P + 1].clone(), v_before[:, :, :P + 1].clone()
    keys[:, :, P], values[:, :, P] = k_new, v_new
    keys, values = keys.repeat_interleave(per, 1), values.repeat_interleave(per, 1)  # [B, H, T, E]
    probs = torch.softmax(torch.einsum("bhe,bhte->bht", q, keys) * E ** -0.5, -1)
    ctx = torch.einsum("bht,bhte->bhe", probs, values) * head_mask[..., None].float()
    reference = ctx.reshape(batch, H * E) @ w_o_t.float()
    error = rel(y.view(batch, D), reference)

    x2 = x.view(batch, D)
    c16, s16 = cos[P], sin[P]

    def dense_step():
        qd = rope((x2 @ w_q.T).view(batch, H, 1, E), c16, s16)
        kd = rope((x2 @ w_k.T).view(batch, G, E), c16, s16)
        k_cache[:, :, P] = kd
        v_cache[:, :, P] = (x2 @ w_v.T).view(batch, G, E)
        o = F.scaled_dot_product_attention(qd, k_cache[:, :, :P + 1], v_cache[:, :, :P + 1], enable_gqa=True)
        return o.reshape(batch, H * E) @ w_o_t

    dense_ms = timer.median_ms(dense_step)
    bound_ms = read_bytes / bw * 1e3
    return dict(op="SparseHeadAttention", shape=shape, dtype=dtype, path="mask", kept=kept, batch=batch,
                context=P, kernel_ms=kernel_ms, bound_ms=bound_ms, fraction_of_bound=bound_ms / kernel_ms,
                cublas_dense_ms=dense_ms, cublas_compact_ms=None, read_bytes=read_bytes, max_rel_error=error,
                kernels_us=kernels)


# ---------------------------------------------------------------- sweep, table, report
KNOBS = {"gather_ctas_per_sm": [4, 8, 16], "rowdot_warps_per_sm": [32, 64], "attend_ctas_per_sm": [2, 4, 8],
         "attend_min_keys": [128, 256, 512]}
DEFAULTS = {"gather_ctas_per_sm": 4, "rowdot_warps_per_sm": 64, "attend_ctas_per_sm": 4, "attend_min_keys": 128}


def set_tuning(lib, knobs: dict):
    lib.shadowllm_cuda_set_tuning(knobs["gather_ctas_per_sm"], knobs["rowdot_warps_per_sm"],
                                  knobs["attend_ctas_per_sm"], knobs["attend_min_keys"])


def sentinels(lib, timer, bw) -> list[float]:
    return [mlp_row(lib, timer, bw, "llama-3-8b", "bf16", "mask", 0.5, 1)["kernel_ms"],
            mlp_row(lib, timer, bw, "llama-3-8b", "bf16", "mask", 0.25, 1)["kernel_ms"],
            mlp_row(lib, timer, bw, "llama-3-8b", "bf16", "mask", 0.5, 8)["kernel_ms"],
            attention_row(lib, timer, bw, "llama-3-8b", "bf16", 0.5, 1, 4096)["kernel_ms"]]


def sweep(lib, timer, bw):
    best, log = dict(DEFAULTS), []
    for knob, values in KNOBS.items():
        times = {}
        for value in values:
            set_tuning(lib, {**best, knob: value})
            parts = sentinels(lib, timer, bw)
            times[value] = sum(parts)
            log.append(dict(knob=knob, value=value, sentinel_ms=times[value], parts_ms=parts))
            print(f"sweep {knob}={value}: {times[value]:.4f} ms {parts}", flush=True)
        best[knob] = min(times, key=times.get)
    set_tuning(lib, best)
    return best, log


def table(lib, timer, bw):
    rows = []
    shapes = list(SHAPES)
    for shape in shapes:
        for kept in (1.0, 0.5, 0.25):
            rows.append(mlp_row(lib, timer, bw, shape, "bf16", "mask", kept, 1))
        for kept in (0.5, 0.25):
            rows.append(mlp_row(lib, timer, bw, shape, "bf16", "threshold", kept, 1))
    for shape in ("llama-2-7b", "llama-3-8b"):
        for batch in (4, 8):
            rows.append(mlp_row(lib, timer, bw, shape, "bf16", "mask", 0.5, batch))
    for dtype in ("fp16", "fp32"):
        rows.append(mlp_row(lib, timer, bw, "llama-3-8b", dtype, "mask", 0.5, 1))
    for shape in shapes:
        for context in (1024, 4096):
            for kept in (1.0, 0.5):
                rows.append(attention_row(lib, timer, bw, shape, "bf16", kept, 1, context))
    for shape in ("llama-2-7b", "llama-3-8b"):
        rows.append(attention_row(lib, timer, bw, shape, "bf16", 0.5, 4, 1024))
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def markdown(report: dict) -> str:
    out = [f"# CUDA kernels on {report['device']}", "",
           f"`{report['command']}` — median of {report['reps']} CUDA-event timings per cell, L2 flushed before "
           f"each; bound = bytes the launch must read / copy bandwidth measured in the same run "
           f"({report['copy_tb_s']:.2f} TB/s, read + written). Knobs: {report['tuning']}.", "",
           "| op | shape | dtype | path | kept | batch | context | ours ms | bound ms | of bound | cuBLAS dense ms "
           "| x dense | cuBLAS compacted ms | x compacted | max rel err |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        compact = r["cublas_compact_ms"]
        compact_cells = ("", "") if compact is None else (f"{compact:.4f}", f"{compact / r['kernel_ms']:.2f}")
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['path']} | {r['kept']:.2f} | {r['batch']} | "
                   f"{r['context'] or ''} | {r['kernel_ms']:.4f} | {r['bound_ms']:.4f} | {r['fraction_of_bound']:.2f} | "
                   f"{r['cublas_dense_ms']:.4f} | {r['cublas_dense_ms'] / r['kernel_ms']:.2f} | "
                   f"{compact_cells[0]} | {compact_cells[1]} | {r['max_rel_error']:.1e} |")
    out += ["", "Sweep (medians of the sentinel rows, llama-3-8b bf16: MLP 50% and 25% at batch 1, MLP 50% at batch 8, "
            "attention 50% heads P 4096; a knob at a time, the others at their best so far):", "",
            "| knob | value | sum ms | MLP 50% | MLP 25% | MLP 50% b8 | attention |", "|---|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {s['knob']} | {s['value']} | {s['sentinel_ms']:.4f} | " + " | ".join(f"{p:.4f}" for p in s["parts_ms"])
            + " |" for s in report["sweep"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel device times (torch.profiler) on some rows")
    ap.add_argument("--single", action="store_true",
                    help="only two rows (llama-3-8b bf16 batch 1: MLP 50%%, attention 50%% heads P 4096), for ncu")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible to torch", file=sys.stderr)
        return 2
    lib = load_library()
    timer = Timer(args.reps)
    bw = copy_bandwidth(timer)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    started = time.time()
    if args.single:
        for row in (mlp_row(lib, timer, bw, "llama-3-8b", "bf16", "mask", 0.5, 1),
                    attention_row(lib, timer, bw, "llama-3-8b", "bf16", 0.5, 1, 4096)):
            print(json.dumps(row))
        return 0
    best, log = (dict(DEFAULTS), []) if args.no_sweep else sweep(lib, timer, bw)
    timer.profile = args.profile
    rows = table(lib, timer, bw)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_tb_s=bw / 1e12, reps=args.reps,
                  command="python3 scripts/gpu_bench.py --out docs/results", tuning=best, sweep=log, rows=rows,
                  seconds=time.time() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-kernels.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "gpu-kernels.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
