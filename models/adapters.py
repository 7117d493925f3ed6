"""Architecture adapters: one small interface over the HF model families we deploy.

An adapter reads a plain Hugging Face causal LM and hands out its shape (`Arch`) and, per layer, its
weights in the layouts of docs/export-format.md: projections keep PyTorch's [out, in] layout except the output
projections (`o_proj`/`out_proj`, `down_proj`/`fc2`), which are handed out transposed so that every
head and every neuron owns contiguous rows. Tensors are views of the model's own parameters (no
copies), so gradients flow back into the model when a criterion needs them.

Two families cover the models we support:
- OPT: LayerNorm (pre- or post-norm), biases everywhere, learned positions (offset 2), ReLU MLP,
  optional project_in / project_out around the decoder;
- Llama family: RMSNorm, RoPE, grouped-query attention, gated MLP, tied or untied embeddings, and what
  its descendants add on the same skeleton:
  - llama, mistral, qwen2: q/k/v biases (Qwen2), sliding-window attention (Mistral; Qwen2 with
    use_sliding_window) on every layer or on the layers `layer_types` names;
  - qwen3: a per-head RMSNorm on q and on k before RoPE (`q_norm` / `k_norm`), head_dim not hidden/heads;
  - gemma3_text: embeddings scaled by sqrt(hidden), RMSNorm scaling by (1 + w) (handed out folded: the
    same fp32 product), norms before *and after* attention and MLP, gated gelu-tanh MLP, q/k norms,
    the score scale from query_pre_attn_scalar, local sliding-window layers interleaved with global
    ones, each kind with its own RoPE table;
  - phi3 (Phi-3, Phi-3.5, Phi-4-mini): fused qkv_proj and gate_up_proj handed out as row views of the
    fused weights, partial rotary embeddings, longrope (the short factors: positions are capped at
    original_max_position_embeddings, past which transformers switches to the long ones).
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

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
SUPPORTED = ("opt",) + LLAMA_FAMILY
WINDOWED = ("mistral", "qwen2", "qwen3", "gemma3_text", "phi3")  # families whose transformers code applies a window


def check_supported(model_type) -> None:
    """The one-line refusal of a model family outside the list (before any weight is read)."""
    if model_type not in SUPPORTED:
        raise ShadowError(f"model_type {model_type!r} is not supported (expected one of: {', '.join(SUPPORTED)})")


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
    model_type: str  # the HF model_type (SUPPORTED)
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
    windows: tuple[int, ...] = ()  # per layer: keys a query sees (its own included); 0 = the whole cache
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (qwen3, gemma3_text)
    post_norms: bool = False  # a norm on each block's output before the residual add (gemma3_text)
    embed_scale: float | None = None  # embeddings multiplied by it (gemma3_text: sqrt(hidden))
    attn_scale: float | None = None  # the score scale when it is not head_dim^-0.5 (gemma3_text)
    rope_kinds: tuple[str, ...] = ()  # per layer: which RoPE table it reads (empty: one table, "default")
    rope_bases: tuple[tuple[str, float], ...] = ()  # (kind, theta) of each table, for `info`
    rotary_dim: int = 0  # dimensions of a head that RoPE rotates (phi3's partial rotary); 0 = head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def sliding_window(self) -> int | None:
        """The widest window of the windowed layers; None when every layer sees the whole cache."""
        return max(self.windows) if any(self.windows) else None

    def window(self, layer: int) -> int:
        return self.windows[layer] if self.windows else 0

    def rope_kind(self, layer: int) -> str:
        return self.rope_kinds[layer] if self.rope_kinds else "default"

    def identity(self) -> str:
        """The shape as text, for fingerprints (models/loading.py): exactly the repr Arch had before the
        fields of export revision 6, which enter only where they differ from their defaults, so that a
        model of an older family keeps its fingerprint (the shipped calibrations are named by it, and
        exports record it)."""
        import dataclasses

        old = [f.name for f in dataclasses.fields(self)][:16]  # family .. pre_norm
        text = ", ".join(f"{name}={getattr(self, name)!r}" for name in old) + f", sliding_window={self.sliding_window!r}"
        extra = [f for f in dataclasses.fields(self)[16:]
                 if f.name not in ("windows", "rope_bases") and getattr(self, f.name) != f.default]
        if self.sliding_window is not None and len(set(self.windows)) > 1:  # windows on some layers only
            extra.append(next(f for f in dataclasses.fields(self) if f.name == "windows"))
        text += "".join(f", {f.name}={getattr(self, f.name)!r}" for f in extra)
        return f"Arch({text})"

    def features(self) -> list[str]:
        """What this family adds to the plain skeleton, in words (for `info`)."""
        out = []
        if self.qk_norm:
            out.append("q/k norm")
        if self.post_norms:
            out.append("post-norms (after attention and MLP)")
        if self.embed_scale is not None:
            out.append(f"embeddings x {self.embed_scale:.4g}")
        if self.attn_scale is not None:
            out.append(f"score scale {self.attn_scale:.4g}")
        if self.sliding_window is not None:
            windowed = sum(1 for w in self.windows if w)
            out.append(f"sliding window {self.sliding_window} on {windowed} of {self.num_layers} layers")
        if self.rotary_dim and self.rotary_dim != self.head_dim:
            out.append(f"partial rotary ({self.rotary_dim} of {self.head_dim} dims)")
        return out

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
    q_norm: "Norm | None" = None  # per-head RMSNorm of q / k (over head_dim) before RoPE
    k_norm: "Norm | None" = None


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
        if torch.onnx.is_in_onnx_export():
            # x / sqrt(...) * w: the pattern onnxruntime fuses into one SimplifiedLayerNormalization node
            # (7 nodes -> 1 per norm; x * rsqrt(...) is not matched). Within an ulp of the eager form.
            return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
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

    def _project_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (after the final norm) times the LM head; with int8 activations (quant.fake_quantize_)
        the head's input is rounded to the activation grid first, as the quantized head computes. (Not
        while exporting: the exported head, a BlockedMatMul with activation_bits 8, rounds its input.)"""
        if getattr(self.model, "_shadowllm_activations", "fp32") != "fp32" and not torch.onnx.is_in_onnx_export():
            from .quant import round_activations

            hidden = round_activations(hidden)
        return F.linear(hidden, self._head())

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

    def post_attn_norm(self, layer: int) -> "Norm | None":
        """The norm on the attention block's output before the residual add (post_norms), or None."""
        return None

    def post_mlp_norm(self, layer: int) -> "Norm | None":
        return None

    def rope(self, position_ids: torch.Tensor, kind: str = "default"):
        """cos, sin of shape [B, S, R/2] at `position_ids` from the RoPE table `kind` (Arch.rope_kind),
        R the rotated dimensions of a head (head_dim unless partial); None without RoPE."""
        return None

    def ropes(self, position_ids: torch.Tensor) -> dict:
        """{kind: (cos, sin)} for every table the layers read ({} without RoPE)."""
        arch = self.arch
        if not arch.rope:
            return {}
        return {k: self.rope(position_ids, k) for k in dict.fromkeys(arch.rope_kind(i) for i in range(arch.num_layers))}


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
        return self._project_head(hidden)


