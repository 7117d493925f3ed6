"""Decode speed on the GPU (issue 13): random-weight Llama shapes in bf16, batch 1, a 128-token prompt
and 64 new tokens (greedy), per backend and policy, against the HBM bound.

Rows (shaped like docs/results/bench.json's): `hf-eager-cuda` (the HF model's own forward and
DynamicCache, dense), `cuda-dense` (the CUDA backend, every head and neuron: our kernels, in-place
cache, decode replayed from a CUDA graph), `cuda-native` at 50% heads + 50% neurons (random masks,
fixed per layer) and at 50% threshold sparsity (per-layer thresholds at the median |input| of each
projection on the prompt, so about half of each input is skipped). decode_tok_s = new tokens after
the first / their wall time (median of 3 rounds); bound_tok_s = copy bandwidth (read + written,
measured in the same run) / bytes one decode step must read (the kept block weights, the LM head,
the embedding row, the KV cache read at the middle of the run).

    shadowllm bench --backend cuda --out docs/results/bench-gpu   # writes bench-gpu.json and bench-gpu.md
    (on a GPU machine without the package installed: python3 -m shadowllm.bench.cuda --out DIR)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
}
PROMPT, NEW, ROUNDS = 128, 64, 3


def random_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    config._attn_implementation = "eager"
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def copy_bandwidth() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * a.numel() / statistics.median(times)


def step_bytes(cfg, heads_kept=1.0, neurons_kept=1.0, x_kept=1.0, context=PROMPT + NEW // 2) -> float:
    """Bytes one decode step reads (bf16): block weights kept, LM head, one embedding row, the KV cache."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    H, G, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    attention = (2 * H * heads_kept + 2 * G) * E * D * x_kept
    mlp = 3 * F * D * neurons_kept * x_kept
    kv = 2 * G * E * context
    return 2 * (L * (attention + mlp + kv) + cfg.vocab_size * D + D)


def decode_tok_s(step, prompt_ids) -> float:
    """New tokens after the first per second (median of ROUNDS): `step(ids, state) -> (logits, state)`."""
    rates = []
    for _ in range(ROUNDS + 1):  # the first round warms up (graph capture, allocator)
        logits, state = step(prompt_ids, None)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(NEW - 1):
            logits, state = step(ids, state)
            ids = logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        rates.append((NEW - 1) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def hf_step(model):
    from transformers import DynamicCache

    def step(ids, state):
        if state is None:
            state = (DynamicCache(), ids.shape[1])
        cache, length = state
        out = model(ids, past_key_values=cache, use_cache=True)
        return out.logits, (cache, length + ids.shape[1])
    return step


def backend_step(backend):
    def step(ids, state):
        past = 0 if state is None else state.past
        mask = torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.long)
        return backend.forward(ids, mask, state)
    return step


def median_thresholds(model, prompt_ids) -> torch.Tensor:
    """[L, 4] (attn_x, attn_o, mlp_x, mlp_h): the median |input| of each projection on the prompt."""
    layers = model.model.layers
    out = torch.zeros(len(layers), 4)
    hooks = []
    for i, layer in enumerate(layers):
        for col, module in ((0, layer.self_attn.q_proj), (1, layer.self_attn.o_proj), (2, layer.mlp.up_proj),
                            (3, layer.mlp.down_proj)):
            def hook(_, args, i=i, col=col):
                out[i, col] = args[0].float().abs().flatten().median().item()
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(prompt_ids)
    for h in hooks:
        h.remove()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/bench-gpu"),
                    help="report prefix: writes PREFIX.json and PREFIX.md")
    ap.add_argument("--models", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    from shadowllm.runtime.cuda_backend import CudaBackend
    from shadowllm.runtime.cuda_kernels import require_cuda

    require_cuda("bench --backend cuda")

    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    for shape in args.models.split(","):
        model = random_model(shape)
        cfg = model.config
        prompt = torch.randint(3, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            hf = decode_tok_s(hf_step(model), prompt.cuda())
        thresholds = median_thresholds(model, prompt.cuda())
        L, H, F = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
        g = torch.Generator().manual_seed(2)
        heads = torch.rand(L, H, generator=g).argsort(-1) < H // 2
        neurons = torch.rand(L, F, generator=g).argsort(-1) < F // 2
        cells = [("hf-eager-cuda", "dense", 0.0, 0.0, 0.0, hf, step_bytes(cfg))]
        for policy, kw, hs, ns, ts, nbytes in (
                ("dense", {}, 0.0, 0.0, 0.0, step_bytes(cfg)),
                ("random", dict(head_mask=heads, neuron_mask=neurons), 0.5, 0.5, 0.0,
                 step_bytes(cfg, heads_kept=0.5, neurons_kept=0.5)),
                ("threshold", dict(thresholds=thresholds), 0.0, 0.0, 0.5, step_bytes(cfg, x_kept=0.5))):
            backend = CudaBackend(model, dtype="bf16", capacity=PROMPT + NEW + 8, **kw)
            tok_s = decode_tok_s(backend_step(backend), prompt)
            name = "cuda-dense" if policy == "dense" else "cuda-native"
            cells.append((name, policy, hs, ns, ts, tok_s, nbytes))
            del backend
        for backend, policy, hs, ns, ts, tok_s, nbytes in cells:
            row = dict(model=shape, backend=backend, policy=policy, dtype="bf16", head_sparsity=hs,
                       neuron_sparsity=ns, sparsity=ts, decode_tok_s=tok_s, bound_tok_s=bw / nbytes,
                       fraction_of_bound=tok_s / (bw / nbytes), batch=1, prompt_tokens=PROMPT, new_tokens=NEW)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    dense = {r["model"]: r["decode_tok_s"] for r in rows if r["backend"] == "cuda-dense"}
    md = [f"# Decode on {torch.cuda.get_device_name()} (bf16, batch 1, {PROMPT}-token prompt, {NEW} new tokens)", "",
          f"`shadowllm bench --backend cuda --out docs/results/bench-gpu`; copy bandwidth {bw / 1e12:.2f} TB/s (read + "
          "written); random-weight Llama shapes.", "",
          "| model | backend | policy | heads off | neurons off | threshold sparsity | tok/s | bound tok/s | of bound "
          "| x cuda-dense |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['backend']} | {r['policy']} | {r['head_sparsity']:.0%} | "
                  f"{r['neuron_sparsity']:.0%} | {r['sparsity']:.0%} | {r['decode_tok_s']:.1f} | "
                  f"{r['bound_tok_s']:.1f} | {r['fraction_of_bound']:.2f} | "
                  f"{r['decode_tok_s'] / dense[r['model']]:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"rows": rows, "copy_tb_s": bw / 1e12}, indent=1) + "\n")
    Path(f"{args.out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
