"""`--weights gguf` (models/gguf_blocks.py): a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks read into our
formats bit for bit, found by value (transposed for output projections, rows permuted as transformers
permutes Llama's q/k), and the one-line refusals. The blocks come from gguf-py's own quantizer and
are checked against gguf-py's own dequantizer: an independent reading of the same bytes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from shadowllm.cli import main
from shadowllm.models import ShadowError
from shadowllm.models.gguf_blocks import GgufBlocks, _llama_rope_rows
from shadowllm.models.quant import fake_quantize, quantize
from shadowllm.models.tiny import save_tiny

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 96


def _write(path, tensors: dict):
    """A GGUF with llama's head counts and `tensors` {name: (fp32 [rows, cols], type)}; returns each
    tensor's values as gguf-py dequantizes them."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.attention.head_count", HEADS)
    writer.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    values = {}
    for name, (w, kind) in tensors.items():
        raw = quants.quantize(w, kind) if kind not in (T.F32, T.F16) else w.astype(np.float16 if kind == T.F16 else np.float32)
        writer.add_tensor(name, raw, raw_dtype=kind)
        values[name] = quants.dequantize(raw, kind) if kind not in (T.F32, T.F16) else raw.astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


@pytest.mark.parametrize("kind", (T.Q4_0, T.Q4_1, T.Q8_0))
def test_blocks_are_the_files_values(tmp_path, kind):
    rng = np.random.default_rng()  # fresh values every run: exactness holds for any draw
    up = (rng.standard_normal((64, HIDDEN)) * 0.1).astype(np.float32)
    q = (rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)) * 0.1).astype(np.float32)
    values = _write(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (up, kind), "blk.0.attn_q.weight": (q, kind)})
    blocks = GgufBlocks(tmp_path / "m.gguf")
    assert blocks.format() == ("int8" if kind == T.Q8_0 else "int4") and blocks.gguf_types() == kind.name
    file_up = torch.from_numpy(values["blk.0.ffn_up.weight"])
    found = blocks.lookup(file_up, 1)
    assert found is not None and torch.equal(found.dequantize(), file_up)
    # an output projection is handed out transposed [in, out]: the same blocks along axis 0
    found_t = blocks.lookup(file_up.t().contiguous(), 0)
    assert found_t is not None and found_t.axis == 0 and torch.equal(found_t.dequantize(), file_up.t())
    # what transformers makes of a Llama q projection: its rows permuted to rotate-half pairs
    hf_q = torch.from_numpy(values["blk.0.attn_q.weight"])[torch.from_numpy(_llama_rope_rows(HEADS * HEAD_DIM, HEADS))]
    found_q = blocks.lookup(hf_q, 1)
    assert found_q is not None and torch.equal(found_q.dequantize(), hf_q)
    assert blocks.lookup(file_up + 1e-3, 1) is None  # other values: not the file's


def test_q4_0_blocks_are_carried_not_requantized(tmp_path):
    """Why the codes are read from the file: a Q4_0 block whose values do not span its codes' range
    re-quantizes onto another grid (int4's own scale and minimum), changing the weights."""
    rng = np.random.default_rng(3)  # a fixed draw: the point is a grid mismatch, shown once
    w = (rng.standard_normal((32, HIDDEN)) * 0.1).astype(np.float32)
    w[:, :32] = np.abs(w[:, :32])  # one-signed blocks use only half of Q4_0's symmetric codes
    values = _write(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (w, T.Q4_0)})
    file_w = torch.from_numpy(values["blk.0.ffn_up.weight"])
    carried = GgufBlocks(tmp_path / "m.gguf").lookup(file_w, 1)
    assert torch.equal(carried.dequantize(), file_w)
    assert not torch.equal(fake_quantize(file_w, "int4", 1), file_w)
    assert not torch.equal(quantize(file_w, "int4", 1).codes, carried.codes)


def test_format_refusals(tmp_path):
    rng = np.random.default_rng()
    w = (rng.standard_normal((64, HIDDEN)) * 0.1).astype(np.float32)
    _write(tmp_path / "mixed.gguf", {"blk.0.ffn_up.weight": (w, T.Q4_1), "blk.0.ffn_down.weight": (w, T.Q8_0)})
    with pytest.raises(ShadowError, match="mixes 4- and 8-bit blocks"):
        GgufBlocks(tmp_path / "mixed.gguf").format()
    _write(tmp_path / "f16.gguf", {"blk.0.ffn_up.weight": (w, T.F16)})
    with pytest.raises(ShadowError, match=r"stores blk\.0\.ffn_up\.weight as F16; the ops carry Q4_0, Q4_1, Q8_0"):
        GgufBlocks(tmp_path / "f16.gguf").format()


def test_cli_refuses_gguf_without_a_gguf_source_and_a_bad_weights_value(tmp_path, capsys):
    folder = tmp_path / "llama"
    save_tiny("llama", folder, intermediate_size=96)
    assert main(["export", str(folder), "--weights", "gguf", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("shadowllm: error: --weights gguf: the model at") and "not converted from a GGUF file" in err[-1]
    assert main(["export", str(folder), "--weights", "int3", "--out", str(tmp_path / "e")]) == 2
    assert "--weights 'int3': expected one of fp32, int8, int4, gguf" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
