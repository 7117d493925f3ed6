"""Serving overhead and batching on this machine: tokens/s and p50/p95 request latency at concurrency
1, 4 and 8 through the bundled Triton server (`shadowllm serve`), against in-process `generate` on the
same export, and the same load on a server built with --max-batch 1 (what dynamic batching buys).

    .venv/bin/python scripts/serve_bench.py EXPORT_DIR [--tokens 32] [--out docs/results/serve]

Every request is greedy with max_tokens tokens (prompts that do not stop early; tokens are counted
from each answer's finish_reason, or re-tokenised when it stopped); each client sends its requests one
after the other. In process, concurrency c means batches of c prompts through one `generate` call (what
the server's batcher aims for). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

from shadowllm.serving.client import free_ports, post

CONCURRENCY = (1, 4, 8)
PROMPTS = ["The history of the printing press", "Write a short story about a lighthouse keeper",
           "Explain how a refrigerator works", "The rules of chess, in brief", "A recipe for tomato soup",
           "Why the sky is blue", "The life cycle of a star", "How vaccines train the immune system"]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def row(setup, concurrency, latencies, tokens, wall):
    return {"setup": setup, "concurrency": concurrency, "requests": len(latencies), "tokens": tokens,
            "tok_s": round(tokens / wall, 1), "p50_s": round(percentile(latencies, 0.5), 3),
            "p95_s": round(percentile(latencies, 0.95), 3), "wall_s": round(wall, 2)}


def through_server(url, tokenizer, concurrency, per_client, max_tokens):
    latencies, tokens = [], [0]
    lock = threading.Lock()

    def client(c):
        for r in range(per_client):
            prompt = PROMPTS[(c * per_client + r) % len(PROMPTS)]
            start = time.perf_counter()
            status, body = post(f"{url}/v2/models/shadowllm/generate", {"text_input": prompt, "max_tokens": max_tokens})
            elapsed = time.perf_counter() - start
            assert status == 200, body
            n = max_tokens if body["finish_reason"] == "length" else len(tokenizer(body["text_output"])["input_ids"])
            with lock:
                latencies.append(elapsed)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, tokens[0], time.perf_counter() - start


def in_process(backend, tokenizer, concurrency, per_client, max_tokens):
    from shadowllm.runtime.generate import generate

    latencies, tokens = [], 0
    start = time.perf_counter()
    for r in range(per_client):
        prompts = [PROMPTS[(c * per_client + r) % len(PROMPTS)] for c in range(concurrency)]
        t0 = time.perf_counter()
        out = generate(backend, tokenizer, prompts, max_tokens)
        latencies += [time.perf_counter() - t0] * concurrency
        tokens += sum(len(o.token_ids) for o in out)
    return latencies, tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16, help="requests per setup and concurrency (split over clients)")
    ap.add_argument("--out", default="docs/results/serve")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from shadowllm.compiler.build import build
    from shadowllm.runtime.ort_backend import OrtBackend
    from shadowllm.serving.server import TritonServer

    folder = Path(args.export)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    rows = []
    backend = OrtBackend(folder)
    in_process(backend, tokenizer, 1, 1, 4)  # warm-up
    for c in CONCURRENCY:
        rows.append(row("in-process generate", c, *in_process(backend, tokenizer, c, -(-args.requests // c), args.tokens)))
        print(rows[-1], flush=True)
    del backend
    for max_batch, setup in ((8, "triton, dynamic batching (max 8)"), (1, "triton, no batching (max 1)")):
        repository = build(folder, "triton", max_batch=max_batch)
        http, grpc = free_ports(2)
        with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=None) as server:
            through_server(server.http_url, tokenizer, 1, 1, 4)  # warm-up
            for c in CONCURRENCY if max_batch > 1 else (1, 8):
                rows.append(row(setup, c, *through_server(server.http_url, tokenizer, c, -(-args.requests // c), args.tokens)))
                print(rows[-1], flush=True)
        shutil.rmtree(repository)
    out = Path(args.out)
    meta = {"export": str(folder), "max_tokens": args.tokens, "requests": args.requests,
            "prompts": len(PROMPTS), "threads": __import__("os").cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| setup | concurrency | requests | tokens/s | p50 latency (s) | p95 latency (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['setup']} | {r['concurrency']} | {r['requests']} | {r['tok_s']} | {r['p50_s']} | {r['p95_s']} |"
              for r in rows]
    out.with_suffix(".md").write_text(
        f"# Serving on Triton vs in process ({folder.name}, greedy, {args.tokens} tokens per request, "
        f"{meta['threads']} cores)\n\n`shadowllm export --policy static --out {folder}` then "
        f"`.venv/bin/python scripts/serve_bench.py {folder}`; tokens/s over each setup's whole run, latency "
        f"from sending a request to its full answer.\n\n"
        + "\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
