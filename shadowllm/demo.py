"""`shadowllm demo`: the whole story on the default model, in about three minutes from an empty cache.

1. load SmolLM2-135M-Instruct (converting the embedded GGUF once) and print its architecture;
2. train a small per-token ShadowLLM predictor (once, cached) and say what its measured recall means;
3. the activation-threshold calibration: shipped with the package for the embedded model (computed by
   this project's own `calibrate`, checked against the model's fingerprint), made and cached otherwise;
4. accuracy per byte on a few held-out wiki test windows (prompt 128 tokens, the continuation
   scored): dense, the per-token predictor and the gate baseline at 50% of neurons, thresholds at
   two sparsities, each with the fraction of block weight bytes it reads per token (cached: the
   same inputs give the same rows);
5. export the recommended policy (activation thresholds, greedy allocation; cached) and answer a
   question with it on ONNX Runtime, next to the dense answer and the per-token ShadowLLM answer
   (on the PyTorch reference: the policy that is not recommended is not exported);
6. the parity report of the threshold export against the PyTorch reference (run every time);
7. what each stage cost, in seconds.

`--backend cuda` answers and checks on the GPU's CUDA kernels (bf16 answers, the fp32 parity of
`parity --backend cuda`) instead of ONNX Runtime. The full-size versions of each step (640-window
calibrations, 16-window evaluations, every policy exported) are `shadowllm calibrate / eval /
export` (docs/usage.md).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from shadowllm.export.exporter import REVISION, predictor_fingerprint
from shadowllm.models import ShadowError, adapter_for, fingerprint, load
from shadowllm.models.paths import atomic_folder
from shadowllm.parity.check import check
from shadowllm.predictor.cached import DEMO, QUICK, cached_predictors
from shadowllm.predictor.evaluation import Row, evaluate, rows_table
from shadowllm.predictor.thresholds import BUILTIN, builtin_name, default_calibration, threshold_table
from shadowllm.runtime import TorchBackend, generate
from shadowllm.runtime.generate import chat_prompt
from shadowllm.runtime.memory import release_memory
from shadowllm.runtime.ort_backend import OrtBackend

from .info import architecture_table

PROMPT = "What is the capital of France, and what is it famous for?"
THRESHOLD_SPARSITY = 0.4  # the answered and parity-checked row: 0.6 of the block weight bytes per token
NEURON_SPARSITY = 0.5  # the per-token ShadowLLM answer


class Stages:
    """Times each stage of the demo and prints the table at the end: where the seconds went, and the
    process's peak memory (RSS) by the end of each stage."""

    def __init__(self):
        self.start, self.rows = time.perf_counter(), []

    @contextmanager
    def __call__(self, name: str, heading: str):
        print(f"\n== {heading}", flush=True)
        start = time.perf_counter()
        yield
        release_memory()  # what the stage dropped goes back to the OS, not under the next stage's peak
        seconds = time.perf_counter() - start
        self.rows.append((name, seconds, _peak_rss_gib()))
        print(f"   [{name}: {seconds:.1f} s]", flush=True)

    def table(self) -> str:
        total = time.perf_counter() - self.start
        lines = [f"{'stage':<24}{'seconds':>9}{'peak RSS (GiB)':>16}"]
        lines += [f"{name:<24}{s:>9.1f}{rss:>16.2f}" for name, s, rss in self.rows]
        lines.append(f"{'total (with start-up)':<24}{total:>9.1f}{_peak_rss_gib():>16.2f}")
        return "\n".join(lines)


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_demo(model_name: str | None = None, quick: bool = False, backend: str = "ort"):
    stage = Stages()
    if backend == "cuda":
        from shadowllm.runtime.cuda_kernels import require_cuda

        require_cuda("demo --backend cuda")  # before the minutes of training
    with stage("model", "model (the embedded GGUF is converted to a Hugging Face folder once)"):
        model, tokenizer = load(model_name)
        print(architecture_table(model))

    with stage("predictor", "ShadowLLM predictor, per token (L2 importance on wiki train windows; cached)"):
        predictors, static, root = cached_predictors(model, tokenizer, QUICK if quick else DEMO, ("token",))
        predictor = predictors["token"]
        m, c = predictor.manifest["metrics"], predictor.manifest["cost"]
        recall = m["neurons"]["topk_recall"]["0.5"]
        print(f"held-out Spearman heads {m['heads']['spearman_mean']:.2f}, neurons {m['neurons']['spearman_mean']:.2f}; "
              f"top-50% recall neurons {recall:.2f}; {c['parameters']:,} parameters "
              f"({c['parameter_fraction']:.1%} of the blocks), run every token")

    with stage("thresholds", "activation thresholds (rotated bases, |x| histograms, greedy allocation costs)"):
        calib = default_calibration(model, tokenizer)
        thresholds = threshold_table(calib, adapter_for(model).arch, "greedy")
        shipped = (BUILTIN / builtin_name(model)).is_dir()
        rotation = calib.manifest["rotation"]["kind"] if calib.manifest.get("rotation") else "own"
        print(f"{'shipped with the package for this model (fingerprint matched)' if shipped else 'calibrated'}: "
              f"{calib.manifest['samples']} wiki train windows of {calib.manifest['window']} tokens, greedy costs "
              f"on {calib.manifest['greedy_windows']}, inputs in {rotation} bases "
              f"({calib.manifest['seconds']:.0f} s to make)")

    windows = 2 if quick else 4
    with stage("accuracy", f"accuracy per byte: perplexity of the continuation on {windows} held-out wiki test "
                           "windows (128-token prompt + 128) and the fraction of block weight bytes read per token"):
        rows = _accuracy(model, tokenizer, predictor, static, thresholds, calib, windows, root)
        print("\n".join(rows_table(rows)))
        print(f"({windows} windows rank methods roughly; docs/results/pareto-smollm2-135m.md has the 16-window "
              "protocol.) Activation thresholds (training-free) give the lowest perplexity for the bytes read: the "
              "policy to deploy (`shadowllm export --policy threshold`).")

    with stage("export", "export of the threshold policy to ONNX with the sparse custom ops (cached)"):
        calib = None  # and with it the rotated copy of the model
        deployed = _exported(model_name, root, thresholds)

    prompt = chat_prompt(tokenizer, PROMPT) if getattr(tokenizer, "chat_template", None) else PROMPT
    max_new = 24 if quick else 32
    if backend == "cuda":
        from shadowllm.runtime.cuda_backend import CudaBackend, own_copy

        where = "the GPU's CUDA kernels (bf16)"
        deployed_runner = CudaBackend.from_export(deployed, THRESHOLD_SPARSITY, dtype="bf16", model=own_copy(model))
        shadow_runner = CudaBackend(model, predictor=predictor, neuron_sparsity=NEURON_SPARSITY, dtype="bf16")
    else:
        where = "ONNX Runtime"
        deployed_runner = OrtBackend(deployed, sparsity=THRESHOLD_SPARSITY)
        shadow_runner = TorchBackend(model, predictor=predictor, neuron_sparsity=NEURON_SPARSITY)
    answers = [("dense, PyTorch", TorchBackend(model), None),
               (f"activation thresholds on {where}, sparsity {THRESHOLD_SPARSITY}", deployed_runner, None),
               (f"ShadowLLM per token, {NEURON_SPARSITY:.0%} of neurons off, "
                f"{'CUDA kernels' if backend == 'cuda' else 'PyTorch reference'}", shadow_runner,
                f"The predictor keeps {recall:.0%} of the neurons that matter most to each token (held-out top-50% "
                "recall). A 135M model has little redundancy to spare: the neurons it misses carry facts, so "
                "expect fluent text with invented details — why the demo recommends thresholds "
                "(docs/research/predictors.md).")]
    with stage("answers", f"answers (greedy, {max_new} tokens): {PROMPT}"):
        for name, runner, note in answers:
            print(f"\n-- {name}" + (f"\n   ({note})" if note else ""), flush=True)
            start = time.perf_counter()
            out = generate(runner, tokenizer, prompt, max_new, on_text=lambda _, d: print(d, end="", flush=True))[0]
            print(f"\n   [{len(out.token_ids)} tokens in {time.perf_counter() - start:.1f} s, finish: {out.finish_reason}]")
        answers = deployed_runner = shadow_runner = None  # parity opens its own session

    steps = 8  # a demonstration; `shadowllm parity DIR` checks 32 steps by default
    with stage("parity", f"parity of the threshold export ({where}) vs the PyTorch reference at sparsity "
                         f"{THRESHOLD_SPARSITY}, {steps} greedy steps"):
        if backend == "cuda":
            from shadowllm.parity.cuda import check_cuda

            report = check_cuda(deployed, model, tokenizer, sparsity=THRESHOLD_SPARSITY, steps=steps)
        else:
            report = check(deployed, model, tokenizer, sparsity=THRESHOLD_SPARSITY, steps=steps)
        print("\n".join(line for line in report.table().splitlines() if not line.startswith("present.")))

    print(f"\n== where the time went ({torch.get_num_threads()} threads)\n{stage.table()}")


