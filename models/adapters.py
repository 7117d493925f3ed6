"""Architecture adapters: one small interface over the HF model families we deploy.

An adapter reads a plain Hugging Face causal LM and hands out its shape (`Arch`) and, per layer, its
weights in the layouts of docs/export-format.md: projections keep PyTorch's [out, in] layout except the output
projections (`o_proj`/`out_proj`, `down_proj`/`fc2`), which are handed out transposed so that every
head and every neuron owns contiguous rows. Tensors are views of the model's own parameters (no
copies), so gradients flow back into the model when a criterion needs them.

Two families cover the models we support:
- OPT: LayerNorm (pre- or post-norm), biases everywhere, learned positions (offset 2), ReLU MLP,
  optional project_in / project_out around the decoder;
- Llama family (Llama, SmolLM2, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU
  MLP, optional q/k/v biases (Qwen2), tied or untied embeddings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ShadowError

# HF activation names -> the op attribute values of docs/export-format.md.
_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = ("opt",) + LLAMA_FAMILY


def activation_fn(name: str):
    """The elementwise activation for an op `activation` attribute."""
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    if name == "silu":
        return F.silu
    raise ShadowError(f"activation {name!r} is not supported (expected relu, gelu, gelu_tanh or silu)")


@dataclass(frozen=True)
class Arch:
    """The shape of a model, in the letters of docs/export-format.md."""

    family: str  # "opt" | "llama"
    model_type: str  # the HF model_type (opt, llama, mistral, qwen2)
    num_layers: int  # L
    hidden: int  # D
    num_heads: int  # H
    num_kv_heads: int  # G
    head_dim: int  # E
    ffn: int  # F
    activation: str  # relu | gelu | gelu_tanh | silu
    gated: bool  # SwiGLU-style gate (Llama family)
    rope: bool
    vocab: int
    max_positions: int
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    pre_norm: bool  # False only for post-norm OPT variants (opt-350m)
    sliding_window: int | None = None

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def block_parameters(self) -> int:
        return block_parameters(self.num_layers, self.hidden, self.num_heads, self.num_kv_heads, self.head_dim,
                                self.ffn, self.gated)


def block_parameters(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, gated: bool) -> int:
    """Weights of the attention and MLP blocks (what a dense decode step reads; embeddings excluded):
    q and o are heads*head_dim x hidden each, k and v kv_heads*head_dim x hidden, the MLP 2 or 3 x ffn x hidden."""
    return layers * ((2 * heads + 2 * kv_heads) * head_dim * hidden + (3 if gated else 2) * ffn * hidden)


@dataclass
class AttentionWeights:
    w_q: torch.Tensor  # [H*E, D]
    w_k: torch.Tensor  # [G*E, D]
    w_v: torch.Tensor  # [G*E, D]
    w_o_t: torch.Tensor  # [H*E, D] (o_proj.weight transposed)
    b_q: torch.Tensor | None = None
    b_k: torch.Tensor | None = None
    b_v: torch.Tensor | None = None
    b_o: torch.Tensor | None = None


@dataclass
class MLPWeights:
    w_in: torch.Tensor  # [F, D]: fc1 (OPT) or up_proj (Llama)
    w_out_t: torch.Tensor  # [F, D]: fc2 / down_proj transposed
    w_gate: torch.Tensor | None = None  # [F, D]: gate_proj (Llama)
    b_in: torch.Tensor | None = None
    b_out: torch.Tensor | None = None


@dataclass
class Norm:
    kind: str  # "layernorm" | "rmsnorm"
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        # RMSNorm in fp32, as the Llama family computes it.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def _bias(linear) -> torch.Tensor | None:
    return linear.bias if getattr(linear, "bias", None) is not None else None


class Adapter:
    """Interface every family implements. `arch` is the shape; the rest hands out weights."""

    arch: Arch
    dtype: torch.dtype | None = None  # None: the parameters themselves; else copies in this dtype

    def __init__(self, model):
        self.model = model

    def in_dtype(self, dtype: torch.dtype) -> "Adapter":
        """A view of the same model whose weights are handed out converted to `dtype`, one layer at a
        time as they are read (parity's float64 golden computes in float64 without a float64 copy of
        the whole model in memory: the fp32 weights convert exactly)."""
        view = copy.copy(self)
        view.dtype, view._head_cache = dtype, None
        return view

    def _t(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or self.dtype is None else t.to(self.dtype)

    def _rows(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Embedding rows: looked up first, then converted (exact, and only the rows read are)."""
        return self._t(F.embedding(ids, table))

    def _head(self) -> torch.Tensor:
        """The LM head's weight in this view's dtype, converted once per view (it is read whole by every
        forward, and is the largest single matrix)."""
        weight = self.model.lm_head.weight
        if self.dtype is None:
            return weight
        if getattr(self, "_head_cache", None) is None:
            self._head_cache = weight.detach().to(self.dtype)
        return self._head_cache

    def attention(self, layer: int) -> AttentionWeights:
        raise NotImplementedError

    def mlp(self, layer: int) -> MLPWeights:
        raise NotImplementedError

    def attn_norm(self, layer: int) -> Norm:
        raise NotImplementedError

    def mlp_norm(self, layer: int) -> Norm:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rope(self, position_ids: torch.Tensor):
        """cos, sin of shape [B, S, E/2] at `position_ids`, or None without RoPE."""
        return None


