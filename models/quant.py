"""Blocked weight formats: what `export --weights` writes and what every backend reads.

A quantized matrix keeps blocks of BLOCK consecutive entries along its *input* dimension (the axis a
projection sums over), each block with an fp16 scale `d` (and, for int4, an fp16 minimum `m`):
- `int4`: asymmetric, codes q in 0..15, w = d·q + m — the grid of GGUF's Q4_1 (the embedded
  SmolLM2 file), so re-quantizing a Q4_1 model gives its values back exactly;
- `int8`: symmetric, codes q in -127..127, w = d·q — the grid of GGUF's Q8_0.
Values are reconstructed in fp32 as d·q (+ m), as GGUF's own dequantizer does. The same blocks serve
both sparsities of docs/export-format.md: a kept output row reads its codes and its row of scales; a
kept input channel (thresholds, channel-major layout) reads its codes for every output plus the
scales of its block, shared by the 32 channels of that block.

`fake_quantize_(model, fmt)` puts a model's projection weights on the format's grid in place (the
PyTorch reference then computes exactly what the quantized export does); `quantize` returns the
codes and scales the exporter writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import ShadowError

BLOCK = 32
FORMATS = ("fp32", "int8", "int4")
CODE_RANGE = {"int4": (0, 15), "int8": (-127, 127)}


@dataclass
class Quantized:
    """A [R, C] matrix in blocks of BLOCK along `axis`: codes like the matrix (uint8 0..15 for int4,
    int8 for int8), scale (and minimum, int4) fp16 with the blocked axis divided by BLOCK."""

    fmt: str
    axis: int
    codes: torch.Tensor
    scale: torch.Tensor
    minimum: Optional[torch.Tensor]

    def dequantize(self) -> torch.Tensor:
        d = self.scale.float().repeat_interleave(BLOCK, dim=self.axis)
        w = self.codes.float() * d
        if self.minimum is not None:
            w = w + self.minimum.float().repeat_interleave(BLOCK, dim=self.axis)
        return w


def check_format(fmt: str, flag: str = "--weights") -> str:
    if fmt not in FORMATS:
        raise ShadowError(f"{flag} {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def quantize(w: torch.Tensor, fmt: str, axis: int) -> Quantized:
    """Codes and scales of the 2-D matrix w in blocks of BLOCK along `axis` (its input dimension)."""
    check_format(fmt)
    if fmt == "fp32":
        raise ShadowError("fp32 weights are not quantized")
    if w.dim() != 2 or w.shape[axis] % BLOCK:
        raise ShadowError(f"--weights {fmt}: a weight of shape {tuple(w.shape)} has an input dimension "
                          f"({w.shape[axis]}) that is not a multiple of the block ({BLOCK})")
    x = w.detach().float().movedim(axis, -1)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    lo, hi = CODE_RANGE[fmt]
    if fmt == "int4":
        mn = blocks.amin(-1)
        d = ((blocks.amax(-1) - mn) / hi).half()
        m = mn.half()
        safe = torch.where(d == 0, torch.ones_like(d), d).float()
        q = torch.round((blocks - m.float()[..., None]) / safe[..., None])
    else:
        d = (blocks.abs().amax(-1) / hi).half()
        m = None
        safe = torch.where(d == 0, torch.ones_like(d), d).float()
        q = torch.round(blocks / safe[..., None])
    q = q.clamp(lo, hi).reshape(x.shape).movedim(-1, axis).contiguous()
    codes = q.to(torch.uint8 if fmt == "int4" else torch.int8)
    back = (lambda t: None if t is None else t.movedim(-1, axis).contiguous())
    return Quantized(fmt, axis, codes, back(d), back(m))


def fake_quantize(w: torch.Tensor, fmt: str, axis: int) -> torch.Tensor:
    """w on the format's grid (fp32 values), blocks along `axis`."""
    return w if fmt == "fp32" else quantize(w, fmt, axis).dequantize().to(w.dtype)


HEAD_FORMAT = "int8"  # the LM head of a quantized export: 4 bits by rounding costs SmolLM2 +6.5% perplexity
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1 + 2 / 32, "int4": 0.5 + 4 / 32}  # a block's fp16 scale (and minimum) shared


def token_bytes(arch, fraction: float, fmt: str) -> int:
    """Weight bytes a decode token reads: `fraction` of the decoder blocks' projections at `fmt` (scales
    included) plus the whole LM head at its format. arch: an adapter's Arch."""
    head = arch.vocab * arch.hidden * BYTES_PER_WEIGHT[head_format(fmt)]
    return int(fraction * arch.block_parameters * BYTES_PER_WEIGHT[fmt] + head)


def head_format(fmt: str) -> str:
    """The LM head's format in an export whose projections are `fmt`."""
    return "fp32" if fmt == "fp32" else HEAD_FORMAT


def fake_quantize_(model, fmt: str) -> None:
    """Put every projection of the model's decoder blocks on the format's grid, in place (blocks
    along each projection's input), and the LM head on the int8 grid (the Q8_0 of GGUF files, blocks
    along the hidden size; a tied embedding shares it). Norms and biases keep their values."""
    from .adapters import adapter_for
    from .loading import fingerprint

    check_format(fmt)
    if fmt == "fp32":
        return
    if getattr(model, "_shadowllm_weights", "fp32") != "fp32":
        raise ShadowError(f"the model's projections are already {model._shadowllm_weights}")
    # an export of it names the model it was quantized from (as a rotated copy does)
    if getattr(model, "_shadowllm_source_fingerprint", None) is None:
        model._shadowllm_source_fingerprint = fingerprint(model)
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer in range(adapter.arch.num_layers):
            a, m = adapter.attention(layer), adapter.mlp(layer)
            # input projections are [out, in] (blocks along axis 1); output projections are handed out
            # transposed, [in, out] (blocks along axis 0)
            for w, axis in ((a.w_q, 1), (a.w_k, 1), (a.w_v, 1), (a.w_o_t, 0), (m.w_in, 1), (m.w_gate, 1),
                            (m.w_out_t, 0)):
                if w is not None:
                    w.copy_(fake_quantize(w, fmt, axis))
        head = model.get_output_embeddings().weight  # [V, D]
        head.copy_(fake_quantize(head, HEAD_FORMAT, 1))
    model._shadowllm_weights = fmt
    model._shadowllm_fingerprint = None  # computed again from the new values when asked
