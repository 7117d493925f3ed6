"""`shadowllm demo`: the most complete end-to-end run the project can do so far, on the default model.

1. load SmolLM2-135M-Instruct (converting the embedded GGUF once) and print its architecture;
2. calibrate (L2 importance on wiki train windows) and train two small ShadowLLM predictors,
   per sequence and per token, or reuse the ones cached by an earlier demo;
3. perplexity on held-out wiki test windows (prompt 128 tokens, the continuation scored) at 50%
   neuron sparsity: dense vs static vs shadow vs gate, through the sparse PyTorch reference;
4. export model + per-token predictor to ONNX (policy shadow, custom sparse ops, cached), answer a
   question on ONNX Runtime at 50% neuron sparsity next to the dense PyTorch answer;
5. the parity report of that export against the PyTorch reference.
"""

from __future__ import annotations

import time

import torch

from shadowllm.models import fingerprint, load
from shadowllm.models.loading import cache_root
from shadowllm.models.errors import ShadowError
from shadowllm.predictor.evaluation import evaluate, rows_table
from shadowllm.predictor.predictors import load_predictor
from shadowllm.predictor.traces import calibrate
from shadowllm.predictor.fixed_masks import static_from_traces
from shadowllm.predictor.train import train
from shadowllm.export.exporter import export
from shadowllm.runtime import TorchBackend, generate
from shadowllm.runtime.ort_backend import OrtBackend
from shadowllm.runtime.parity import check

from .info import architecture_table

PROMPT = "What is the capital of France, and what is it famous for?"


def _heading(text: str):
    print(f"\n== {text}", flush=True)


def _predictors(model, tokenizer, quick: bool):
    """(sequence predictor, token predictor, static scores), trained once and cached per model."""
    samples, window = (24, 128) if quick else (64, 128)
    # v2: traces record head_dim and gated in their arch (older caches would be refused on resume)
    root = cache_root() / "demo" / f"{fingerprint(model).split(':')[1][:12]}-{samples}x{window}-l2_norm-v2"
    traces = root / "traces"
    calibrate(model, tokenizer, traces, ["l2_norm"], samples=samples, window=window, batch_size=4,
              token_positions=16, shard_size=16)
    out = {}
    for gran in ("sequence", "token"):
        folder = root / f"shadow-{gran}"
        try:
            out[gran] = load_predictor(folder, model)
        except ShadowError:
            predictor = train(str(traces), "shadow", gran, criterion="l2_norm", epochs=60 if gran == "sequence" else 20,
                              model=model)
            predictor.save(folder)
            out[gran] = load_predictor(folder, model)
    static, _ = static_from_traces(traces, model, "l2_norm")
    return out["sequence"], out["token"], static, root


def run_demo(model_name: str | None = None, quick: bool = False):
    t0 = time.perf_counter()
    _heading("model")
    model, tokenizer = load(model_name)
    print(architecture_table(model))

    _heading("ShadowLLM predictors (L2 importance on wiki train windows; cached after the first run)")
    p_seq, p_tok, static, root = _predictors(model, tokenizer, quick)
    for p in (p_seq, p_tok):
        m, c = p.manifest["metrics"], p.manifest["cost"]
        print(f"{p.granularity:>8}: held-out Spearman heads {m['heads']['spearman_mean']:.2f}, neurons "
              f"{m['neurons']['spearman_mean']:.2f}; top-50% recall neurons {m['neurons']['topk_recall']['0.5']:.2f}; "
              f"{c['parameters']:,} parameters ({c['parameter_fraction']:.1%} of the blocks), runs {c['runs']}")

    windows = 4 if quick else 8
    _heading(f"perplexity of the continuation on {windows} held-out wiki test windows (128-token prompt + 128)")
    rows = evaluate(model, tokenizer, [p_seq, p_tok], [0.5], ["neurons"], max_windows=windows, window=256,
                    prompt=128, static_scores=static, oracle_criteria=(), lastword=0,
                    methods=["dense", "static", "shadow", "gate"], progress=False)
    print("\n".join(rows_table(rows)))

    deployed = _exported(model, tokenizer, p_tok, root)
    chat = getattr(tokenizer, "chat_template", None)
    prompt = (tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                            add_generation_prompt=True) if chat else PROMPT)
    max_new = 24 if quick else 40
    backends = [("dense, PyTorch", TorchBackend(model)),
                ("ShadowLLM per token on ONNX Runtime, 50% of neurons off", OrtBackend(deployed, sparsity=0.5))]
    for name, backend in backends:
        _heading(f"answer ({name}; greedy, {max_new} tokens): {PROMPT}")
        start = time.perf_counter()
        out = generate(backend, tokenizer, prompt, max_new, on_text=lambda _, d: print(d, end="", flush=True))[0]
        print(f"\n   [{len(out.token_ids)} tokens in {time.perf_counter() - start:.1f} s, finish: {out.finish_reason}]")

    _heading(f"parity of {deployed} (ONNX Runtime) vs the PyTorch reference at sparsity 0.5")
    report = check(deployed, model, tokenizer, sparsity=0.5, steps=8 if quick else 16)
    print("\n".join(line for line in report.table().splitlines() if not line.startswith("present.")))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads")


def _exported(model, tokenizer, predictor, root):
    """The shadow/token export of the demo's predictor (neurons targeted), made once and cached."""
    folder = root / "export-shadow-token"
    if not (folder / "shadowllm.json").is_file():
        _heading("exporting model + predictor to ONNX (policy shadow, granularity token, target neurons)")
        export(model, tokenizer, folder, "shadow", target="neurons", predictor=predictor,
               predictor_dir=str(root / "shadow-token"))
    return folder
