"""The engines a user would otherwise run, as rows of the same `shadowllm bench` run (same machine,
prompt, tokens and threads as our cells):

- `llama.cpp` (llama-cpp-python, an optional install: `scripts/setup.sh --peers` builds it from
  source) on the embedded model's GGUF as shipped (Q4_1; its LM head Q8_0) and re-typed by
  llama.cpp's own quantizer (`llama_model_quantize`): Q8_0 and F32;
- `ort-matmulnbits`: onnxruntime's own 4-bit weights on our dense export: the function bodies inlined
  into plain ONNX, every MatMul with a constant weight (the LM head included) quantized by
  onnxruntime's weight-only quantizer (MatMulNBits, blocks of 32, asymmetric like Q4_1) with
  int8-rounded activations (`accuracy_level` 4, its fastest CPU path).

Each is a backend with the bench's `forward(ids, mask, state, last_only) -> (logits, state)`, so the
same greedy loop times it. The files they need are made once and cached beside the bench's exports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from shadowllm.models import ShadowError

LLAMA_CPP_TYPES = ("Q4_1", "Q8_0", "F32")  # as shipped, then re-typed by llama.cpp's quantizer
MATMULNBITS_BLOCK = 32
MATMULNBITS_ACCURACY = 4  # int8 activations: onnxruntime's fast CPU path for 4-bit weights


def llama_cpp_missing() -> str | None:
    """None when llama-cpp-python imports, else why not (the row says it)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (optional: scripts/setup.sh --peers builds it, ~6 min on 2 cores)"
    return None


def _ftype(llama_cpp, kind: str) -> int:
    names = {"Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F32": "LLAMA_FTYPE_ALL_F32"}
    return getattr(llama_cpp, names[kind])


def llama_cpp_file(shipped: Path, kind: str, root: Path, threads: int | None) -> Path:
    """The GGUF of `kind`: the shipped file itself for Q4_1, else llama.cpp's re-typing of it (cached)."""
    if kind == "Q4_1":
        return shipped
    import llama_cpp

    out = root / f"{shipped.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(llama_cpp, kind)
    params.allow_requantize = True  # the source is already quantized (Q4_1)
    params.nthread = threads or 0
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(shipped).encode(), str(tmp).encode(), params) != 0:
        raise ShadowError(f"llama.cpp's quantizer could not re-type {shipped.name} to {kind}")
    tmp.replace(out)
    return out


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of every tensor in a GGUF: what a decode step reads (the tied embedding is the LM head)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors))


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level `eval`: the prompt in one batch, then a token a
    step; logits of the last position only (as our cells run a prompt)."""

    name = "llama.cpp"

    def __init__(self, path: Path, threads: int | None, context: int = 512):
        import os

        from llama_cpp import Llama

        threads = threads or os.cpu_count()
        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)

    def forward(self, input_ids, attention_mask, state, last_only: bool = False):
        if input_ids.shape[0] != 1:
            raise ShadowError("the llama.cpp peer runs one sequence")
        if state is None:
            self.llm.reset()
        self.llm.eval(input_ids[0].tolist())
        # the last position's logits, straight from the context (without logits_all, `scores` is not filled)
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()
        return torch.from_numpy(logits)[None, None], self.llm.n_tokens


def _fold_transposed_weights(model) -> None:
    """Transpose(initializer) -> a transposed initializer, so every MatMul of the inlined bodies reads
    a constant B (what the weight-only quantizer looks for)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(array.transpose(perm) if perm else array.T), node.output[0]))
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    unused = [i for i in model.graph.initializer if i.name not in read]  # sources only the Transposes read
    for init in unused:
        model.graph.initializer.remove(init)


def matmulnbits_folder(dense: Path, out: Path, quantize: bool = True) -> Path:
    """Our dense export with onnxruntime's own 4-bit weights (cached): bodies inlined, transposed weights
    folded, MatMulNBits from onnxruntime's quantizer; the folder's other files copied, so OrtBackend
    runs it as it runs any export (function bodies: there are no custom nodes left). quantize=False
    stops before the quantizer: the plain-ONNX graph it starts from (tests hold it to the export)."""
    if (out / "model.onnx").is_file():
        return out
    import onnx
    import onnx.inliner
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = onnx.inliner.inline_local_functions(onnx.load(str(dense / "model.onnx")))
    _fold_transposed_weights(model)
    if quantize:
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=MATMULNBITS_BLOCK, is_symmetric=False,
                                         accuracy_level=MATMULNBITS_ACCURACY)
        quantizer.process()
        quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=True)
    else:
        onnx.save(model, str(tmp / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    for f in dense.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, tmp / f.name)
    manifest = json.loads((tmp / "shadowllm.json").read_text())
    manifest["weights"] = {"format": "int4", "block": MATMULNBITS_BLOCK, "lm_head": "int4",
                           "quantized_bytes": None, "note": "onnxruntime MatMulNBits (bench peer)"}
    (tmp / "shadowllm.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def matmulnbits_bytes(folder: Path) -> int:
    """Bytes a decode step of the MatMulNBits model reads: every initializer but the embedding table the
    Gather reads one row of."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    total = 0
    for init in model.graph.initializer:
        if init.name in gathered:
            continue
        length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        total += length if length is not None else len(init.raw_data)
    return total
