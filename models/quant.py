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


ACTIVATIONS = ("fp32", "int8")


def check_activations(value: str, flag: str = "--activations") -> str:
    if value not in ACTIVATIONS:
        raise ShadowError(f"{flag} {value!r}: expected one of {', '.join(ACTIVATIONS)}")
    return value


def default_activations(fmt: str, value: str | None) -> str:
    """`--activations` as given, else int8 with quantized weights (what the integer kernels multiply) and
    fp32 with fp32 weights."""
    if value is None:
        return "fp32" if fmt == "fp32" else "int8"
    return check_activations(value)


def round_activations(t: torch.Tensor) -> torch.Tensor:
    """t on the int8 activation grid (`--activations int8`, docs/export-format.md): in blocks of BLOCK
    along the last axis, d = max|v| / 127 and v -> round(v / d) * d (ties to even; a block of zeros
    stays zero), d and the division in fp32 whatever t's dtype, so every backend rounds the same fp32
    values the same way. What llama.cpp's Q8 activations and onnxruntime's accuracy_level 4 compute;
    integer kernels then multiply the codes."""
    shape = t.shape
    if shape[-1] % BLOCK:
        raise ShadowError(f"--activations int8: an input of width {shape[-1]} is not a multiple of the block ({BLOCK})")
    v = t.float().reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
    d = v.abs().amax(-1, keepdim=True) / 127.0
    q = torch.round(v / torch.where(d == 0, torch.ones_like(d), d))
    wide = torch.promote_types(t.dtype, torch.float32)  # q * d exact in a float64 reference
    return (q.to(wide) * d.to(wide)).reshape(shape).to(t.dtype)


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


def check_weights_flag(value: str) -> str:
    """`--weights` of export / eval: a format, or `gguf` (the source GGUF's own blocks, models/gguf_blocks.py)."""
    if value == "gguf":
        return value
    try:
        return check_format(value)
    except ShadowError:
        raise ShadowError(f"--weights {value!r}: expected one of {', '.join(FORMATS)}, gguf") from None


def resolve_weights(model, value: str):
    """(format, GgufBlocks | None) for `--weights value` on a loaded model: gguf reads the blocks of the
    file the model was converted from and names the format they are (int4 | int8)."""
    check_weights_flag(value)
    if value != "gguf":
        return value, None
    from .gguf_blocks import GgufBlocks, gguf_of

    blocks = GgufBlocks(gguf_of(model))
    return blocks.format(), blocks


def apply_weights(model, weights: str, activations: str | None = None):
    """`--weights` and `--activations` on a loaded model, in place (resolve_weights, default_activations,
    fake_quantize_): returns (format, GgufBlocks | None, activations)."""
    fmt, blocks = resolve_weights(model, weights)
    activations = default_activations(fmt, activations)
    fake_quantize_(model, fmt, blocks, activations)
    return fmt, blocks, activations


def fake_quantize_(model, fmt: str, blocks=None, activations: str = "fp32") -> None:
    """Put every projection of the model's decoder blocks on the format's grid, in place (blocks
    along each projection's input), and the LM head on the int8 grid (the Q8_0 of GGUF files, blocks
    along the hidden size; a tied embedding shares it). Norms and biases keep their values.

    blocks (models/gguf_blocks.py, `--weights gguf`): the values are the GGUF file's own blocks, found
    by value (an error names a projection the file does not hold in a carried type); the LM head takes
    the file's Q8_0 blocks when it has them, else the int8 grid.

    activations: `int8` also puts every projection's input on the activation grid as the reference
    runs (round_activations; the LM head's input too); quantized weights only."""
    from .adapters import adapter_for
    from .loading import fingerprint

    check_format(fmt)
    check_activations(activations)
    if fmt == "fp32":
        if activations != "fp32":
            raise ShadowError("--activations int8 applies to quantized weights (--weights int8, int4 or gguf), "
                              "whose integer kernels multiply the rounded inputs")
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
            for name, w, axis in (("q", a.w_q, 1), ("k", a.w_k, 1), ("v", a.w_v, 1), ("o", a.w_o_t, 0),
                                  ("up", m.w_in, 1), ("gate", m.w_gate, 1), ("down", m.w_out_t, 0)):
                if w is None:
                    continue
                if blocks is None:
                    w.copy_(fake_quantize(w, fmt, axis))
                    continue
                q = blocks.lookup(w, axis)
                if q is None:
                    raise ShadowError(f"--weights gguf: layer {layer}'s {name} projection is not one of "
                                      f"{blocks.path.name}'s matrices in a carried type (its values differ)")
                w.copy_(q.dequantize())  # the same values: found by them
        head = model.get_output_embeddings().weight  # [V, D]
        carried = blocks.lookup(head, 1) if blocks is not None else None
        head.copy_(carried.dequantize() if carried is not None and carried.fmt == HEAD_FORMAT
                   else fake_quantize(head, HEAD_FORMAT, 1))
    model._shadowllm_weights = fmt
    model._shadowllm_gguf = blocks
    model._shadowllm_activations = activations
    model._shadowllm_fingerprint = None  # computed again from the new values when asked
