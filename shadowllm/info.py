"""The architecture table of `shadowllm info`."""

from __future__ import annotations

from shadowllm.models import adapter_for


def parameter_count(model) -> tuple[int, int]:
    """(parameters, bytes) counting tied tensors once."""
    params = list(model.parameters())  # parameters() already yields a shared tensor once
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _positions(arch) -> str:
    if not arch.rope:
        return "learned"
    bases = ", ".join(f"{kind} base {theta:g}" if kind != "default" else f"base {theta:g}"
                      for kind, theta in arch.rope_bases)
    return "RoPE" + (f": {bases}" if bases else "")


def architecture_table(model) -> str:
    arch = adapter_for(model).arch
    n, nbytes = parameter_count(model)
    rows = [
        ("model type", arch.model_type),
        ("layers", arch.num_layers),
        ("hidden", arch.hidden),
        ("heads", arch.num_heads),
        ("kv heads", arch.num_kv_heads),
        ("head dim", arch.head_dim),
        ("neurons (FFN)", arch.ffn),
        ("activation", arch.activation + (" (gated)" if arch.gated else "")),
        ("norm", arch.norm + ("" if arch.pre_norm else " (post-norm)")),
        ("positions", f"{arch.max_positions} ({_positions(arch)})"),
        ("features", ", ".join(arch.features()) or "none beyond the family's skeleton"),
        ("vocabulary", arch.vocab),
        ("parameters", f"{n:,} ({n / 1e6:.1f} M)"),
        ("weight bytes", f"{nbytes:,} ({nbytes / 2**20:.1f} MiB, {next(model.parameters()).dtype})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
