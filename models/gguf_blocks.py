"""`export --weights gguf`: a GGUF file's own weight blocks, carried into the export bit for bit.

GGUF's Q4_0, Q4_1 and Q8_0 store a [out, in] matrix in blocks of 32 along `in`, each block one fp16
scale d (Q4_1 also an fp16 minimum m) and its codes. Those are the grids of models/quant.py:
- Q4_1: codes 0..15, w = d*q + m — our `int4` as it is;
- Q4_0: codes 0..15, w = d*(q - 8) — our `int4` with m = -8d (exact in fp16: a power-of-two multiple);
- Q8_0: codes -128..127, w = d*q — our `int8`.
So the blocks go into the export unchanged. Re-quantizing the dequantized values would not always
give them back (a Q4_0 block whose codes do not span 0..15 re-quantizes onto another grid), which is
why the codes are read from the file and not recomputed.

Which GGUF tensor is which initializer is decided by value, not by name: transformers permutes the
rows of Llama's q/k projections when it converts a GGUF (interleaved to rotate-half RoPE), and the
exporter hands output projections out transposed. Each file matrix is dequantized once and keyed by
the bytes of its fp32 values; an initializer finds its blocks by the same key (its rows permuted the
way transformers permuted them), so a match is also the proof that the values are the file's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .errors import ShadowError
from .quant import BLOCK, Quantized

# GGUF block type -> (our format, bytes per block of 32)
CARRIED = {"Q4_0": ("int4", 18), "Q4_1": ("int4", 20), "Q8_0": ("int8", 34)}


def _parse(kind: str, raw: np.ndarray, rows: int, cols: int) -> Quantized:
    """The blocks of one [rows, cols] tensor (raw: its bytes) as codes [rows, cols] and fp16 scales
    (and minimums) [rows, cols / 32]."""
    fmt, size = CARRIED[kind]
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // BLOCK, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if fmt == "int8":
        codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return Quantized("int8", 1, torch.from_numpy(codes), torch.from_numpy(d), None)
    packed = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    # element j of a block: the low nibble of byte j (j < 16), the high nibble of byte j - 16
    codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(rows, cols).astype(np.uint8)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    else:
        m = (d.astype(np.float32) * -8).astype(np.float16)  # exact: d times a power of two
    return Quantized("int4", 1, torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m))


def _key(w: torch.Tensor) -> str:
    """The matrix's fp32 values as a key (+ 0.0: a -0.0 — GGUF's d * (8 - 8) with a negative d — keys as 0.0)."""
    return hashlib.sha256(np.ascontiguousarray(w.detach().float().numpy() + np.float32(0)).tobytes()).hexdigest()


def _llama_rope_rows(rows: int, heads: int) -> np.ndarray:
    """The row order transformers gives a Llama q/k projection converted from GGUF: within each head,
    GGUF interleaves the rotary pairs (0, 1), (2, 3), ...; the HF layout puts the first halves first."""
    per_head = rows // heads
    return np.arange(rows).reshape(heads, per_head // 2, 2).swapaxes(1, 2).reshape(rows)


class GgufBlocks:
    """The carried block matrices of one GGUF file, found by value."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        reader = gguf.GGUFReader(str(self.path))
        arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
        heads = {k: int(reader.fields[f"{arch}.{k}"].parts[-1][0]) for k in ("attention.head_count",
                                                                           "attention.head_count_kv")
                 if f"{arch}.{k}" in reader.fields}
        self.types: dict[str, str] = {}
        self._by_value: dict[str, Quantized] = {}
        for t in reader.tensors:
            kind = t.tensor_type.name
            if len(t.shape) != 2:
                continue
            self.types[t.name] = kind
            if kind not in CARRIED:
                continue
            cols, rows = (int(n) for n in t.shape)  # GGUF lists the fastest-varying dimension first
            q = _parse(kind, t.data, rows, cols)
            variants = [q]
            n_heads = heads.get("attention.head_count_kv" if ".attn_k." in t.name else "attention.head_count")
            if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name) and n_heads:
                order = torch.from_numpy(_llama_rope_rows(rows, n_heads))
                variants.append(Quantized(q.fmt, 1, q.codes[order], q.scale[order],
                                          None if q.minimum is None else q.minimum[order]))
            for v in variants:
                self._by_value[_key(v.dequantize())] = v

    @property
    def projection_types(self) -> dict[str, str]:
        """GGUF type of each decoder-block matrix (blk.N.*)."""
        return {n: k for n, k in self.types.items() if n.startswith("blk.")}

    def format(self) -> str:
        """Our format for the decoder blocks (int4 | int8), or a one-line error naming what cannot be carried."""
        types = self.projection_types
        if not types:
            raise ShadowError(f"--weights gguf: {self.path} holds no decoder-block matrices")
        other = {n: k for n, k in types.items() if k not in CARRIED}
        if other:
            name, kind = sorted(other.items())[0]
            raise ShadowError(f"--weights gguf: {self.path.name} stores {name} as {kind}; the ops carry "
                              f"{', '.join(CARRIED)} blocks as they are (use --weights int4 or int8 to re-quantize)")
        formats = {CARRIED[k][0] for k in types.values()}
        if len(formats) > 1:
            raise ShadowError(f"--weights gguf: {self.path.name} mixes 4- and 8-bit blocks across its matrices "
                              f"({', '.join(sorted(set(types.values())))}); one export holds one block width")
        return formats.pop()

    def gguf_types(self) -> str:
        """The file's block types over the decoder blocks, as a bench / manifest label (e.g. "Q4_1")."""
        return "+".join(sorted(set(self.projection_types.values())))

    def lookup(self, w: torch.Tensor, axis: int) -> Quantized | None:
        """The file's blocks of the 2-D matrix w (blocks along `axis`, its input dimension), or None
        when no carried tensor of the file holds exactly these values."""
        rows_major = w if axis == 1 else w.t()
        q = self._by_value.get(_key(rows_major))
        if q is None:
            return None
        if axis == 1:
            return q
        return Quantized(q.fmt, 0, q.codes.t().contiguous(), q.scale.t().contiguous(),
                         None if q.minimum is None else q.minimum.t().contiguous())


def gguf_of(model) -> Path:
    """The GGUF file a loaded model was converted from (the embedded models' folders record it)."""
    from .loading import EMBEDDED, MANIFEST, locate_gguf

    folder = Path(getattr(model, "name_or_path", "") or "")
    manifest = folder / MANIFEST
    source = json.loads(manifest.read_text()).get("source") if manifest.is_file() else None
    spec = next((s for s in EMBEDDED.values() if source == f"{s.dist}=={s.version}/{s.gguf}"), None)
    if spec is None:
        raise ShadowError(f"--weights gguf: the model at {folder or '?'} was not converted from a GGUF file "
                          f"(known: {', '.join(EMBEDDED)}); use --weights int4 or int8")
    return locate_gguf(spec)
