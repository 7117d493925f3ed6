"""`shadowllm demo`: the most complete end-to-end run the project can do so far, on the default model.

1. load SmolLM2-135M-Instruct (converting the embedded GGUF once) and print its architecture;
2. rank heads and neurons by L2 magnitude on a few wiki training windows (the `static` policy);
3. perplexity on held-out wiki test windows: dense vs static and random masks, through the sparse
   PyTorch reference (masked heads and neurons are skipped, not zeroed);
4. the same question answered densely and with static masks, streamed side by side.
"""

from __future__ import annotations

import time

import torch

from shadowllm.models import adapter_for, corpus, load
from shadowllm.predictor import fixed_masks, perplexity
from shadowllm.predictor.fixed_masks import describe, static_scores
from shadowllm.runtime import TorchBackend, generate

from .info import architecture_table

PROMPT = "What is the capital of France, and what is it famous for?"


def _heading(text: str):
    print(f"\n== {text}")


def run_demo(model_name: str | None = None, quick: bool = False):
    t0 = time.perf_counter()
    _heading("model")
    model, tokenizer = load(model_name)
    print(architecture_table(model))

    n_windows, length = (4, 128) if quick else (8, 256)
    _heading(f"static importance: L2 magnitude over {n_windows} wiki train windows of {length} tokens")
    settings = [("heads 20%", 0.2, 0.0), ("neurons 20%", 0.0, 0.2), ("neurons 50%", 0.0, 0.5),
                ("heads 30% + neurons 50%", 0.3, 0.5)]
    scores = static_scores(model, tokenizer, n_windows, length, progress=False)
    static = {name: fixed_masks("static", model, tokenizer, hs, ns, scores=scores) for name, hs, ns in settings}
    random = {name: fixed_masks("random", model, tokenizer, hs, ns, seed=0) for name, hs, ns in settings}

    _heading(f"perplexity on {n_windows} held-out wiki test windows of {length} tokens (layer 0 kept dense)")
    test = corpus("wiki").windows(tokenizer, "test", length, limit=n_windows)
    print(f"{'masks':<28}{'kept heads':>22}{'kept neurons':>26}{'static ppl':>12}{'random ppl':>12}")
    print(f"{'dense':<28}{'all':>22}{'all':>26}{perplexity(model, test):>12.2f}{'':>12}")
    for name, _, _ in settings:
        heads, neurons = static[name]
        ppl_static = perplexity(model, test, heads, neurons)
        ppl_random = perplexity(model, test, *random[name])
        print(f"{name:<28}{describe(heads):>22}{describe(neurons):>26}{ppl_static:>12.2f}{ppl_random:>12.2f}")

    chat = getattr(tokenizer, "chat_template", None)
    prompt = (tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                            add_generation_prompt=True) if chat else PROMPT)
    max_new = 24 if quick else 48
    # One mask for every input (static) is the weakest policy: fine at 20%, visibly worse at 50%. The
    # predictor (per-input masks) is what closes that gap.
    for name, (heads, neurons) in [("dense", (None, None)), ("static, neurons 20%", static["neurons 20%"]),
                                   ("static, neurons 50%", static["neurons 50%"])]:
        _heading(f"answer ({name}, greedy, {max_new} tokens): {PROMPT}")
        start = time.perf_counter()
        out = generate(TorchBackend(model, heads, neurons), tokenizer, prompt, max_new,
                       on_text=lambda _, d: print(d, end="", flush=True))[0]
        dt = time.perf_counter() - start
        print(f"\n   [{len(out.token_ids)} tokens in {dt:.1f} s, finish: {out.finish_reason}]")
    arch = adapter_for(model).arch
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads "
          f"({arch.num_layers} layers, masks skip the rows of dropped heads and neurons)")
