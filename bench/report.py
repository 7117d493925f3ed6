"""The benchmark's outputs: JSON rows (+ run metadata), a markdown table with the ratio to ORT dense
in every row, and a PNG of decode tokens/s against sparsity per backend and model."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path


def _ort_dense(rows, model):
    return next((r.decode_tok_s for r in rows if r.model == model and r.backend == "ort-dense"), None)


def markdown(rows, meta: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Memory bandwidth (0.5 GiB copy, read + write), read before every group of cells in every round: "
             f"median {meta['bandwidth_gb_s']} GB/s, range {meta.get('bandwidth_range_gb_s')} GB/s over "
             f"{meta.get('bandwidth_readings')} readings; {meta['threads']} threads; onnxruntime "
             f"{meta.get('onnxruntime')}, torch {meta.get('torch')}. Bound = that round's bandwidth / bytes one decode "
             "step reads (weights of kept rows, LM head, KV cache); bound and achieved fraction are medians over "
             "rounds.", ""]
    lines += [f"Note: {n}" for n in meta.get("notes", [])]
    lines += ["Two bounds per cell: the round's (bandwidth read just before) and the peak (the run's highest "
              "reading, the strictest).", ""]
    lines += ["", "| model | backend | weights | activations | policy | heads off | neurons off | decode tok/s | spread | vs ort-dense | "
              "bound tok/s (round / peak) | of bound (round / peak) | prefill ms | TTFT ms | peak RSS MB | "
              "predictor prefill / decode |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.note:  # a peer that could not run here
            lines.append(f"| {r.model} | {r.backend} | {r.weights} | {getattr(r, 'activations', 'fp32')} | {r.policy} "
                         f"| | | not run: {r.note} |" + " |" * 8)
            continue
        base = _ort_dense(rows, r.model)
        ratio = f"{r.decode_tok_s / base:.2f}x" if base else ""
        peak_bound = f"{r.peak_bound_tok_s:.1f}" if r.peak_bound_tok_s else "–"
        peak_frac = f"{r.achieved_of_peak_bound:.0%}" if r.achieved_of_peak_bound else "–"
        share = (f"{r.predictor_prefill_share:.1%} / {r.predictor_decode_share:.1%}"
                 if r.predictor_prefill_share is not None else "")
        policy = r.policy if getattr(r, "sparsity", None) is None else f"{r.policy} {r.sparsity:g}"
        lines.append(f"| {r.model} | {r.backend} | {getattr(r, 'weights', 'fp32')} | {getattr(r, 'activations', 'fp32')} "
                     f"| {policy} | {r.head_sparsity:g} | {r.neuron_sparsity:g} | "
                     f"{r.decode_tok_s:.2f} | {r.decode_spread:.2f} | {ratio} | {r.bound_tok_s:.1f} / {peak_bound} | "
                     f"{r.achieved_of_bound:.0%} / {peak_frac} | {r.prefill_ms:.0f} | {r.ttft_ms:.0f} | "
                     f"{r.peak_rss_mb:.0f} | {share} |")
    profiled = [r for r in rows if r.decode_op_shares]
    if profiled:
        lines += ["", "Where native decode time goes at 50% heads + 50% neurons (onnxruntime's profiler, a separate "
                  "profiled run; share of decode wall time by op type, top 6):", ""]
        for r in profiled:
            top = [f"{op} {share:.0%}" for op, share in list(r.decode_op_shares.items())[:6]]
            lines.append(f"- {r.model}, {r.policy}: " + ", ".join(top))
    return "\n".join(lines) + "\n"


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        everything = [r for r in rows if r.model == model and r.policy in ("dense", "random") and not r.note]
        mine = [r for r in everything if getattr(r, "weights", "fp32") == "fp32"]
        four_bit = sorted((r.neuron_sparsity, r.decode_tok_s) for r in everything
                          if r.weights != "fp32" and r.backend == "ort-native" and r.head_sparsity == r.neuron_sparsity
                          and getattr(r, "activations", "fp32") == "int8")
        if four_bit:
            kind = next(r.weights for r in everything if r.weights != "fp32" and r.backend == "ort-native")
            ax.plot(*zip(*four_bit), "o-", color="C5", label=f"ort-native {kind} (heads = neurons)")
        for backend, style in (("ort-native", "o-"), ("ort-function", "s--"), ("tensorrt", "^-")):
            diagonal = sorted((r.neuron_sparsity, r.decode_tok_s) for r in mine
                              if r.backend == backend and r.head_sparsity == r.neuron_sparsity)
            if diagonal:
                ax.plot(*zip(*diagonal), style, label=f"{backend} (heads = neurons)")
        bound = sorted((r.neuron_sparsity, r.peak_bound_tok_s or r.bound_tok_s) for r in mine
                       if r.backend == "ort-native" and r.head_sparsity == r.neuron_sparsity)
        if bound:
            ax.plot(*zip(*bound), ":", color="gray", label="bytes bound at peak bandwidth (native)")
        for r in mine:
            if r.backend == "ort-native" and r.head_sparsity != r.neuron_sparsity:
                ax.plot([r.neuron_sparsity], [r.decode_tok_s], "D", color="C3",
                        label=f"ort-native heads {r.head_sparsity:g}")
        for backend, color in (("ort-dense", "C2"), ("hf-eager", "C4")):
            base = next((r.decode_tok_s for r in mine if r.backend == backend), None)
            if base:
                ax.axhline(base, color=color, lw=1, ls="-.", label=backend)
        for r in everything:  # the peers: llama.cpp on the GGUF types, onnxruntime's MatMulNBits
            if r.backend in ("llama.cpp", "ort-matmulnbits"):
                ax.axhline(r.decode_tok_s, lw=1, ls="--", color="C7" if r.backend == "llama.cpp" else "C8",
                           alpha=1.0 if r.weights in ("Q4_1", "int4") else 0.5, label=f"{r.backend} {r.weights}")
        ax.set_title(model)
        ax.set_xlabel("sparsity (fraction of neurons off)")
        ax.set_ylabel("decode tokens/s (median)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows, meta: dict, prefix: str | os.PathLike, command: str):
    """PREFIX.json, PREFIX.md, PREFIX.png, each written whole (temp file, then rename)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    outputs = {".json": json.dumps({"command": command, **meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n",
               ".md": markdown(rows, meta, command)}
    for suffix, text in outputs.items():
        tmp = prefix.with_name(prefix.name + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, prefix.with_name(prefix.name + suffix))
    tmp = prefix.with_name(prefix.name + ".tmp.png")
    plot(rows, tmp)
    os.replace(tmp, prefix.with_name(prefix.name + ".png"))
