"""`shadowllm bench`: decode speed, prefill latency, memory and the bandwidth bound, per cell.

A cell is (model x backend x policy x head sparsity x neuron sparsity). Every cell of a run is
measured back to back in one process, so ratios between cells are trustworthy on a noisy machine.

Backends: `hf-eager` (the HF model's own forward and cache, dense: the user's default today),
`ort-dense` (our dense export on stock onnxruntime: its own GEMMs through the function bodies, all
units kept), `ort-function` (the same export with masks, function bodies: dense compute x mask),
`ort-native` (the same export with the native C++ kernels: only kept rows are read), `tensorrt`
(where TensorRT and a GPU exist). Policies: `dense`; `random` (masks drawn per layer with exactly
the requested fraction kept, fed as inputs: speed does not depend on which rows are kept); on the
real model also `shadow` (per-sequence predictor at prefill, masks carried in decode) and `dejavu`
(per-layer lookahead every step), whose predictor share of time comes from onnxruntime's profiler
(nodes the exporter named `predictor/...`); `threshold` (activation thresholds, native kernels) at the
sparsities of `threshold_grid`, uniform allocation from a short calibration of the model (the kept
fraction, not which entries, sets the speed), its bound from the entries each decode token of the
timed run kept (counted afterwards on the same tokens by the PyTorch reference).

Per cell: `repeats` rounds, each a greedy run of `tokens` new tokens after a `prompt_tokens` prompt
(after a short warm-up); decode tok/s (median over rounds, spread = max - min), prefill and
time-to-first-token (median), peak RSS of the group's process during the cell (VmHWM, reset before
each group), and the bytes bound of bench/bound.py. A round runs every group of cells once,
so the rounds of all cells interleave over the whole measurement of a model.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shadowllm.models import ShadowError

from .bound import copy_bandwidth, decode_bytes, threshold_bytes
from shadowllm.runtime.ort_backend import OrtBackend

SYNTHETIC = ("tinyllama-1.1b", "opt-1.3b")
REAL = ("smollm2-135m",)


@dataclass
class Row:
    model: str
    backend: str
    policy: str
    head_sparsity: float
    neuron_sparsity: float
    decode_tok_s: float
    decode_spread: float
    prefill_ms: float
    ttft_ms: float
    bound_tok_s: float
    achieved_of_bound: float
    bytes_per_token: int
    peak_rss_mb: float
    predictor_prefill_share: float | None = None
    predictor_decode_share: float | None = None
    decode_op_shares: dict | None = None  # onnxruntime profile of the cell's decode, by op type
    peak_bound_tok_s: float | None = None  # the bound at the run's highest bandwidth reading (strictest)
    achieved_of_peak_bound: float | None = None
    tokens: int = 0
    repeats: int = 0
    prompt_tokens: int = 0
    sparsity: float | None = None  # threshold cells: the runtime sparsity (row of the threshold table)
    weights: str = "fp32"  # the export's projection format (models/quant.py), or a GGUF type (llama.cpp rows)
    activations: str = "fp32"  # the projections' inputs: fp32, or int8 (rounded per block of 32; peers: their own)
    note: str | None = None  # a peer that did not run: why (its figures are then None)


@dataclass
class Plan:
    models: tuple = REAL + SYNTHETIC
    tokens: int = 64
    repeats: int = 3
    prompt_tokens: int = 128
    native_grid: tuple = ((0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (0.5, 0.75), (0.75, 0.75))
    function_grid: tuple = ((0.5, 0.5),)
    threshold_grid: tuple = (0.25, 0.4, 0.5)
    predictor_policies: bool = True
    threads: int | None = None
    peers: bool = True  # llama.cpp (when installed) and onnxruntime MatMulNBits rows, on the real model
    # which weights' cells: fp32 (the exports' own weights) and int4 (SmolLM2: the embedded GGUF's Q4_1
    # blocks; a synthetic model: int4 round-to-nearest in blocks of 32), `--weights`
    weights: tuple = ("fp32", "int4")
    notes: list = field(default_factory=list)

    @classmethod
    def quick(cls) -> "Plan":
        return cls(models=REAL, tokens=16, repeats=2, prompt_tokens=64, native_grid=((0.0, 0.0), (0.5, 0.5)),
                   threshold_grid=(0.5,), predictor_policies=False, peers=False)


# -- measuring ---------------------------------------------------------------------------------

class HFEager:
    """The HF model's own forward and KV cache, dense."""

    name = "hf-eager"

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids, attention_mask, state, last_only: bool = False):
        with torch.inference_mode():
            out = self.model(input_ids, attention_mask=attention_mask, cache=state, use_cache=True,
                             logits_to_keep=1 if last_only else 0)
        return out.logits, out.cache


