"""The CUDA backend: a Hugging Face model run on the GPU by the plugins' CUDA kernels, no TensorRT.

Each block's attention and MLP are the SparseHeadAttention / SparseNeuronMLP kernels (runtime/
cuda_kernels.py: device pointers, torch's stream); embeddings, norms, the LM head and sampling stay
in torch on the same stream. The weights live on the GPU in the ops' layouts (bf16, fp16 or fp32);
the KV cache is preallocated per request (`capacity` positions, doubled when a request outgrows it)
and written in place (DESIGN §4: nothing is copied per step). Policies: dense, fixed head / neuron masks (static, random) and activation thresholds
([L, 4], THRESHOLD_INPUTS order; decode only, the prefill runs dense as the exports do, with the
MLP's gate / up weights channel-major so that kept x channels are all it reads).

Decode steps (one new token per row) are captured once as a CUDA graph per batch size and replayed
(gpt-fast's way to take Python and launch latency off the critical path): every input of the step
lives in a static device buffer — the token ids, positions, an attention mask as long as the cache,
and the past length, which the attention kernel reads on the device. Prefill runs uncaptured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from shadowllm.models import ShadowError, adapter_for
from shadowllm.models.adapters import AttentionWeights, MLPWeights

from . import cuda_kernels as kernels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class _Layer:
    attention: AttentionWeights
    mlp: MLPWeights
    attn_norm: object
    mlp_norm: object


@dataclass
class CudaState:
    past: int  # positions already in the cache
    keys: list  # per layer [B, G, capacity, E]
    values: list


class CudaBackend:
    name = "cuda"

    def __init__(self, model, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None, *,
                 thresholds: torch.Tensor | None = None, kv_policy: str = "all", dtype: str = "bf16",
                 capacity: int = 1024, graphs: bool = True):
        kernels.require_cuda()
        if dtype not in DTYPES:
            raise ShadowError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.device = torch.device("cuda")
        self.dtype = DTYPES[dtype]
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
            self.cos = self.sin = None
            if arch.rope:
                cos, sin = self.adapter.rope(torch.arange(arch.max_positions, device=self.device)[None])
                self.cos, self.sin = (t[0].to(self.dtype).contiguous() for t in (cos, sin))
        L = arch.num_layers
        self.head_mask = (torch.ones(L, arch.num_heads, dtype=torch.bool) if head_mask is None
                          else head_mask.bool()).to(self.device)
        self.neuron_mask = (torch.ones(L, arch.ffn, dtype=torch.bool) if neuron_mask is None
                            else neuron_mask.bool()).to(self.device)
        self.workspaces = {}
        self._graphs = {}

    def _layer(self, i: int, channel_major: bool) -> _Layer:
        a, m = self.adapter.attention(i), self.adapter.mlp(i)
        own = lambda t: None if t is None else t.detach().contiguous()  # noqa: E731  (w_o_t / w_out_t: copies)
        attention = AttentionWeights(**{k: own(v) for k, v in vars(a).items()})
        mlp = MLPWeights(**{k: own(v) for k, v in vars(m).items()})
        if channel_major:  # the layout weight_layout=channel_major names: gate / up stored [D, F]
            mlp = replace(mlp, w_in=mlp.w_in.t().contiguous(),
                          w_gate=None if mlp.w_gate is None else mlp.w_gate.t().contiguous())
        return _Layer(attention, mlp, self.adapter.attn_norm(i), self.adapter.mlp_norm(i))

    # ---------------------------------------------------------------- one forward
    def _workspace(self, kind: str, tokens: int) -> torch.Tensor:
        """The op's workspace for `tokens` tokens (grown, zeroed, when a call needs more)."""
        have = self.workspaces.get(kind)
        if have is not None and have[1] >= tokens:
            return have[0]
        a = self.arch
        ws = (kernels.attention_workspace(tokens, a.hidden, a.num_heads, a.num_kv_heads, a.head_dim, self.device)
              if kind == "attention" else
              kernels.mlp_workspace(tokens, a.hidden, a.ffn, self.thresholds is not None, self.device))
        self.workspaces[kind] = (ws, tokens)
        return ws

    def _blocks(self, x, state: CudaState, attention_mask, position_ids, past: int, decode: bool, clean: bool,
                past_length=None, last_only: bool = False):
        a = self.arch
        B, S, _ = x.shape
        # clean: decode steps (the prefill before them, with more tokens, left a larger zeroed region)
        attn_ws, mlp_ws = self._workspace("attention", B * S), self._workspace("mlp", B * S)
        heads = self.head_mask[:, None].expand(-1, B, -1).contiguous() if B > 1 else self.head_mask[:, None]
        neurons = self.neuron_mask[:, None].expand(-1, B, -1).contiguous() if B > 1 else self.neuron_mask[:, None]
        thr = self.thresholds if decode else None
        y = torch.empty_like(x)
        for i, layer in enumerate(self.layers):
            kernels.sparse_head_attention(
                layer.attn_norm(x), layer.attention, state.keys[i], state.values[i], attention_mask, position_ids,
                self.cos, self.sin, heads[i], y, attn_ws, past=past, heads=a.num_heads, kv_heads=a.num_kv_heads,
                head_dim=a.head_dim, scale=a.scale, kv_active=self.kv_active,
                t_x=None if thr is None else thr[i, 0], t_o=None if thr is None else thr[i, 1],
                past_length=past_length, clean=clean)
            x = x + y
            kernels.sparse_neuron_mlp(
                layer.mlp_norm(x), layer.mlp, neurons[i], y, mlp_ws, activation=a.activation,
                t_x=None if thr is None else thr[i, 2], t_h=None if thr is None else thr[i, 3],
                channel_major=self.thresholds is not None, clean=clean)
            x = x + y
        return self.adapter.logits(x[:, -1:] if last_only else x).float()

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
        grown.past = state.past
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
        key = (B, state.keys[0].shape[2], state.keys[0].data_ptr())
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