def _accuracy(model, tokenizer, predictor, static, thresholds, calib, windows: int, root) -> list[Row]:
    """The demo's accuracy rows, computed once per (model, predictor, threshold table, windows) and
    cached beside the predictors: the same inputs give the same rows."""
    key = hashlib.sha256(f"{fingerprint(model)}|{predictor_fingerprint(predictor)}|{windows}|"
                         f"{THRESHOLD_SPARSITY}|{NEURON_SPARSITY}".encode() + thresholds[1].numpy().tobytes())
    folder = root / f"accuracy-{key.hexdigest()[:16]}"
    if (folder / "rows.json").is_file():
        return [Row(**r) for r in json.loads((folder / "rows.json").read_text())]
    rows = evaluate(model, tokenizer, [predictor], [NEURON_SPARSITY], ["neurons"], max_windows=windows, window=256,
                    prompt=128, static_scores=static(), oracle_criteria=(), lastword=0,
                    methods=["dense", "static", "shadow", "gate"], progress=False)
    rows += evaluate(model, tokenizer, [], [0.25, THRESHOLD_SPARSITY], ["both"], max_windows=windows, window=256,
                     prompt=128, lastword=0, methods=["threshold"], progress=False,
                     threshold_tables={"greedy": thresholds[1]}, threshold_model=calib.model_for(model))
    with atomic_folder(folder) as tmp:
        (tmp / "rows.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    return rows


def _exported(model_name, root, thresholds):
    """The demo's threshold export, made once by the command a user runs (`shadowllm export --policy
    threshold`: the built-in calibration, greedy allocation — the table the demo evaluated) and cached,
    keyed by its table too, so a new calibration is exported anew instead of the old one reused. It
    runs as its own process: the exporter keeps what it traced alive in the process that called it
    (about 1 GB for SmolLM2, the rotated model's weights), which the parity check would stack on."""
    table = hashlib.sha256(thresholds[1].numpy().tobytes()).hexdigest()[:12]
    folder = root / f"export-threshold-v{REVISION}-{table}"
    if not (folder / "shadowllm.json").is_file():
        command = ["shadowllm", "export", *([str(model_name)] if model_name else []), "--policy", "threshold",
                   "--out", str(folder)]
        print("$ " + " ".join(command), flush=True)
        run = subprocess.run([sys.executable, "-m", *command])
        if run.returncode != 0:
            raise ShadowError(f"`{' '.join(command)}` failed (exit {run.returncode}); its error is above")
    print(folder)
    return folder