def _reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run(backend, prompt, tokens: int, state0, generated: list | None = None):
    """(prefill s, time to first token s, decode tok/s, state after the first decode step) of one
    greedy run; that state holds the masks decode runs with (predictor policies pick their own).
    `generated` receives the new token ids."""
    mask = torch.ones_like(prompt)
    start = time.perf_counter()
    # the LM head on the last position only, as generation runs a prompt (runtime/generate.py) and
    # llama.cpp does: time to first token, not the cost of every position's logits
    logits, state = backend.forward(prompt, mask, state0() if state0 else None, last_only=True)
    prefill = time.perf_counter() - start
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    ttft = time.perf_counter() - start
    first_step = state
    start = time.perf_counter()
    steps = [nxt]
    for i in range(tokens):
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        logits, state = backend.forward(nxt, mask, state)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        steps.append(nxt)
        if i == 0:
            first_step = state
    speed = tokens / (time.perf_counter() - start)
    if generated is not None:
        generated[:] = torch.cat(steps, 1)[0].tolist()
    return prefill, ttft, speed, first_step


def measure(backend, prompt, tokens: int, state0=None, generated: list | None = None):
    """(decode tok/s, prefill ms, TTFT ms, state after the first decode step) of one greedy run,
    after a short warm-up run (sessions allocate and pick kernels on their first calls)."""
    _run(backend, prompt, 4, state0)
    prefill, ttft, speed, state = _run(backend, prompt, tokens, state0, generated)
    return speed, prefill * 1e3, ttft * 1e3, state