class OptAdapter(Adapter):
    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.decoder = model.model.decoder
        act = _ACTIVATIONS.get(cfg.activation_function)
        if act is None:
            raise ShadowError(f"OPT activation {cfg.activation_function!r} is not supported")
        self.arch = Arch(
            family="opt",
            model_type="opt",
            num_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            ffn=cfg.ffn_dim,
            activation=act,
            gated=False,
            rope=False,
            vocab=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings,
            norm="layernorm",
            norm_eps=1e-5,
            pre_norm=bool(cfg.do_layer_norm_before),
        )

    def _layer(self, i):
        return self.decoder.layers[i]

    def attention(self, layer):
        a = self._layer(layer).self_attn
        t = self._t
        return AttentionWeights(
            w_q=t(a.q_proj.weight), b_q=t(_bias(a.q_proj)),
            w_k=t(a.k_proj.weight), b_k=t(_bias(a.k_proj)),
            w_v=t(a.v_proj.weight), b_v=t(_bias(a.v_proj)),
            w_o_t=t(a.out_proj.weight).t(), b_o=t(_bias(a.out_proj)),
        )

    def mlp(self, layer):
        m = self._layer(layer)
        t = self._t
        return MLPWeights(w_in=t(m.fc1.weight), b_in=t(_bias(m.fc1)), w_out_t=t(m.fc2.weight).t(),
                          b_out=t(_bias(m.fc2)))

    def _norm(self, ln) -> Norm:
        return Norm("layernorm", self._t(ln.weight), self._t(ln.bias), ln.eps)

    def attn_norm(self, layer):
        return self._norm(self._layer(layer).self_attn_layer_norm)

    def mlp_norm(self, layer):
        return self._norm(self._layer(layer).final_layer_norm)

    def embed(self, input_ids, position_ids):
        d, t = self.decoder, self._t
        x = self._rows(input_ids, d.embed_tokens.weight)
        if d.project_in is not None:
            x = F.linear(x, t(d.project_in.weight), t(_bias(d.project_in)))
        # OPT's learned positions are offset by 2 (a fairseq legacy).
        return x + self._rows(position_ids + d.embed_positions.offset, d.embed_positions.weight)

    def logits(self, hidden):
        d, t = self.decoder, self._t
        if d.final_layer_norm is not None:
            hidden = self._norm(d.final_layer_norm)(hidden)
        if d.project_out is not None:
            hidden = F.linear(hidden, t(d.project_out.weight), t(_bias(d.project_out)))
        return F.linear(hidden, self._head())


class LlamaAdapter(Adapter):
    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.inner = model.model
        first = self.inner.layers[0]
        if hasattr(first.self_attn, "q_norm"):
            raise ShadowError(f"model_type {cfg.model_type!r} with q/k norms is not supported")
        if getattr(cfg, "mlp_bias", False):
            raise ShadowError("Llama-family models with mlp_bias=True are not supported (SparseNeuronMLP has no gate bias)")
        act = _ACTIVATIONS.get(cfg.hidden_act)
        if act is None:
            raise ShadowError(f"activation {cfg.hidden_act!r} is not supported")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        rotary = self.inner.rotary_emb
        if rotary.inv_freq.numel() * 2 != head_dim:
            raise ShadowError("partial rotary embeddings are not supported (inv_freq does not cover head_dim)")
        window = getattr(cfg, "sliding_window", None)
        if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            window = None
        self.arch = Arch(
            family="llama",
            model_type=cfg.model_type,
            num_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            ffn=cfg.intermediate_size,
            activation=act,
            gated=True,
            rope=True,
            vocab=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings,
            norm="rmsnorm",
            norm_eps=cfg.rms_norm_eps,
            pre_norm=True,
            sliding_window=window,
        )

    def _layer(self, i):
        return self.inner.layers[i]

    def attention(self, layer):
        a = self._layer(layer).self_attn
        t = self._t
        return AttentionWeights(
            w_q=t(a.q_proj.weight), b_q=t(_bias(a.q_proj)),
            w_k=t(a.k_proj.weight), b_k=t(_bias(a.k_proj)),
            w_v=t(a.v_proj.weight), b_v=t(_bias(a.v_proj)),
            w_o_t=t(a.o_proj.weight).t(), b_o=t(_bias(a.o_proj)),
        )

    def mlp(self, layer):
        m, t = self._layer(layer).mlp, self._t
        return MLPWeights(w_in=t(m.up_proj.weight), w_gate=t(m.gate_proj.weight), w_out_t=t(m.down_proj.weight).t())

    def _norm(self, rms) -> Norm:
        eps = getattr(rms, "variance_epsilon", None) or getattr(rms, "eps", self.arch.norm_eps)
        return Norm("rmsnorm", self._t(rms.weight), None, eps)

    def attn_norm(self, layer):
        return self._norm(self._layer(layer).input_layernorm)

    def mlp_norm(self, layer):
        return self._norm(self._layer(layer).post_attention_layernorm)

    def embed(self, input_ids, position_ids):
        return self._rows(input_ids, self.inner.embed_tokens.weight)

    def logits(self, hidden):
        return F.linear(self._norm(self.inner.norm)(hidden), self._head())

    def rope(self, position_ids):
        rotary = self.inner.rotary_emb
        freqs = position_ids.float()[..., None] * rotary.inv_freq.float()
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        return torch.cos(freqs) * scaling, torch.sin(freqs) * scaling


def adapter_for(model) -> Adapter:
    """The adapter for a HF causal LM, built once and kept on the model."""
    cached = getattr(model, "_shadowllm_adapter", None)
    if cached is not None:
        return cached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "opt":
        adapter = OptAdapter(model)
    elif model_type in LLAMA_FAMILY:
        adapter = LlamaAdapter(model)
    else:
        raise ShadowError(
            f"model_type {model_type!r} is not supported (expected one of: {', '.join(SUPPORTED)})"
        )
    model._shadowllm_adapter = adapter
    return adapter
