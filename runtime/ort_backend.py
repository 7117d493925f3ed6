"""The ONNX Runtime backend over an export folder (docs/design.md §4).

One InferenceSession per folder (CPU by default, CUDA first when that provider exists). The KV cache
and the carried masks stay ORT values between steps: `present.*` outputs are bound with I/O binding
and fed back as the next step's `past_key_values.*` without a round trip through NumPy. The native
custom-op library is registered when it is built (`native=None`), required (`True`) or left out
(`False`, the function bodies run).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from shadowllm.export.folder import check_export_folder, sparsity_value
from shadowllm.export.names import cache_names
from shadowllm.models import ShadowError

def _threads_from_environment() -> int | None:
    """OMP_NUM_THREADS, which PyTorch honours too, so one variable sizes both pools (e.g. a test
    worker sharing the cores with others); None when unset: onnxruntime's default, every core."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


class OrtBackend:
    name = "ort"

    def __init__(self, folder: str | os.PathLike, sparsity: float = 0.0, providers=None, threads: int | None = None,
                 native: bool | None = None, profile_prefix: str | None = None, probe: bool = False):
        """probe: also return every sparse op's input x and output y (state["probe"]["<node name>.x" /
        ".y"]), for the parity check of each op at every step; the session then runs a copy of the graph
        with those extra outputs."""
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = check_export_folder(folder)
        self.sparsity = sparsity_value(self.manifest, sparsity)
        a = self.manifest["arch"]
        self.layers, self.heads, self.kv_heads = a["layers"], a["heads"], a["kv_heads"]
        self.head_dim, self.neurons = a["head_dim"], a["neurons"]
        self.vocab_size, self.max_positions = a["vocab"], a["max_positions"]
        self.past_names, self.present_names = cache_names(self.layers)
        from shadowllm.compiler.native import session_options

        # The C++ kernels run on this session's intra-op pool (KernelContext::ParallelFor).
        options, self.native = session_options(native)
        threads = threads or _threads_from_environment()
        if threads:
            options.intra_op_num_threads = threads
        if profile_prefix:  # onnxruntime's per-node profiler (bench: the predictor's share of time)
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        path = _probe_copy(folder) if probe else folder / "model.onnx"
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt models
            raise ShadowError(f"{folder / 'model.onnx'}: onnxruntime cannot load it "
                              f"({str(e).splitlines()[0][:200]})") from None
        finally:
            if probe:
                path.unlink(missing_ok=True)  # the session holds the graph and its weights now
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._present_set = set(self.present_names)
        # the order a binding hands its outputs back in: the caches are bound first (rebinding a name
        # keeps its place)
        self._bound_order = self.present_names + [n for n in self.output_names if n not in self._present_set]
        self._probe_names = [n for n in self.output_names if n.startswith(PROBE)]
        self._sparsity_value = None  # (array, OrtValue) made once: an OrtValue does not own its array
        self._keep_arrays = [np.array(0, np.int64), np.array(1, np.int64)]
        self._logits_to_keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._keep_arrays]
        # exports older than the input run the LM head on every position (sliced after the run)
        # (an input with a default is an "overridable initializer" to onnxruntime, not one of its inputs)
        self.keeps_logits = "logits_to_keep" in {i.name for i in self.session.get_overridable_initializers()}
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def initial_state(self, batch: int, head_mask=None, neuron_mask=None):
        import onnxruntime as ort

        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        heads = np.ones((batch, self.layers, self.heads), bool) if head_mask is None else np.asarray(head_mask)
        neurons = np.ones((batch, self.layers, self.neurons), bool) if neuron_mask is None else np.asarray(neuron_mask)
        value = ort.OrtValue.ortvalue_from_numpy
        return {"past": [value(empty) for _ in range(2 * self.layers)], "heads": value(heads),
                "neurons": value(neurons)}

    def forward(self, input_ids, attention_mask, state, last_only: bool = False):
        """input_ids [B, S] and attention_mask [B, P+S] (torch) -> (logits torch [B, S, V], state);
        last_only: logits [B, 1, V] of the last position, the LM head run on that row only."""
        import onnxruntime as ort

        ids = input_ids.numpy().astype(np.int64)
        mask = attention_mask.numpy().astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ShadowError(f"token ids must lie in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
        if mask.shape[1] > self.max_positions:
            raise ShadowError(f"{mask.shape[1]} tokens exceed the model's {self.max_positions} positions")
        if state is None:
            state = self.initial_state(ids.shape[0])
        P = mask.shape[1] - ids.shape[1]
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, P:].astype(np.int64)
        value = ort.OrtValue.ortvalue_from_numpy
        # `state` keeps the buffers the past lives in alive through the run (OrtValues made from numpy
        # arrays do not own them); the new state holds the ones present is written into.
        in_place = self.native and self.device == "cpu"  # past and present are one buffer
        if in_place:
            caches, buffers = self._shared_cache(state, ids.shape[0], mask.shape[1], P)
            # one binding per set of cache buffers: the 2 * layers caches are bound once as input and
            # output, each step rebinds only what changes (binding all ~130 names anew cost ~1 ms of
            # Python a step, 7-10% of a 4-bit decode step)
            binding = buffers["shared"].get("binding")
            if binding is None:
                binding = buffers["shared"]["binding"] = self.session.io_binding()
                for name, past, present in zip(self.past_names, caches.values(), self.present_names):
                    binding.bind_ortvalue_input(name, past)
                    binding.bind_ortvalue_output(present, past)
        else:
            binding = self.session.io_binding()
            caches, buffers = self._cache_buffers(state, ids.shape[0], mask.shape[1])
            for name, past in zip(self.past_names, state["past"]):
                binding.bind_ortvalue_input(name, past)
            for name in self.present_names:
                if caches is not None:
                    binding.bind_ortvalue_output(name, caches[name])
                else:
                    binding.bind_output(name, self.device)
        binding.bind_ortvalue_input("input_ids", value(ids))
        binding.bind_ortvalue_input("attention_mask", value(mask))
        binding.bind_ortvalue_input("position_ids", value(positions))
        binding.bind_ortvalue_input("shadow_head_mask", state["heads"])
        binding.bind_ortvalue_input("shadow_neuron_mask", state["neurons"])
        if self._sparsity_value is None or self._sparsity_value[0] is not self.sparsity:
            self._sparsity_value = self.sparsity, value(self.sparsity)
        binding.bind_ortvalue_input("sparsity", self._sparsity_value[1])
        if self.keeps_logits:
            binding.bind_ortvalue_input("logits_to_keep", self._logits_to_keep[bool(last_only)])
        for name in self.output_names:
            if name not in self._present_set:
                binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        # the outputs wrapped as OrtValues only where used: wrapping all of them (the caches too) cost
        # ~0.4 ms a step; in place, the caches are the buffers bound
        raw = dict(zip(self._bound_order, binding._iobinding.get_outputs()))
        outs = {name: ort.OrtValue(v) for name, v in raw.items()
                if not (in_place and name in self._present_set)}
        logits = torch.from_numpy(outs["logits"].numpy())
        if last_only and logits.shape[1] > 1:
            logits = logits[:, -1:].clone()
        past = [outs[name] if name in outs else caches[name] for name in self.present_names]
        probe = {n[len(PROBE):]: outs[n].numpy() for n in self._probe_names}
        return logits, {"past": past, "heads": outs["shadow_head_mask_out"], "neurons": outs["shadow_neuron_mask_out"],
                        **({"probe": probe} if probe else {}), **buffers, "length": mask.shape[1]}

    @staticmethod
    def past_arrays(state) -> list[np.ndarray]:
        """The KV cache of a state as NumPy arrays [B, G, length, E] (key, value of each layer), without
        the unused positions of a preallocated cache."""
        return [v.numpy()[:, :, :state["length"]] for v in state["past"]]

    def _shared_cache(self, state, batch: int, length: int, past: int):
        """With the native kernels (CPU): one preallocated [B, G, capacity, E] buffer per cache, bound as
        both the past input and the present output, so each step writes only its new positions (the
        op's contract: present is past_key with positions P..T-1 written; the C++ kernel skips the
        copy when they are the same memory). Capacity doubles when full (the past copied once).
        (Before, present = past + new copied the whole cache every step: docs/performance.md, "Long
        contexts".) Returns ({present name: OrtValue}, {"shared": the buffers})."""
        import onnxruntime as ort

        buffers = state.get("shared")
        if buffers is None or buffers["positions"] < length:
            positions = max(2 * length, 256) if buffers is None else max(2 * buffers["positions"], length)
            shape = (batch, self.kv_heads, positions, self.head_dim)
            arrays = [np.zeros(shape, np.float32) for _ in range(2 * self.layers)]
            if past:  # the cache so far: the old buffers', or a state's own arrays (initial_state)
                for new, old in zip(arrays, buffers["arrays"] if buffers else [v.numpy() for v in state["past"]]):
                    new[:, :, :past] = old[:, :, :past]
            buffers = {"positions": positions, "arrays": arrays,
                       "values": [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]}
        return dict(zip(self.present_names, buffers["values"])), {"shared": buffers}

    def _cache_buffers(self, state, batch: int, length: int):
        """Where this call's `present` caches go when the function bodies run (stock onnxruntime, CPU):
        two preallocated flat buffers per cache, used in turn — the graph reads the past (exactly P
        positions) from one and writes present = past + new into the other, a contiguous prefix of it.
        The bodies' Concat still copies the past every step (they cannot write in place), but into
        memory allocated once per request (doubled when full), instead of a new block a position
        longer each step: those ever-growing blocks fragmented the allocator (+0.65 GB peak RSS over
        3,000 tokens for 132 MB of cache). Returns ({output name: OrtValue}, {"buffers": ...}), or
        (None, {}) off the CPU."""
        if self.device != "cpu":
            return None, {}
        import onnxruntime as ort

        per_position = batch * self.kv_heads * self.head_dim
        buffers = state.get("buffers")
        if buffers is None or buffers["positions"] < length:  # the past stays in the old ones for this call
            positions = max(2 * length, 256) if buffers is None else max(2 * buffers["positions"], length)
            buffers = {"positions": positions,
                       "flat": [[np.empty(positions * per_position, np.float32) for _ in range(2)]
                                for _ in range(2 * self.layers)]}
        flip = state.get("flip", 0)
        shape = (batch, self.kv_heads, length, self.head_dim)
        return {name: ort.OrtValue.ortvalue_from_numpy(buffers["flat"][i][flip][:length * per_position].reshape(shape))
                for i, name in enumerate(self.present_names)}, {"buffers": buffers, "flip": flip ^ 1}


PROBE = "probe/"


def _probe_copy(folder: Path) -> Path:
    """A copy of model.onnx (beside it, sharing its external weights) whose extra outputs
    `probe/<node name>.x` and `.y` are the input x and output y of each sparse op; the caller deletes it
    once loaded."""
    import onnx
    from onnx import helper

    from shadowllm.export.onnx_ops import DOMAIN

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in list(proto.graph.node):
        if node.domain == DOMAIN:
            for suffix, tensor in ((".x", node.input[0]), (".y", node.output[0])):
                name = PROBE + node.name + suffix
                proto.graph.node.append(helper.make_node("Identity", [tensor], [name]))
                proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = folder / f".probe-{os.getpid()}.onnx"
    onnx.save(proto, str(path))
    return path
