"""The module the exporter traces: a HF causal LM rebuilt on the sparse custom ops, with the KV cache
and the carried mask state as explicit inputs and outputs (docs/design.md §4).

Weights are copied once into the layouts of docs/export-format.md (output projections transposed and made
contiguous, so each head / neuron owns contiguous rows in the ONNX initializers). Masks:
- `dense`: the graph applies the masks it is given (`shadow_head_mask` / `shadow_neuron_mask`), so
  the runtime feeds all-True masks for dense decoding, and parity tests can feed any masks;
- `static`: constant importance scores live in the graph; masks are derived from them and the
  runtime `sparsity` input on every call (per-layer allocation, layer 0 dense), no re-export needed;
- `shadow`, granularity `sequence`: the predictor reads the layer-0 attention output of the last
  prompt token inside an `If` taken when the past is empty (prefill; `torch.cond`); decode steps
  carry the masks in and out unchanged (kv_policy=active: their inactive heads never read the cache);
- `shadow`, granularity `token`: dense prefill; every decode step predicts the masks of its token from
  its own layer-0 attention output (kv_policy=all);
- `dejavu`: dense prefill; every decode step predicts layer l's masks from the residual input of layer
  l-1 (lookahead), layer by layer (kv_policy=all);
- `threshold`: activation thresholds (predictor/thresholds.py) from a table in the graph, [R, L, 4],
  whose row is the one of the runtime `sparsity` on the table's grid; thresholds are 0 at prefill
  (dense) and the row's at every decode step. The input projections are stored channel-major
  ([in, out], `weight_layout=channel_major`) so kernels read only the kept input channels' weights;
  masks are applied as in `dense` (the runtime feeds all-True);
- `shadow+threshold`: heads from a shadow predictor (a fixed fraction `head_sparsity` dropped, set at
  export), inputs thresholded as in `threshold` (the runtime `sparsity` picks the threshold row).
`target` says which of heads / neurons the runtime sparsity applies to. "Prefill" is a call whose
attention mask is as long as its input (no past).
"""

from __future__ import annotations

import torch
from torch import nn

from shadowllm.models import adapter_for
from shadowllm.models.reference import post_norm

from . import ops  # noqa: F401  (registers torch.ops.shadowllm.*)

POLICIES = ("dense", "static", "shadow", "dejavu", "threshold", "shadow+threshold")
THRESHOLDED = ("threshold", "shadow+threshold")
CHANNEL_MAJOR = ("w_q", "w_k", "w_v", "w_in", "w_gate")  # input projections: transposed when thresholded


def _per_layer(masks: torch.Tensor) -> list[torch.Tensor]:
    """[B, L, X] -> L tensors [B, X], as one Split along the flattened [B, L * X]: indexing masks[:, l]
    exported a Gather per layer, which onnxruntime ran as a Split plus 60 Squeeze nodes a step."""
    return list(torch.split(masks.flatten(1), masks.shape[2], dim=1))


def importance_rank(scores: torch.Tensor) -> torch.Tensor:
    """[L, X] -> int64 rank of each unit within its layer, 0 = least important (computed at export)."""
    return torch.argsort(torch.argsort(scores.float(), dim=-1), dim=-1)


def keep_rows(scores: torch.Tensor, sparsity: torch.Tensor) -> torch.Tensor:
    """Traceable per-layer allocation of input-dependent scores [..., X] -> bool [..., X]: the rank of
    each unit comes from a full TopK (sort) and a scatter, then the floor(s*X + 0.5) lowest are dropped."""
    X = scores.shape[-1]
    order = torch.topk(scores, X, dim=-1, largest=False).indices
    rank = torch.zeros_like(order).scatter(-1, order, torch.arange(X).expand_as(order).contiguous())
    return rank >= torch.floor(sparsity.float() * X + 0.5).to(torch.int64)


def keep_from_sparsity(rank: torch.Tensor, sparsity: torch.Tensor) -> torch.Tensor:
    """Traceable per-layer allocation: drop the floor(s*X + 0.5) lowest-ranked units of each layer
    (layer 0 kept whole). rank [L, X] -> bool [L, X]. Matches `predictor.allocation.keep_mask`."""
    X = rank.shape[-1]
    drop = torch.floor(sparsity.float() * X + 0.5).to(torch.int64)
    keep = rank >= drop
    dense_first = torch.zeros_like(keep)
    dense_first[0] = True
    return keep | dense_first