def _layer_windows(cfg, num_layers: int) -> tuple[int, ...]:
    """Per layer, the sliding window of its attention (0: the whole cache), as transformers applies it:
    the layers `layer_types` calls sliding_attention when the config has that list (qwen2, qwen3,
    gemma3_text: set from use_sliding_window / max_window_layers / the pattern), else every layer when
    `sliding_window` is set (mistral, phi3)."""
    if cfg.model_type not in WINDOWED:  # transformers' Llama ignores a stray `sliding_window` in its config
        return ()
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
        window = None
    if not window:
        return ()
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    else:
        windows = (int(window),) * num_layers
    return windows if any(windows) else ()


class LlamaAdapter(Adapter):
    """The Llama skeleton and its descendants (module docstring); a subclass per family overrides
    only where the family differs."""

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.inner = model.model
        self._check(cfg)
        act = _ACTIVATIONS.get(self._activation_name(cfg))
        if act is None:
            raise ShadowError(f"activation {self._activation_name(cfg)!r} is not supported")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        inv_freq, _ = self._rotary()
        rotary_dim = inv_freq.numel() * 2
        if rotary_dim > head_dim or rotary_dim % 2:
            raise ShadowError(f"rotary embeddings over {rotary_dim} dimensions do not fit head_dim {head_dim}")
        first = self.inner.layers[0].self_attn
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
            max_positions=self._max_positions(cfg),
            norm="rmsnorm",
            norm_eps=cfg.rms_norm_eps,
            pre_norm=True,
            windows=_layer_windows(cfg, cfg.num_hidden_layers),
            qk_norm=hasattr(first, "q_norm"),
            rotary_dim=0 if rotary_dim == head_dim else rotary_dim,
            **self._extras(cfg),
        )

    # ---- what a family overrides
    def _check(self, cfg):
        if getattr(cfg, "mlp_bias", False):
            raise ShadowError("Llama-family models with mlp_bias=True are not supported (SparseNeuronMLP has no gate bias)")

    def _activation_name(self, cfg) -> str:
        return cfg.hidden_act

    def _max_positions(self, cfg) -> int:
        return cfg.max_position_embeddings

    def _extras(self, cfg) -> dict:
        theta = self._theta(cfg)
        return {"rope_bases": (("default", float(theta)),) if theta else ()}

    @staticmethod
    def _theta(cfg, kind: str | None = None):
        params = getattr(cfg, "rope_parameters", None) or {}
        if kind is not None:
            params = params.get(kind) or {}
        return params.get("rope_theta", getattr(cfg, "rope_theta", None))

    def _rotary(self, kind: str = "default") -> tuple[torch.Tensor, float]:
        """(inverse frequencies, attention scaling) of the RoPE table `kind`."""
        rotary = self.inner.rotary_emb
        return rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))

    def _norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    # ---- the interface
    def _layer(self, i):
        return self.inner.layers[i]

    def _qkv(self, a):
        """(w_q, b_q, w_k, b_k, w_v, b_v) of one attention module, in the model's own dtype."""
        return (a.q_proj.weight, _bias(a.q_proj), a.k_proj.weight, _bias(a.k_proj), a.v_proj.weight, _bias(a.v_proj))

    def attention(self, layer):
        a = self._layer(layer).self_attn
        t = self._t
        w_q, b_q, w_k, b_k, w_v, b_v = self._qkv(a)
        return AttentionWeights(
            w_q=t(w_q), b_q=t(b_q), w_k=t(w_k), b_k=t(b_k), w_v=t(w_v), b_v=t(b_v),
            w_o_t=t(a.o_proj.weight).t(), b_o=t(_bias(a.o_proj)),
            q_norm=self._norm(a.q_norm) if self.arch.qk_norm else None,
            k_norm=self._norm(a.k_norm) if self.arch.qk_norm else None,
        )

    def _gate_up(self, m):
        return m.gate_proj.weight, m.up_proj.weight

    def mlp(self, layer):
        m, t = self._layer(layer).mlp, self._t
        gate, up = self._gate_up(m)
        return MLPWeights(w_in=t(up), w_gate=t(gate), w_out_t=t(m.down_proj.weight).t())

    def _norm(self, rms) -> Norm:
        eps = getattr(rms, "variance_epsilon", None) or getattr(rms, "eps", self.arch.norm_eps)
        return Norm("rmsnorm", self._t(self._norm_weight(rms.weight)), None, eps)

    def attn_norm(self, layer):
        return self._norm(self._layer(layer).input_layernorm)

    def mlp_norm(self, layer):
        return self._norm(self._layer(layer).post_attention_layernorm)

    def embed(self, input_ids, position_ids):
        return self._rows(input_ids, self.inner.embed_tokens.weight)

    def logits(self, hidden):
        return self._project_head(self._norm(self.inner.norm)(hidden))

    def rope(self, position_ids, kind="default"):
        inv_freq, scaling = self._rotary(kind)
        freqs = position_ids.float()[..., None] * inv_freq.float()
        return torch.cos(freqs) * scaling, torch.sin(freqs) * scaling