def profile(folder: Path, sparsity: float, prompt, tokens: int, threads, masks=None) -> dict:
    """onnxruntime's per-node profile of one prefill + `tokens` decode steps (native kernels), each
    node's time attributed to the run (model_run event) it falls in. Returns the share of wall time
    of the `predictor/` nodes at prefill and in decode, and per op type in decode."""
    backend = OrtBackend(folder, sparsity, threads=threads, native=True,
                         profile_prefix=str(Path(folder) / ".bench-profile"))
    _run(backend, prompt, tokens, (lambda: backend.initial_state(1, *masks)) if masks is not None else None)
    trace = Path(backend.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    predictor, by_op = np.zeros(len(runs)), {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = next((k for k, (a, b) in enumerate(runs) if a <= e["ts"] <= b), None)
        if i is None:
            continue
        if e["name"].startswith("predictor/"):
            predictor[i] += e["dur"]
        if i > 0:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0) + e["dur"]
    walls = np.array([b - a for a, b in runs], dtype=float)
    decode_wall = walls[1:].sum() if len(runs) > 1 else float("nan")
    ops = {op: round(t / decode_wall, 4) for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}
    ops["(outside nodes)"] = round(1 - sum(by_op.values()) / decode_wall, 4)
    return {"predictor_prefill": float(predictor[0] / walls[0]),
            "predictor_decode": float(predictor[1:].sum() / decode_wall) if len(runs) > 1 else 0.0,
            "decode_op_shares": ops}


# -- models and exports ------------------------------------------------------------------------

def random_masks(arch: dict, head_sparsity: float, neuron_sparsity: float, seed: int = 0):
    """[1, L, H] / [1, L, F] bool: exactly round((1 - s) * n) units kept in every layer."""
    rng = np.random.default_rng(seed)
    L, H, F = arch["layers"], arch["heads"], arch["neurons"]
    heads, neurons = np.zeros((1, L, H), bool), np.zeros((1, L, F), bool)
    for layer in range(L):
        heads[0, layer, rng.permutation(H)[: H - int(round(head_sparsity * H))]] = True
        neurons[0, layer, rng.permutation(F)[: F - int(round(neuron_sparsity * F))]] = True
    return heads, neurons


def _bench_arch(folder: Path) -> dict:
    from shadowllm.export.folder import weights_format, weights_label

    manifest = json.loads((folder / "shadowllm.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    return dict(manifest["arch"], hidden=config["hidden_size"], gated=manifest["arch"]["family"] != "opt",
                kv_policy=manifest.get("kv_policy", "all"),
                weights=weights_format(manifest), weights_label=weights_label(manifest),
                activations=(manifest.get("weights") or {}).get("activations", "fp32"))


def _cached_export(root: Path, model, tokenizer, policy: str, predictor=None, predictor_dir=None,
                   weights: str = "fp32", label: str | None = None) -> Path:
    """An export of `model` (on the `weights` grid already, models/quant.py), made once. label: what the
    folder name calls the weights (default: their format)."""
    from shadowllm.export.exporter import REVISION, export

    label = label or weights
    folder = root / f"export-{policy}{'' if label == 'fp32' else '-' + label}-v{REVISION}"
    if not (folder / "shadowllm.json").is_file():
        thresholds = _uniform_thresholds(model, tokenizer, root) if policy == "threshold" else None
        export(model, tokenizer, folder, policy, predictor=predictor, predictor_dir=predictor_dir,
               thresholds=thresholds, threshold_source={"allocation": "uniform", "note": "bench calibration"},
               weights=weights)
    return folder


def _uniform_thresholds(model, tokenizer, root: Path):
    """Uniform threshold table from a short calibration (8 windows of 128 tokens, no greedy costs)."""
    from shadowllm.models import adapter_for
    from shadowllm.predictor.thresholds import cached_calibration, threshold_table

    # no PCA rotation: a speed benchmark's kernels and kept counts do not depend on it (the rotation is
    # folded into the weights), and a random-weight model has no principal axes worth fitting
    calib = cached_calibration(root / "thresholds-8x128", model, tokenizer, samples=8, window=128, greedy_windows=0,
                               rotate="none")
    return threshold_table(calib, adapter_for(model).arch, "uniform")


def kept_entries(model, folder: Path, sparsity: float, ids: list, prompt_tokens: int):
    """[4, L]: mean entries of each thresholded input kept per decode token, on the tokens `ids`
    (prompt, then the generated ones), by the PyTorch reference with the export's thresholds."""
    from safetensors.torch import load_file

    from shadowllm.predictor.evaluation import Threshold

    from shadowllm.runtime.policy import export_model

    model = export_model(folder, json.loads((folder / "shadowllm.json").read_text()), model)  # its weight grid
    table = load_file(str(folder / "thresholds.safetensors"))["table"]
    method = Threshold(table, "uniform", "both", sparsity, "per_layer")
    tokens = torch.tensor([ids])
    _, _, observer = method.masks(model, tokens, prompt_tokens)
    with torch.inference_mode():
        from shadowllm.models import sparse_forward

        sparse_forward(model, tokens, observer=observer, thresholds=method.thresholds(model, tokens, prompt_tokens))
    return np.stack([method.kept[k][0].mean(0).numpy() for k in range(4)])


def _load_model(name: str):
    """(model, tokenizer, cache folder for its exports)."""
    from shadowllm.models import fingerprint, load
    from shadowllm.models.loading import cache_root
    from shadowllm.models.tiny import byte_tokenizer, build_synthetic

    if name in SYNTHETIC:
        return build_synthetic(name), byte_tokenizer(), cache_root() / "bench" / f"{name}-seed0"
    model, tokenizer = load(name)
    return model, tokenizer, cache_root() / "bench" / f"{name}-{fingerprint(model).split(':')[1][:12]}"


def _predictors(model, tokenizer, root: Path):
    """The demo's per-sequence ShadowLLM predictor and a DejaVu predictor on the same traces."""
    from shadowllm.predictor.cached import cached_predictors
    from shadowllm.predictor.predictors import load_predictor
    from shadowllm.predictor.train import train

    predictors, _, demo_root = cached_predictors(model, tokenizer, granularities=("sequence",))
    sequence = predictors["sequence"]
    folder = root / "dejavu-token"
    try:
        dejavu = load_predictor(folder, model)
    except ShadowError:
        train(str(demo_root / "traces"), "dejavu", "token", criterion="l2_norm", epochs=20, model=model).save(folder)
        dejavu = load_predictor(folder, model)
    return {"shadow": (sequence, str(demo_root / "shadow-sequence")), "dejavu": (dejavu, str(folder))}


# -- the run -----------------------------------------------------------------------------------

def _sample(samples, model_name, backend_name, policy, hs, ns, backend, prompt, plan, arch, masks=None,
            dense_bytes=False, shares=None, sparsity=None):
    """One measured run of one cell, with the bytes its decode step reads (threshold cells: filled in
    once the kept entries of its tokens are counted)."""
    state0 = (lambda: backend.initial_state(1, *masks)) if masks is not None else None
    generated: list = []
    speed, prefill, ttft, decode_state = measure(backend, prompt, plan.tokens, state0, generated)
    if dense_bytes:
        heads = neurons = None
    elif masks is not None:
        heads, neurons = masks[0][0], masks[1][0]
    else:  # predictor policies: the masks the predictor chose for the first decode step
        heads, neurons = decode_state["heads"].numpy()[0], decode_state["neurons"].numpy()[0]
    kv_policy = "all" if dense_bytes else arch["kv_policy"]
    samples.append(dict(key=(model_name, backend_name, policy, hs, ns, sparsity, arch["weights_label"],
                             arch["activations"]),
                        speed=speed,
                        prefill=prefill,
                        ttft=ttft, rss=_peak_rss_mb(), shares=shares, generated=generated,
                        bytes=None if sparsity is not None else decode_bytes(
                            arch, heads, neurons, plan.prompt_tokens + plan.tokens // 2, kv_policy)))
    what = f"sparsity {sparsity:<4}" if sparsity is not None else f"heads {hs:<4} neurons {ns:<4}"
    print(f"[shadowllm] bench {model_name:<15} {backend_name:<12} {arch['weights_label']:<5} {arch['activations']:<4} "
          f"{policy:<9} {what} "
          f"{speed:7.2f} tok/s, prefill {prefill:.0f} ms", flush=True)


def _peer_sample(samples, model_name, backend_name, weights, backend, prompt, plan, nbytes: int):
    """One measured run of a peer engine (bench/peers.py), dense, with the bytes its weights take."""
    speed, prefill, ttft, _ = measure(backend, prompt, plan.tokens)
    # llama.cpp's quantized types and MatMulNBits at accuracy_level 4 multiply int8-rounded activations
    activations = "fp32" if weights in ("F32", "F16", "fp32") else "int8"
    samples.append(dict(key=(model_name, backend_name, "dense", 0.0, 0.0, None, weights, activations), speed=speed,
                        prefill=prefill,
                        ttft=ttft, rss=_peak_rss_mb(), shares=None, generated=[], bytes=nbytes))
    print(f"[shadowllm] bench {model_name:<15} {backend_name:<12} {weights:<5} dense {speed:7.2f} tok/s, "
          f"prefill {prefill:.0f} ms", flush=True)


def _missing_peer_rows(name: str, plan: Plan) -> list:
    """Rows for the peers that cannot run here, each saying why."""
    from .peers import LLAMA_CPP_TYPES, llama_cpp_missing

    why = llama_cpp_missing()
    if why is None:
        return []
    return [Row(name, "llama.cpp", "dense", 0.0, 0.0, None, None, None, None, None, None, None, None, tokens=plan.tokens,
                prompt_tokens=plan.prompt_tokens, weights=kind, activations="fp32" if kind == "F32" else "int8",
                note=why) for kind in LLAMA_CPP_TYPES]


def _rows(samples: list, plan: Plan) -> list:
    """One row per cell: medians over its rounds, spread = max - min, peak RSS = the highest. Each
    round's bound uses the bandwidth read just before that round's group ran."""
    cells: dict = {}
    for sample in samples:
        cells.setdefault(sample["key"], []).append(sample)
    rows = []
    for (model, backend, policy, hs, ns, sparsity, weights, activations), runs in cells.items():
        speeds = [r["speed"] for r in runs]
        bounds = [r["bandwidth"] / r["bytes"] for r in runs]
        shares = next((r["shares"] for r in runs if r["shares"]), None)
        row = Row(model, backend, policy, hs, ns, round(statistics.median(speeds), 2),
                  round(max(speeds) - min(speeds), 2), round(statistics.median(r["prefill"] for r in runs), 1),
                  round(statistics.median(r["ttft"] for r in runs), 1), round(statistics.median(bounds), 2),
                  round(statistics.median(v / b for v, b in zip(speeds, bounds)), 3), runs[0]["bytes"],
                  round(max(r["rss"] for r in runs), 0),
                  shares["predictor_prefill"] if shares else None, shares["predictor_decode"] if shares else None,
                  shares.get("decode_op_shares") if shares else None, tokens=plan.tokens, repeats=len(runs),
                  prompt_tokens=plan.prompt_tokens, sparsity=sparsity, weights=weights, activations=activations)
        rows.append(row)
    return rows


def _isolated(fn, *args):
    """fn(*args) in a fresh process: each group's peak RSS is its own, not the leftovers of an export
    or of an earlier session, and a crash names the group instead of ending the run silently."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _prepare(name: str, predictor_policies: bool, peers: bool = False, threads: int | None = None,
             weights: tuple = ("fp32", "int4")) -> dict:
    """The exports a model's cells need, made once and cached: {"dense": folder, policy: folder}; with
    peers, the peers' files too: "ort-matmulnbits" and "llama.cpp <type>" (bench/peers.py). weights:
    which cells (Plan.weights); the fp32 dense export is also made for the peers (MatMulNBits quantizes it)."""
    model, tokenizer, root = _load_model(name)
    root.mkdir(parents=True, exist_ok=True)
    folders = {}
    if "fp32" in weights or (peers and name in REAL):
        folders["dense"] = _cached_export(root, model, tokenizer, "dense")
    if "fp32" in weights:
        folders["threshold"] = _cached_export(root, model, tokenizer, "threshold")
        if predictor_policies and name in REAL:
            for policy, (predictor, pdir) in _predictors(model, tokenizer, root).items():
                folders[policy] = _cached_export(root, model, tokenizer, policy, predictor, pdir)
    if "int4" in weights:
        # SmolLM2: the embedded GGUF's own blocks (`--weights gguf`: its Q4_1 codes as they are); a synthetic
        # model has no file of its own: int4 round-to-nearest. int8 activations: the integer decode kernels
        from shadowllm.models.quant import apply_weights

        real = name in REAL
        fmt, _, _ = apply_weights(model, "gguf" if real else "int4", "int8")
        for policy in ("dense", "threshold"):
            folders[f"{policy}-int4"] = _cached_export(root, model, tokenizer, policy, weights=fmt,
                                                       label="gguf" if real else None)
        if real:  # and dense with fp32 activations (the float kernels), to show what the integer products buy
            model._shadowllm_activations = "fp32"
            folders["dense-int4-fp32"] = _cached_export(root, model, tokenizer, "dense", weights=fmt,
                                                        label="gguf-fp32act")
    if peers and name in REAL:
        from shadowllm.models.loading import EMBEDDED, locate_gguf

        from .peers import LLAMA_CPP_TYPES, llama_cpp_file, llama_cpp_missing, matmulnbits_folder

        dense = Path(folders["dense"])
        folders["ort-matmulnbits"] = matmulnbits_folder(dense, root / f"{dense.name}-matmulnbits")
        if llama_cpp_missing() is None:
            for kind in LLAMA_CPP_TYPES:
                folders[f"llama.cpp {kind}"] = llama_cpp_file(locate_gguf(EMBEDDED[name]), kind, root / "gguf", threads)
    return {k: str(v) for k, v in folders.items()}


def _group(name: str, kind: str, folder: str, plan: Plan, prompt, first_round: bool, model=None) -> list:
    """One round of the cells that share one loaded model or session: a sample per cell. The first
    round also profiles (predictor share; op shares of native decode at 50/50)."""
    folder = Path(folder)
    samples: list = []
    _reset_peak_rss()
    if kind.startswith("llama.cpp"):
        from .peers import LlamaCpp, gguf_tensor_bytes

        _peer_sample(samples, name, "llama.cpp", kind.split()[1], LlamaCpp(folder, plan.threads), prompt, plan,
                     gguf_tensor_bytes(folder))
        return samples
    if kind == "ort-matmulnbits":
        from .peers import matmulnbits_bytes

        backend = OrtBackend(folder, 0.0, threads=plan.threads, native=False)
        _peer_sample(samples, name, kind, "int4", backend, prompt, plan, matmulnbits_bytes(folder))
        return samples
    arch = _bench_arch(folder)
    if kind == "hf-eager":
        model = model if model is not None else _load_model(name)[0]
        _sample(samples, name, kind, "dense", 0.0, 0.0, HFEager(model), prompt, plan, arch, dense_bytes=True)
    elif kind in ("ort-dense", "ort-function"):
        grid = ((0.0, 0.0),) if kind == "ort-dense" else plan.function_grid
        backend = OrtBackend(folder, 0.0, threads=plan.threads, native=False)
        for hs, ns in grid:
            _sample(samples, name, kind, "random" if hs or ns else "dense", hs, ns, backend, prompt, plan, arch,
                    random_masks(arch, hs, ns), dense_bytes=True)
    elif kind in ("ort-native", "tensorrt"):
        if kind == "tensorrt":
            from shadowllm.compiler.tensorrt import build_engine

            from shadowllm.runtime.trt_backend import TrtBackend, engine_folder

            try:
                engine_folder(folder)
            except ShadowError:
                build_engine(folder)
            backend = TrtBackend(folder)
        else:
            backend = OrtBackend(folder, 0.0, threads=plan.threads, native=True)
        for hs, ns in plan.native_grid:
            _sample(samples, name, kind, "random" if hs or ns else "dense", hs, ns, backend, prompt, plan, arch,
                    random_masks(arch, hs, ns))
        del backend
        if kind == "ort-native" and first_round and (0.5, 0.5) in plan.native_grid:
            # where the time goes at 50/50: a separate, profiled run
            ops = profile(folder, 0.0, prompt, 8, plan.threads, random_masks(arch, 0.5, 0.5))["decode_op_shares"]
            for sample in samples:
                if sample["key"][3:5] == (0.5, 0.5):
                    sample["shares"] = {"predictor_prefill": None, "predictor_decode": None, "decode_op_shares": ops}
    elif kind == "ort-native-dense":  # the native kernels, dense only (a second export of the same weights)
        backend = OrtBackend(folder, 0.0, threads=plan.threads, native=True)
        _sample(samples, name, "ort-native", "dense", 0.0, 0.0, backend, prompt, plan, arch, random_masks(arch, 0, 0))
    elif kind == "threshold":
        backend = OrtBackend(folder, 0.0, threads=plan.threads, native=True)
        for s in plan.threshold_grid:
            backend.sparsity = np.array(s, dtype=np.float32)  # the table row the graph picks
            _sample(samples, name, "ort-native", "threshold", 0.0, 0.0, backend, prompt, plan, arch, sparsity=s)
        del backend
        model = model if model is not None else _load_model(name)[0]
        for sample in samples:  # the bound: from the entries this run's tokens kept
            kept = kept_entries(model, folder, sample["key"][5], prompt[0].tolist() + sample["generated"][:-1],
                                plan.prompt_tokens)
            sample["bytes"] = threshold_bytes(arch, kept, plan.prompt_tokens + plan.tokens // 2)
    else:  # a predictor policy: its share of time from the profiler (first round), then the timed run
        shares = profile(folder, 0.5, prompt, min(plan.tokens, 16), plan.threads) if first_round else None
        backend = OrtBackend(folder, 0.5, threads=plan.threads, native=True)
        _reset_peak_rss()
        _sample(samples, name, "ort-native", kind, 0.5, 0.5, backend, prompt, plan, arch, shares=shares)
    return samples


def bench_model(name: str, plan: Plan, bandwidth, model=None, tokenizer=None, root: Path | None = None) -> list:
    """Every cell of one model. Rounds: each round runs every group once (a group in its own process:
    its peak RSS is its own), and a cell's figures are medians over the rounds, so a slow spell of a
    shared machine falls on every cell alike instead of on whichever cell was running. With `model`
    given (tests, tiny models) everything runs in this process instead. `bandwidth()` reads the
    machine's bandwidth now (bytes/s); it is called before every group of every round."""
    if model is None:
        folders = _isolated(_prepare, name, plan.predictor_policies, plan.peers, plan.threads, plan.weights)
        run_group = lambda *args: _isolated(_group, *args)  # noqa: E731
    else:
        root.mkdir(parents=True, exist_ok=True)
        folders = {k: str(_cached_export(root, model, tokenizer, k)) for k in ("dense", "threshold")}
        run_group = lambda *args: _group(*args, model=model)  # noqa: E731
    arch = _bench_arch(Path(folders.get("dense") or folders["dense-int4"]))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, arch["vocab"], (1, plan.prompt_tokens), generator=g)
    groups = []
    if "threshold" in folders:  # the fp32 cells
        groups += [(kind, folders["dense"]) for kind in ["hf-eager", "ort-dense"] +
                   (["ort-function"] if plan.function_grid else []) + ["ort-native"]]
        if tensorrt_status() is None:
            groups.append(("tensorrt", folders["dense"]))
        groups += [(policy, folders[policy]) for policy in ("shadow", "dejavu") if policy in folders]
        if plan.threshold_grid:
            groups.append(("threshold", folders["threshold"]))
    if "dense-int4" in folders:  # the same native cells on 4-bit weights
        groups.append(("ort-native", folders["dense-int4"]))
        if "dense-int4-fp32" in folders:
            groups.append(("ort-native-dense", folders["dense-int4-fp32"]))
        if plan.threshold_grid:
            groups.append(("threshold", folders["threshold-int4"]))
    groups += [(kind, folder) for kind, folder in folders.items() if kind.startswith("llama.cpp") or
               kind == "ort-matmulnbits"]  # the peers (bench/peers.py)
    samples = []
    for round_ in range(plan.repeats):
        for kind, folder in groups:
            reading = bandwidth()
            for sample in run_group(name, kind, folder, plan, prompt, round_ == 0):
                samples.append(dict(sample, bandwidth=reading))
    missing = _missing_peer_rows(name, plan) if plan.peers and name in REAL and model is None else []
    return _rows(samples, plan) + missing


def tensorrt_status() -> str | None:
    """None when TensorRT cells can run here, else why not (said in the report)."""
    try:
        from shadowllm.compiler.tensorrt import requirements

        requirements()
    except ShadowError as e:
        return str(e).replace("--target tensorrt: ", "")
    return None


def hold_to_peak(rows: list, peak: float):
    """Also hold every cell to the run's highest bandwidth reading: the strictest bound."""
    for row in rows:
        if row.note:  # a peer that did not run
            continue
        row.peak_bound_tok_s = round(peak / row.bytes_per_token, 2)
        row.achieved_of_peak_bound = round(row.decode_tok_s / row.peak_bound_tok_s, 3)


def run(plan: Plan) -> tuple[list, dict]:
    if plan.threads:
        torch.set_num_threads(plan.threads)
    # Shared machines drift (readings swing between two levels for minutes at a time: docs/performance.md), so
    # bandwidth is read just before every group of every round and each round is held to its own.
    readings = []

    def bandwidth() -> float:
        readings.append(copy_bandwidth(gib=0.5, repeats=3))
        return readings[-1]

    missing = tensorrt_status()
    if missing:
        plan.notes.append(f"tensorrt cells not run: {missing}")
    rows = []
    for name in plan.models:
        rows += bench_model(name, plan, bandwidth)
    hold_to_peak(rows, max(readings))
    gb = sorted(r / 1e9 for r in readings)
    meta = {"bandwidth_gb_s": round(statistics.median(gb), 2),
            "bandwidth_range_gb_s": [round(gb[0], 2), round(gb[-1], 2)], "bandwidth_readings": len(gb),
            "threads": plan.threads or torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "notes": plan.notes}
    import onnxruntime

    meta["onnxruntime"] = onnxruntime.__version__
    return rows, meta
