"""The CUDA backend: a Hugging Face model run on the GPU by the plugins' CUDA kernels, no TensorRT.

Each block's attention and MLP are the SparseHeadAttention / SparseNeuronMLP kernels (runtime/
cuda_kernels.py: device pointers, torch's stream); embeddings, norms, the LM head and sampling stay
in torch on the same stream. The weights live on the GPU in the ops' layouts (bf16, fp16 or fp32);
the KV cache is preallocated per request (`capacity` positions, doubled when a request outgrows it)
and written in place (docs/design.md §4: nothing is copied per step). Policies: dense, fixed head / neuron
masks (static, random), activation thresholds ([L, 4], THRESHOLD_INPUTS order; decode only, the
prefill runs dense as the exports do, with the MLP's gate / up weights channel-major so that kept x
channels are all it reads), and the predictors, on the GPU beside the kernels: ShadowLLM per sequence
(masks predicted at prefill from the last prompt token's layer-0 attention output, carried through
decode, kv_policy=active), per token (dense prefill; each decode step predicts its own masks after
layer 0) and DejaVu (dense prefill; layer l's residual input predicts layer l+1's masks), with the
per-layer allocation of predictor/allocation.py, per row of the batch. `from_export` reads all of it
from an export folder (runtime/policy.py), so an export runs here as it runs on onnxruntime.

Decode steps (one new token per row) are captured once as a CUDA graph per batch size and replayed
(gpt-fast's way to take Python and launch latency off the critical path): every input of the step
lives in a static device buffer — the token ids, positions, an attention mask as long as the cache,
and the past length, which the attention kernel reads on the device. Prefill runs uncaptured.

`device="cpu"` swaps the CUDA kernels for their torch reference (runtime/reference_kernels.py, no
graphs): the backend's own logic runs and is tested where no GPU is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from shadowllm.models import ShadowError, adapter_for
from shadowllm.models.adapters import AttentionWeights, MLPWeights, Norm
from shadowllm.models.reference import post_norm


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def own_copy(model):
    """A copy of `model` for the backend to take to its device and dtype, so that the caller's (a
    PyTorch reference beside it) keeps its own; the caches a model object carries are not copied."""
    import copy

    saved = {k: model.__dict__.pop(k) for k in ("_shadowllm_float64", "_shadowllm_adapter") if k in model.__dict__}
    try:
        return copy.deepcopy(model)
    finally:
        model.__dict__.update(saved)


@dataclass
class _Layer:
    attention: AttentionWeights
    mlp: MLPWeights
    attn_norm: object
    mlp_norm: object
    post_attn_norm: object = None  # gemma3_text: the norms on each block's output before the residual add
    post_mlp_norm: object = None
    window: int = 0  # sliding window of this layer's attention (0: every key)
    rope: str = "default"  # the RoPE table it reads


@dataclass
class CudaState:
    past: int  # positions already in the cache
    keys: list  # per layer [B, G, capacity, E]
    values: list
    masks: tuple | None = None  # per-sequence predictor: (heads [L, B, H], neurons [L, B, F]) from prefill


class CudaBackend:
    name = "cuda"

    def __init__(self, model, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None, *,
                 thresholds: torch.Tensor | None = None, kv_policy: str = "all", dtype: str = "bf16",
                 capacity: int = 1024, graphs: bool = True, predictor=None, head_sparsity: float = 0.0,
                 neuron_sparsity: float = 0.0, allocation: str = "per_layer", device: str = "cuda"):
        from shadowllm.predictor.allocation import check_sparsity

        if device == "cuda":
            from . import cuda_kernels as kernels

            kernels.require_cuda()
        elif device == "cpu":
            from . import reference_kernels as kernels

            graphs = False
        else:
            raise ShadowError(f"device {device!r}: expected cuda (the plugins' kernels) or cpu (their torch reference)")
        if dtype not in DTYPES:
            raise ShadowError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.kernels = kernels
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.predictor, self.allocation = predictor, allocation
        self.head_sparsity = check_sparsity(head_sparsity, "head sparsity")
        self.neuron_sparsity = check_sparsity(neuron_sparsity, "neuron sparsity")
        if predictor is not None:
            predictor.net.to(self.device).float().eval()  # scores in fp32 whatever the weights' dtype
            kv_policy = "active" if predictor.granularity == "sequence" else "all"
        self.adapter = adapter_for(model)
        arch = self.arch = self.adapter.arch
        if not arch.pre_norm:
            raise ShadowError(f"--backend cuda: post-norm models ({arch.model_type} with do_layer_norm_before=False) "
                              "are not supported")
        self.max_positions, self.vocab_size = arch.max_positions, arch.vocab
        self.capacity = min(capacity, arch.max_positions)
        self.kv_active = kv_policy == "active"
        self.graphs = graphs
        model.to(device=self.device, dtype=self.dtype).eval()
        self.thresholds = None if thresholds is None else thresholds.to(self.device, torch.float32).contiguous()
        channel_major = self.thresholds is not None
        with torch.no_grad():
            self.layers = [self._layer(i, channel_major) for i in range(arch.num_layers)]
            # one cos/sin table pair per RoPE kind (gemma3_text: local and global bases)
            self.ropes = {kind: tuple(t[0].to(self.dtype).contiguous() for t in pair) for kind, pair in
                          self.adapter.ropes(torch.arange(arch.max_positions, device=self.device)[None]).items()}
        L = arch.num_layers
        self.head_mask = (torch.ones(L, arch.num_heads, dtype=torch.bool) if head_mask is None
                          else head_mask.bool()).to(self.device)
        self.neuron_mask = (torch.ones(L, arch.ffn, dtype=torch.bool) if neuron_mask is None
                            else neuron_mask.bool()).to(self.device)
        self.workspaces = {}
        self._graphs = {}

    @classmethod
    def from_export(cls, folder, sparsity: float = 0.0, dtype: str = "bf16", device: str = "cuda", model=None,
                    **kwargs) -> "CudaBackend":
        """An export folder run by the kernels: the model the manifest names (or `model`, checked by
        fingerprint) with the export's policy at `sparsity` — masks, thresholds, predictor
        (runtime/policy.py). The graph itself is not used: the weights are the model's."""
        from pathlib import Path

        from shadowllm.export.folder import check_export_folder, sparsity_value

        from .policy import export_policy, exported_model

        if device == "cuda":
            from .cuda_kernels import require_cuda

            require_cuda()  # before loading anything
        folder = Path(folder)
        manifest = check_export_folder(folder, graph=False)
        sparsity_value(manifest, sparsity)
        if (manifest.get("weights") or {}).get("activations", "fp32") != "fp32":
            from shadowllm.models import ShadowError

            raise ShadowError(f"{folder}: its ops round activations to int8 (export --activations int8); the CUDA "
                              "kernels compute fp32 activations: export with --activations fp32 to run it here")
        model = exported_model(folder, manifest, model)  # rotated when the export's thresholds are
        config = export_policy(folder, manifest, model, sparsity)
        backend = cls(model, **config, kv_policy=manifest.get("kv_policy", "all"), dtype=dtype, device=device, **kwargs)
        backend.manifest = manifest
        return backend

    def _layer(self, i: int, channel_major: bool) -> _Layer:
        a, m = self.adapter.attention(i), self.adapter.mlp(i)
        def own(t):  # w_o_t / w_out_t: copies; a q/k norm keeps its eps with its own weight
            if t is None:
                return None
            if isinstance(t, Norm):
                return replace(t, weight=own(t.weight))
            return t.detach().contiguous()
        attention = AttentionWeights(**{k: own(v) for k, v in vars(a).items()})
        mlp = MLPWeights(**{k: own(v) for k, v in vars(m).items()})
        if channel_major:  # the layout weight_layout=channel_major names: gate / up stored [D, F]
            mlp = replace(mlp, w_in=mlp.w_in.t().contiguous(),
                          w_gate=None if mlp.w_gate is None else mlp.w_gate.t().contiguous())
        return _Layer(attention, mlp, self.adapter.attn_norm(i), self.adapter.mlp_norm(i), self.adapter.post_attn_norm(i),
                      self.adapter.post_mlp_norm(i), self.arch.window(i), self.arch.rope_kind(i))

    # ---------------------------------------------------------------- one forward
    def _workspace(self, kind: str, tokens: int) -> torch.Tensor:
        """The op's workspace for `tokens` tokens (grown, zeroed, when a call needs more)."""
        have = self.workspaces.get(kind)
        if have is not None and have[1] >= tokens:
            return have[0]
        a = self.arch
        ws = (self.kernels.attention_workspace(tokens, a.hidden, a.num_heads, a.num_kv_heads, a.head_dim, self.device)
              if kind == "attention" else
              self.kernels.mlp_workspace(tokens, a.hidden, a.ffn, self.thresholds is not None, self.device))
        self.workspaces[kind] = (ws, tokens)
        return ws

    def _blocks(self, x, state: CudaState, attention_mask, position_ids, past: int, decode: bool, clean: bool,
                past_length=None, last_only: bool = False):
        a = self.arch
        B, S, _ = x.shape
        # clean: decode steps (the prefill before them, with more tokens, left a larger zeroed region)
        attn_ws, mlp_ws = self._workspace("attention", B * S), self._workspace("mlp", B * S)
        heads, neurons = self._masks(state, B, decode)
        thr = self.thresholds if decode else None
        y = torch.empty_like(x)
        for i, layer in enumerate(self.layers):
            if self._dejavu(decode) and i + 1 < a.num_layers:  # lookahead: this input picks the next layer's masks
                self._fill(heads, neurons, i + 1, self.predictor.net.layer(i + 1, x[:, -1].float()), dense_layers=())
            cos, sin = self.ropes.get(layer.rope, (None, None))
            self.kernels.sparse_head_attention(
                layer.attn_norm(x), layer.attention, state.keys[i], state.values[i], attention_mask, position_ids,
                cos, sin, heads[i], y, attn_ws, past=past, heads=a.num_heads, kv_heads=a.num_kv_heads,
                head_dim=a.head_dim, scale=a.scale, kv_active=self.kv_active,
                t_x=None if thr is None else thr[i, 0], t_o=None if thr is None else thr[i, 1],
                past_length=past_length, clean=clean, window=layer.window)
            if i == 0 and self._after_layer0(decode):  # layer 0 is dense; its output picks layers 1..
                self._fill(heads, neurons, slice(None), self.predictor.net(y[:, -1].float()))
                if not decode:
                    state.masks = (heads, neurons)  # per sequence: carried through decode
            x = x + post_norm(layer.post_attn_norm, y)
            self.kernels.sparse_neuron_mlp(
                layer.mlp_norm(x), layer.mlp, neurons[i], y, mlp_ws, activation=a.activation,
                t_x=None if thr is None else thr[i, 2], t_h=None if thr is None else thr[i, 3],
                channel_major=self.thresholds is not None, clean=clean)
            x = x + post_norm(layer.post_mlp_norm, y)
        return self.adapter.logits(x[:, -1:] if last_only else x).float()

    # ---------------------------------------------------------------- masks and predictors
    def _masks(self, state: CudaState, batch: int, decode: bool):
        """(heads [L, B, H], neurons [L, B, F]) bool for this call: the fixed masks, or all kept for a
        predictor to fill (dense at a token / DejaVu predictor's prefill), or a sequence's carried ones."""
        if state.masks is not None and decode:
            return state.masks
        if self.predictor is None:
            return (self.head_mask[:, None].expand(-1, batch, -1).contiguous(),
                    self.neuron_mask[:, None].expand(-1, batch, -1).contiguous())
        a = self.arch
        return (torch.ones(a.num_layers, batch, a.num_heads, dtype=torch.bool, device=self.device),
                torch.ones(a.num_layers, batch, a.ffn, dtype=torch.bool, device=self.device))

    def _after_layer0(self, decode: bool) -> bool:
        """A ShadowLLM predictor runs after layer 0: at prefill per sequence, at decode per token."""
        p = self.predictor
        return p is not None and p.kind == "shadow" and (decode == (p.granularity == "token"))

    def _dejavu(self, decode: bool) -> bool:
        return self.predictor is not None and self.predictor.kind == "dejavu" and decode

    def _fill(self, heads, neurons, layers, scores, dense_layers=(0,)):
        """Write the kept units of predictor scores into the masks: `layers` = all (scores [B, L-1, H+F]
        for layers 1..) or one layer l (scores [B, H+F]), the per-layer allocation of the reference."""
        from shadowllm.predictor.allocation import keep_mask
        from shadowllm.predictor.predictors import split_scores

        H = self.arch.num_heads
        if isinstance(layers, slice):
            h, n = split_scores(scores, H)  # [B, L, H], [B, L, F] with layer 0 = +inf
        else:
            h, n = scores[:, None, :H], scores[:, None, H:]  # one layer: [B, 1, X]
        for mask, part, sparsity in ((heads, h, self.head_sparsity), (neurons, n, self.neuron_sparsity)):
            if sparsity:
                kept = keep_mask(part, sparsity, self.allocation, dense_layers=dense_layers).transpose(0, 1)
                mask[layers].copy_(kept if isinstance(layers, slice) else kept[0])

    def _new_state(self, batch: int, tokens: int) -> CudaState:
        if tokens > self.arch.max_positions:
            raise ShadowError(f"{tokens} positions exceed the model's {self.arch.max_positions}")
        capacity = min(max(self.capacity, tokens), self.arch.max_positions)
        shape = (batch, self.arch.num_kv_heads, capacity, self.arch.head_dim)
        L = self.arch.num_layers
        return CudaState(0, [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(L)],
                         [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(L)])

    def _grown(self, state: CudaState, needed: int) -> CudaState:
        """A cache twice as long (at least `needed`) holding the same past: the next decode step
        captures a new graph for it."""
        grown = self._new_state(state.keys[0].shape[0], max(2 * state.keys[0].shape[2], needed))
        for old, new in zip(state.keys + state.values, grown.keys + grown.values):
            new[:, :, :state.past].copy_(old[:, :, :state.past])
        grown.past, grown.masks = state.past, state.masks
        return grown

    def forward(self, input_ids, attention_mask, state, last_only: bool = False):
        B, S = input_ids.shape
        with torch.inference_mode():
            if state is None:
                state = self._new_state(B, S)
            past = state.past
            if past + S > state.keys[0].shape[2]:
                state = self._grown(state, past + S)
            # positions where the mask is (the generation loop keeps it on the host: no device sync here)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            top = int(positions.max())
            if top >= self.arch.max_positions:
                raise ShadowError(f"position {top} exceeds the model's {self.arch.max_positions}")
            ids = input_ids.to(self.device, non_blocking=True)
            mask = attention_mask.to(self.device, non_blocking=True)
            positions = positions.to(self.device, non_blocking=True)
            if S == 1 and past > 0 and self.graphs:
                logits = self._replay(ids, mask, positions, state)
            else:
                x = self.adapter.embed(ids, positions)
                logits = self._blocks(x, state, mask.contiguous(), positions.contiguous(), past, decode=past > 0,
                                      clean=past > 0, last_only=last_only)
            state.past = past + S
            return logits.cpu(), state  # the generation loop samples on the host, like every backend

    # ---------------------------------------------------------------- CUDA graphs for decode
    def _replay(self, ids, mask, positions, state: CudaState):
        B = ids.shape[0]
        # the graph holds the addresses of every cache (and carried masks) it was captured with
        key = (B, *(t.data_ptr() for t in state.keys + state.values + list(state.masks or ())))
        graph = self._graphs.get(key)
        if graph is None:
            self._graphs.clear()  # one request's cache at a time
            graph = self._graphs[key] = _DecodeGraph(self, state, B)
        return graph.run(ids, mask, positions, state.past)


class _DecodeGraph:
    """One decode step of batch B on one cache, captured: static inputs, static logits."""

    def __init__(self, backend: CudaBackend, state: CudaState, batch: int):
        dev, capacity = backend.device, state.keys[0].shape[2]
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(batch, capacity, dtype=torch.long, device=dev)
        self.past = torch.zeros((), dtype=torch.long, device=dev)
        self.backend, self.state = backend, state

        def step():
            x = backend.adapter.embed(self.ids, self.positions)
            return backend._blocks(x, state, self.mask, self.positions, state.past, decode=True, clean=True,
                                   past_length=self.past)

        # Warm up on a side stream (allocator, occupancy queries), then capture. The warm-up writes
        # the cache at `past` with a zero token; the real step rewrites that position.
        self.past.fill_(state.past)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def run(self, ids, mask, positions, past: int):
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.mask.zero_()
        self.mask[:, :mask.shape[1]].copy_(mask)
        self.past.fill_(past)
        self.graph.replay()
        return self.logits.clone()