class Gemma3Adapter(LlamaAdapter):
    """gemma3_text: see the module docstring. Norm weights are handed out as (1 + w), the factor Gemma's
    RMSNorm multiplies by (computed in fp32 there too, so the product is the same)."""

    def _check(self, cfg):
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(cfg, name, None) is not None:
                raise ShadowError(f"gemma3_text with {name}={getattr(cfg, name)} is not supported (the sparse ops do "
                                  "not soft-cap)")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ShadowError("gemma3_text with use_bidirectional_attention=True is not a causal LM: not supported")

    def _activation_name(self, cfg):
        return getattr(cfg, "hidden_activation", None) or cfg.hidden_act

    def _kinds(self, cfg) -> tuple[str, ...]:
        return tuple(cfg.layer_types)

    def _extras(self, cfg):
        kinds = self._kinds(cfg)
        return {"post_norms": True, "embed_scale": float(cfg.hidden_size**0.5),
                "attn_scale": float(cfg.query_pre_attn_scalar) ** -0.5, "rope_kinds": kinds,
                "rope_bases": tuple((k, float(self._theta(cfg, k))) for k in dict.fromkeys(kinds))}

    def _rotary(self, kind="default"):
        kind = "full_attention" if kind == "default" else kind  # "default": the global layers' table
        rotary = self.inner.rotary_emb
        return getattr(rotary, f"{kind}_inv_freq"), float(getattr(rotary, f"{kind}_attention_scaling"))

    def _norm_weight(self, weight):
        return 1.0 + weight.float()

    def mlp_norm(self, layer):
        return self._norm(self._layer(layer).pre_feedforward_layernorm)

    def post_attn_norm(self, layer):
        return self._norm(self._layer(layer).post_attention_layernorm)

    def post_mlp_norm(self, layer):
        return self._norm(self._layer(layer).post_feedforward_layernorm)

    def embed(self, input_ids, position_ids):
        x = self._rows(input_ids, self.inner.embed_tokens.weight)
        # transformers multiplies by the scale held in the weights' dtype
        return x * torch.tensor(self.arch.embed_scale, dtype=self.inner.embed_tokens.weight.dtype).to(x.dtype)


