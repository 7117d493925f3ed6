"""`shadowllm demo`: the most complete end-to-end run the project can do, on the default model.

1. load SmolLM2-135M-Instruct (converting the embedded GGUF once) and print its architecture;
2. calibrate and train two small ShadowLLM predictors (per sequence, per token) and calibrate the
   activation thresholds (greedy allocation), or reuse the ones an earlier demo cached;
3. accuracy per byte on held-out wiki test windows (prompt 128 tokens, the continuation scored):
   dense, the head/neuron methods at 50% of neurons, and activation thresholds at two sparsities,
   each with the fraction of block weight bytes it reads per token, through the sparse PyTorch
   reference;
4. export the recommended policy (activation thresholds, greedy allocation; cached) and the per-token
   ShadowLLM predictor, and answer a question on ONNX Runtime with each, next to the dense answer;
5. the parity report of the threshold export against the PyTorch reference.

`--backend cuda` answers and checks the same exports on the GPU's CUDA kernels (bf16 answers, the
fp32 parity of `parity --backend cuda`) instead of ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import time

import torch

from shadowllm.models import adapter_for, load
from shadowllm.predictor.cached import cached_predictors
from shadowllm.predictor.evaluation import evaluate, rows_table
from shadowllm.predictor.thresholds import default_calibration, threshold_table
from shadowllm.export.exporter import REVISION, export
from shadowllm.runtime import TorchBackend, generate
from shadowllm.runtime.generate import chat_prompt
from shadowllm.runtime.ort_backend import OrtBackend
from shadowllm.runtime.parity import check

from .info import architecture_table

PROMPT = "What is the capital of France, and what is it famous for?"
THRESHOLD_SPARSITY = 0.4  # the answered and parity-checked row: 0.6 of the block weight bytes per token


def _heading(text: str):
    print(f"\n== {text}", flush=True)


def run_demo(model_name: str | None = None, quick: bool = False, backend: str = "ort"):
    t0 = time.perf_counter()
    if backend == "cuda":
        from shadowllm.runtime.cuda_kernels import require_cuda

        require_cuda("demo --backend cuda")  # before the minutes of training and calibration
    _heading("model")
    model, tokenizer = load(model_name)
    print(architecture_table(model))

    _heading("ShadowLLM predictors (L2 importance on wiki train windows; cached after the first run)")
    p_seq, p_tok, static, root = cached_predictors(model, tokenizer, quick)
    for p in (p_seq, p_tok):
        m, c = p.manifest["metrics"], p.manifest["cost"]
        print(f"{p.granularity:>8}: held-out Spearman heads {m['heads']['spearman_mean']:.2f}, neurons "
              f"{m['neurons']['spearman_mean']:.2f}; top-50% recall neurons {m['neurons']['topk_recall']['0.5']:.2f}; "
              f"{c['parameters']:,} parameters ({c['parameter_fraction']:.1%} of the blocks), runs {c['runs']}")

    _heading("activation thresholds (|x| histograms of every projection input + greedy allocation costs on wiki "
             "train windows; cached after the first run)")
    calib = default_calibration(model, tokenizer)
    thresholds = threshold_table(calib, adapter_for(model).arch, "greedy")
    print(f"calibrated on {calib.manifest['samples']} windows of {calib.manifest['window']} tokens, inputs in "
          f"their {calib.manifest['rotation']['kind'] if calib.manifest.get('rotation') else 'own'} bases "
          f"({calib.manifest['seconds']:.0f} s when made)")

    windows = 4 if quick else 8
    _heading(f"accuracy per byte: perplexity of the continuation on {windows} held-out wiki test windows "
             "(128-token prompt + 128) and the fraction of block weight bytes each method reads per token")
    rows = evaluate(model, tokenizer, [p_seq, p_tok], [0.5], ["neurons"], max_windows=windows, window=256,
                    prompt=128, static_scores=static, oracle_criteria=(), lastword=0,
                    methods=["dense", "static", "shadow", "gate"], progress=False)
    rows += evaluate(model, tokenizer, [], [0.25, THRESHOLD_SPARSITY], ["both"], max_windows=windows, window=256,
                     prompt=128, lastword=0, methods=["threshold"], progress=False,
                     threshold_tables={"greedy": thresholds[1]}, threshold_model=calib.model_for(model))
    print("\n".join(rows_table(rows)))
    print("Activation thresholds (training-free) give the lowest perplexity for the bytes read: the policy to "
          "deploy (`shadowllm export --policy threshold`).")

    deployed = _exported(calib.model_for(model), tokenizer, root, "threshold", thresholds=thresholds)
    shadow = _exported(model, tokenizer, root, "shadow", predictor=p_tok)
    prompt = chat_prompt(tokenizer, PROMPT) if getattr(tokenizer, "chat_template", None) else PROMPT
    max_new = 24 if quick else 40
    if backend == "cuda":
        from shadowllm.runtime.cuda_backend import CudaBackend, own_copy

        def run(folder, sparsity):
            return CudaBackend.from_export(folder, sparsity, dtype="bf16", model=own_copy(model))
        where = "the GPU's CUDA kernels (bf16)"
    else:
        def run(folder, sparsity):
            return OrtBackend(folder, sparsity=sparsity)
        where = "ONNX Runtime"
    backends = [("dense, PyTorch", TorchBackend(model)),
                (f"activation thresholds on {where}, sparsity {THRESHOLD_SPARSITY}", run(deployed, THRESHOLD_SPARSITY)),
                (f"ShadowLLM per token on {where}, 50% of neurons off", run(shadow, 0.5))]
    for name, runner in backends:  # not `backend`: that names the demo's --backend, read below
        _heading(f"answer ({name}; greedy, {max_new} tokens): {PROMPT}")
        start = time.perf_counter()
        out = generate(runner, tokenizer, prompt, max_new, on_text=lambda _, d: print(d, end="", flush=True))[0]
        print(f"\n   [{len(out.token_ids)} tokens in {time.perf_counter() - start:.1f} s, finish: {out.finish_reason}]")

    _heading(f"parity of {deployed} ({where}) vs the PyTorch reference at sparsity {THRESHOLD_SPARSITY}")
    if backend == "cuda":
        from shadowllm.runtime.parity_cuda import check_cuda

        report = check_cuda(deployed, model, tokenizer, sparsity=THRESHOLD_SPARSITY, steps=8 if quick else 16)
    else:
        report = check(deployed, model, tokenizer, sparsity=THRESHOLD_SPARSITY, steps=8 if quick else 16)
    print("\n".join(line for line in report.table().splitlines() if not line.startswith("present.")))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads")



def _exported(model, tokenizer, root, policy, predictor=None, thresholds=None):
    """The demo's export of `policy` (shadow: the per-token predictor, neurons targeted; threshold: the
    greedy table), made once and cached; a threshold export is keyed by its table too, so a new
    calibration (or allocation) is exported anew instead of the old table being reused."""
    table = "" if thresholds is None else "-" + hashlib.sha256(thresholds[1].numpy().tobytes()).hexdigest()[:12]
    folder = root / f"export-{policy}-v{REVISION}{table}"
    if not (folder / "shadowllm.json").is_file():
        _heading(f"exporting model{' + predictor' if predictor else ''} to ONNX (policy {policy})")
        export(model, tokenizer, folder, policy, target="neurons", predictor=predictor,
               predictor_dir=str(root / "shadow-token") if predictor else None, thresholds=thresholds,
               threshold_source={"calibration": "built-in", "allocation": "greedy"} if thresholds else None)
    return folder