class ExportModule(nn.Module):
    def __init__(self, model, policy: str = "dense", static_scores=None, target: str = "both", predictor=None,
                 thresholds=None, head_sparsity: float = 0.0):
        super().__init__()
        self.target = "heads" if policy == "shadow+threshold" else target
        # a rotated model (models/rotation.py) feeds the predictor the basis it was trained on
        self.predictor = predictor.fed_by(model).net if predictor is not None else None
        self.granularity = predictor.granularity if predictor is not None else None
        adapter = adapter_for(model)
        self.adapter, self.arch, self.policy = adapter, adapter.arch, policy
        a = self.arch
        self.model = model  # embeddings, norms and lm_head are read through the adapter

        self.weight_layout = "channel_major" if policy in THRESHOLDED else "row_major"

        def keep(name, t):
            if t is None:
                return None
            t = t.detach()
            return (t.t() if name in CHANNEL_MAJOR and self.weight_layout == "channel_major" else t).contiguous()

        self.attn, self.mlp = [], []
        self.qk_norm_eps = None
        for layer in range(a.num_layers):
            w, m = adapter.attention(layer), adapter.mlp(layer)
            self.attn.append({k: keep(k, getattr(w, k)) for k in ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o_t", "b_o")})
            if w.q_norm is not None:  # the per-head norms' weights ride as inputs; one eps for the model
                self.attn[-1].update(q_norm=keep("q_norm", w.q_norm.weight), k_norm=keep("k_norm", w.k_norm.weight))
                self.qk_norm_eps = float(w.q_norm.eps)
            self.mlp.append({k: keep(k, getattr(m, k)) for k in ("w_in", "b_in", "w_gate", "w_out_t", "b_out")})
        # Register them so torch.export lifts them into initializers with readable names.
        for layer, (wa, wm) in enumerate(zip(self.attn, self.mlp)):
            for k, t in list(wa.items()) + list(wm.items()):
                if t is not None:
                    self.register_buffer(f"layers_{layer}_{k}", t, persistent=False)
                    (wa if k in wa else wm)[k] = getattr(self, f"layers_{layer}_{k}")
        # one cos/sin table pair per RoPE kind the layers read (gemma3_text: local and global bases)
        self.rope_tables = {}
        for i, (kind, (cos, sin)) in enumerate(adapter.ropes(torch.arange(a.max_positions)[None]).items()):
            suffix = "" if i == 0 else f"_{kind}"
            self.register_buffer(f"rope_cos{suffix}", cos[0].contiguous(), persistent=False)
            self.register_buffer(f"rope_sin{suffix}", sin[0].contiguous(), persistent=False)
            self.rope_tables[kind] = (f"rope_cos{suffix}", f"rope_sin{suffix}")
        if policy == "static":
            heads, neurons = static_scores
            # Scores are constants, so their order is too: only the rank goes into the graph.
            self.register_buffer("static_head_rank", importance_rank(heads), persistent=False)
            self.register_buffer("static_neuron_rank", importance_rank(neurons), persistent=False)
        if policy in THRESHOLDED:
            grid, table = thresholds
            self.register_buffer("threshold_grid", grid.float().contiguous(), persistent=False)
            self.register_buffer("threshold_table", table.float().contiguous(), persistent=False)
        self.register_buffer("head_sparsity", torch.tensor(float(head_sparsity)), persistent=False)

    def _targeted(self, heads, neurons):
        """Keep whole what the runtime sparsity does not target."""
        if self.target == "neurons":
            heads = torch.ones_like(heads)
        if self.target == "heads":
            neurons = torch.ones_like(neurons)
        return heads, neurons

    def _shadow_masks(self, x, sparsity):
        """[B, D] layer-0 attention output -> masks [B, L, H], [B, L, F] (layer 0 kept)."""
        if self.policy == "shadow+threshold":  # the runtime sparsity picks thresholds; heads drop a fixed share
            sparsity = self.head_sparsity
        pred = self.predictor(x)  # [B, L-1, H+F]
        H = self.arch.num_heads
        # only what the sparsity targets is ranked (a TopK over every neuron costs as much as the predictor)
        heads = torch.ones_like(pred[..., :H], dtype=torch.bool) if self.target == "neurons" \
            else keep_rows(pred[..., :H], sparsity)
        neurons = torch.ones_like(pred[..., H:], dtype=torch.bool) if self.target == "heads" \
            else keep_rows(pred[..., H:], sparsity)
        first_h = torch.ones_like(heads[:, :1])
        first_n = torch.ones_like(neurons[:, :1])
        return torch.cat([first_h, heads], 1), torch.cat([first_n, neurons], 1)

    def masks(self, head_mask, neuron_mask, sparsity):
        if self.policy == "static":
            B = head_mask.shape[0]
            heads, neurons = self._targeted(keep_from_sparsity(self.static_head_rank, sparsity),
                                            keep_from_sparsity(self.static_neuron_rank, sparsity))
            return heads.unsqueeze(0).expand(B, -1, -1), neurons.unsqueeze(0).expand(B, -1, -1)
        return head_mask, neuron_mask

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, head_mask, neuron_mask, sparsity):
        a, adapter = self.arch, self.adapter
        prefill = attention_mask.shape[1] == input_ids.shape[1]  # symbolic: the predicate of torch.cond
        past_len = torch.zeros((), dtype=torch.int64) + (attention_mask.shape[1] - input_ids.shape[1])
        prefill_t = past_len == 0  # the same as a tensor: masks | prefill_t = dense at prefill
        B = input_ids.shape[0]
        carried = None  # (head, neuron) masks [B, L, *] handed out whole, where the policy has them so
        full_h = torch.ones(B, a.num_heads, dtype=torch.bool)  # layer 0 is always dense
        full_n = torch.ones(B, a.ffn, dtype=torch.bool)
        if self.policy in ("dense", "static", "threshold"):
            heads, neurons = self.masks(head_mask, neuron_mask, sparsity)
            layer_heads, layer_neurons = _per_layer(heads), _per_layer(neurons)
            carried = heads, neurons  # the masks out as they came: no per-layer re-stacking in the graph
        else:  # filled as the predictors run; layer 0 is always dense
            layer_heads, layer_neurons = [full_h] + [None] * (a.num_layers - 1), [full_n] + [None] * (a.num_layers - 1)
        kv_policy = "active" if self.granularity == "sequence" else "all"
        thresholds = None
        if self.policy in THRESHOLDED:
            # the table row of the runtime sparsity; all zeros (dense) at prefill
            row = torch.argmin((self.threshold_grid - sparsity.float()).abs())
            thresholds = self.threshold_table[row] * (1.0 - prefill_t.float())  # [L, 4]
            # one Split into L * 4 one-value tensors: indexing each scalar cost a Gather per layer and
            # one per threshold (onnxruntime ran them as 150 Split + Squeeze nodes a step)
            thresholds = torch.split(thresholds.reshape(-1), 1)
        h = adapter.embed(input_ids, position_ids)
        presents = []
        for layer in range(a.num_layers):
            if self.policy == "dejavu" and layer + 1 < a.num_layers:
                # lookahead: this layer's input predicts the next layer's masks (dense at prefill)
                logits = self.predictor.layer(layer + 1, h[:, -1])
                hm, nm = self._targeted(keep_rows(logits[:, :a.num_heads], sparsity),
                                        keep_rows(logits[:, a.num_heads:], sparsity))
                layer_heads[layer + 1] = hm | prefill_t  # (ORT has no bool Where: Or does it)
                layer_neurons[layer + 1] = nm | prefill_t
            w = self.attn[layer]
            x = adapter.attn_norm(layer)(h) if a.pre_norm else h
            cos, sin = self._rope(layer)
            y, key, value = torch.ops.shadowllm.sparse_head_attention(
                x, w["w_q"], w["b_q"], w["w_k"], w["b_k"], w["w_v"], w["b_v"], w["w_o_t"], w["b_o"],
                past_key_values[2 * layer], past_key_values[2 * layer + 1], attention_mask, position_ids,
                cos, sin, layer_heads[layer], *self._thresholds(thresholds, layer, 0), w.get("q_norm"),
                w.get("k_norm"), a.num_heads, a.num_kv_heads, a.head_dim, a.scale, int(a.rope), kv_policy,
                self.weight_layout, a.window(layer), self.qk_norm_eps or 0.0)
            if layer == 0 and self.policy in ("shadow", "shadow+threshold"):
                heads, neurons = self._predict_after_layer0(y[:, -1], head_mask, neuron_mask, sparsity, prefill,
                                                            prefill_t)
                layer_heads, layer_neurons = _per_layer(heads), _per_layer(neurons)
                carried = heads, neurons
            presents += [key, value]
            h = h + post_norm(adapter.post_attn_norm(layer), y)
            if not a.pre_norm:
                h = adapter.attn_norm(layer)(h)
            m = self.mlp[layer]
            x = adapter.mlp_norm(layer)(h) if a.pre_norm else h
            h = h + post_norm(adapter.post_mlp_norm(layer), torch.ops.shadowllm.sparse_neuron_mlp(
                x, m["w_in"], m["b_in"], m["w_gate"], m["w_out_t"], m["b_out"], layer_neurons[layer],
                *self._thresholds(thresholds, layer, 2), a.activation, self.weight_layout))
            if not a.pre_norm:
                h = adapter.mlp_norm(layer)(h)
        if carried is None:  # dejavu: assembled layer by layer
            carried = torch.stack(layer_heads, 1), torch.stack(layer_neurons, 1)
        return (adapter.logits(h), *presents, *carried)

    def _rope(self, layer: int):
        """(cos, sin) tables of this layer's RoPE kind; (None, None) without RoPE."""
        if not self.rope_tables:
            return None, None
        cos, sin = self.rope_tables[self.arch.rope_kind(layer)]
        return getattr(self, cos), getattr(self, sin)

    def _thresholds(self, thresholds, layer: int, first: int):
        """(t for the op's input, t for its inner input): the attention's (t_x, t_o) at first=0, the
        MLP's (t_x, t_h) at first=2; (None, None) for policies without thresholds."""
        if self.policy not in THRESHOLDED:
            return None, None
        return thresholds[4 * layer + first], thresholds[4 * layer + first + 1]

    def _predict_after_layer0(self, x0_last, head_mask, neuron_mask, sparsity, prefill, prefill_t):
        if self.granularity == "sequence":
            # predictor only at prefill (an ONNX If); decode steps carry the request's masks
            def predict(x, hm, nm, s):
                return self._shadow_masks(x, s)

            def carry(x, hm, nm, s):
                return hm.clone(), nm.clone()
            return torch.cond(prefill, predict, carry, (x0_last, head_mask, neuron_mask, sparsity))
        heads, neurons = self._shadow_masks(x0_last, sparsity)  # token: every step, dense at prefill
        return heads | prefill_t, neurons | prefill_t