class Phi3Adapter(LlamaAdapter):
    """phi3: fused projections handed out as row views (gradients and in-place rotations reach the
    fused weights), partial rotary and longrope handled by the RoPE tables."""

    def _max_positions(self, cfg):
        params = getattr(cfg, "rope_parameters", None) or {}
        if params.get("rope_type") == "longrope":
            # transformers uses the short factors up to original_max_position_embeddings and switches every
            # position to the long ones past it: one fixed table cannot be both, so the context stops there.
            return min(cfg.max_position_embeddings, int(cfg.original_max_position_embeddings))
        return cfg.max_position_embeddings

    def _qkv(self, a):
        q_rows = self.arch.num_heads * self.arch.head_dim
        kv_rows = self.arch.num_kv_heads * self.arch.head_dim
        w = a.qkv_proj.weight
        b = _bias(a.qkv_proj)
        cut = (slice(0, q_rows), slice(q_rows, q_rows + kv_rows), slice(q_rows + kv_rows, q_rows + 2 * kv_rows))
        return tuple(x for s in cut for x in (w[s], None if b is None else b[s]))

    def _gate_up(self, m):
        f = self.arch.ffn
        return m.gate_up_proj.weight[:f], m.gate_up_proj.weight[f:]


_ADAPTERS = {"opt": OptAdapter, "gemma3_text": Gemma3Adapter, "phi3": Phi3Adapter}


def adapter_for(model) -> Adapter:
    """The adapter for a HF causal LM, built once and kept on the model."""
    cached = getattr(model, "_shadowllm_adapter", None)
    if cached is not None:
        return cached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_supported(model_type)
    adapter = _ADAPTERS.get(model_type, LlamaAdapter)(model)
    model._shadowllm_adapter = adapter
    return adapter
