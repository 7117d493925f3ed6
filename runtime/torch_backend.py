"""The PyTorch reference backend: `sparse_forward` with fixed masks or a predictor's masks.

- fixed masks [L, H] / [L, F] apply to every row (dense, static, random);
- a shadow predictor with granularity `sequence` predicts each row's masks once at prefill from the
  layer-0 attention output of the prompt's last token and keeps them for the request
  (kv_policy=active); with granularity `token` the prefill runs dense and every decode step
  predicts the new token's masks from its own layer-0 attention output, inside the same forward
  (layer 0 is always dense, so its output is ready before the masks are needed);
- a dejavu predictor (dense prefill) predicts layer l's masks at each decode step from the residual
  input of layer l-1 in the sparse run, just before layer l needs them.
With `thresholds` ([L, 4], predictor/thresholds.py) every decode step skips the input entries below
them (activation thresholds); the prefill runs dense, as the exported threshold policies do.
`last_masks` holds the (heads, neurons) masks the predictor chose for the last position of the last
call, [B, L, ·] (None = all kept), and `last_scores` the scores they were ranked from. For parity
checks, `force = (heads, neurons)` ([B, L, ·] numpy or torch) makes the next call compute with those
masks instead, while still predicting (and reporting) its own. Likewise `force_kept = {(name, layer):
kept [B, S, D] bool}` (name "attn_in" or "mlp_in") makes the next decode step keep exactly those entries
of that input under its threshold (parity: the graph's decisions, which differ from float64's only at
ties), for one call.
"""

from __future__ import annotations

import torch

from shadowllm.models import adapter_for, sparse_forward
from shadowllm.predictor.allocation import check_sparsity, keep_mask
from shadowllm.predictor.predictors import Predictor, split_scores


class TorchBackend:
    name = "torch"

    def __init__(self, model, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None,
                 kv_policy: str = "all", predictor: Predictor | None = None, head_sparsity: float = 0.0,
                 neuron_sparsity: float = 0.0, allocation: str = "per_layer", thresholds: torch.Tensor | None = None):
        self.model = model
        self.thresholds = thresholds
        self.force_kept = None
        arch = adapter_for(model).arch
        self.arch = arch
        self.max_positions = arch.max_positions
        self.vocab_size = arch.vocab
        self.head_mask, self.neuron_mask, self.kv_policy = head_mask, neuron_mask, kv_policy
        self.predictor = predictor
        self.head_sparsity = check_sparsity(head_sparsity, "head sparsity")
        self.neuron_sparsity = check_sparsity(neuron_sparsity, "neuron sparsity")
        self.allocation = allocation
        self.last_masks = (None, None)
        self.last_scores = (None, None)
        self.force = None

    @staticmethod
    def _rows(mask, batch):
        return None if mask is None else mask.unsqueeze(0).expand(batch, *mask.shape)

    def _keep(self, scores):
        heads, neurons = split_scores(scores, self.arch.num_heads)
        self.last_scores = (heads, neurons)
        return (keep_mask(heads, self.head_sparsity, self.allocation) if self.head_sparsity else None,
                keep_mask(neurons, self.neuron_sparsity, self.allocation) if self.neuron_sparsity else None)

    def forward(self, input_ids, attention_mask, state, last_only: bool = False):
        self.last_only = last_only  # logits of the last position only (every sparse_forward of this call)
        try:
            return self._forward(input_ids, attention_mask, state)
        finally:
            self.force = self.force_kept = None  # forced masks and kept sets hold for one call

    def _forward(self, input_ids, attention_mask, state):
        B, S = input_ids.shape
        with torch.inference_mode():
            if self.predictor is None:
                self.last_masks = (self._rows(self.head_mask, B), self._rows(self.neuron_mask, B))
                return sparse_forward(self.model, input_ids, *self.last_masks, attention_mask, state,
                                      kv_policy=self.kv_policy, thresholds=self._thresholds(state),
                                      observer=self._kept_observer(None, state), last_only=self.last_only)
            if self.predictor.granularity == "sequence":
                return self._per_sequence(input_ids, attention_mask, state)
            return self._per_token(input_ids, attention_mask, state)

    def _thresholds(self, state):
        """The activation thresholds of a call: none at prefill (state None), dense as in the export."""
        return None if state is None else self.thresholds

    def _kept_observer(self, observer, state):
        """`observer`, plus (decode steps with thresholds) applying `force_kept`: an entry forced kept
        keeps its sign at no less than the threshold (it differs from it by a rounding at most), an
        entry forced off becomes 0."""
        if self.thresholds is None or state is None or not self.force_kept:
            return observer
        from shadowllm.predictor.thresholds import OBSERVED

        forced = self.force_kept

        def observe(layer, name, t):
            out = observer(layer, name, t) if observer is not None else None
            kept = forced.get((name, layer))
            if kept is None:
                return out
            x = t if out is None else out
            kept = torch.as_tensor(kept, device=x.device)
            thr = self.thresholds[layer, OBSERVED[name]].to(x.dtype)
            sign = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
            return torch.where(kept, torch.where(x.abs() >= thr, x, sign * thr), torch.zeros((), dtype=x.dtype))
        return observe

    def _ones(self, *lead):
        a = self.arch
        return (torch.ones(*lead, a.num_layers, a.num_heads, dtype=torch.bool) if self.head_sparsity else None,
                torch.ones(*lead, a.num_layers, a.ffn, dtype=torch.bool) if self.neuron_sparsity else None)

    def _observer_filling(self, heads, neurons, select):
        """An observer that, at layer 0's attention output, writes predicted masks into heads / neurons.

        Layer 0 is always dense, so the masks of layers 1.. are filled before any of them runs.
        """
        def observer(layer, name, t):
            if name == "attn_out" and layer == 0:
                h, n = self._keep(self.predictor.net(select(t).float()))
                self.last_masks = (h, n)
                h, n = self._forced(h, n)
                if heads is not None:
                    heads.copy_(h if heads.dim() == h.dim() else h[:, None])
                if neurons is not None:
                    neurons.copy_(n if neurons.dim() == n.dim() else n[:, None])
            return None
        return observer

    def _forced(self, heads, neurons):
        if self.force is None:
            return heads, neurons
        fh, fn = (torch.as_tensor(f) for f in self.force)
        return (None if heads is None else fh), (None if neurons is None else fn)

    def _per_sequence(self, input_ids, attention_mask, state):
        if state is None:  # prefill: predict each row's masks from its last prompt token (left padding)
            heads, neurons = self._ones(input_ids.shape[0])
            observer = self._observer_filling(heads, neurons, lambda t: t[:, -1])
            logits, past = sparse_forward(self.model, input_ids, heads, neurons, attention_mask,
                                          kv_policy="active", observer=observer, last_only=self.last_only)
            return logits, (past, heads, neurons)
        past, heads, neurons = state
        logits, past = sparse_forward(self.model, input_ids, heads, neurons, attention_mask, past, kv_policy="active",
                                      thresholds=self.thresholds, observer=self._kept_observer(None, state),
                                      last_only=self.last_only)
        return logits, (past, heads, neurons)

    def _per_token(self, input_ids, attention_mask, state):
        if state is None:  # dense prefill
            self.last_masks = (None, None)
            return sparse_forward(self.model, input_ids, attention_mask=attention_mask, last_only=self.last_only)
        heads, neurons = self._ones(*input_ids.shape)
        if self.predictor.kind == "dejavu":
            observer = self._observer_lookahead(heads, neurons)
        else:
            observer = self._observer_filling(heads, neurons, lambda t: t[:, -1])
        return sparse_forward(self.model, input_ids, heads, neurons, attention_mask, state,
                              observer=self._kept_observer(observer, state), thresholds=self.thresholds,
                              last_only=self.last_only)

    def _observer_lookahead(self, heads, neurons):
        """DejaVu: the residual input of layer l-1 (in this sparse run) predicts layer l's masks."""
        H, L = self.arch.num_heads, self.arch.num_layers
        B = (heads if heads is not None else neurons).shape[0]
        scores = (torch.full((B, L, H), float("inf")), torch.full((B, L, self.arch.ffn), float("inf")))
        chosen = (torch.ones(B, L, H, dtype=torch.bool), torch.ones(B, L, self.arch.ffn, dtype=torch.bool))
        self.last_scores = scores
        self.last_masks = (chosen[0] if heads is not None else None, chosen[1] if neurons is not None else None)
        forced = None if self.force is None else tuple(torch.as_tensor(f) for f in self.force)

        def observer(layer, name, t):
            if name == "residual" and layer + 1 < L:
                logits = self.predictor.net.layer(layer + 1, t[:, -1].float())  # [B, H+F]
                for i, (mask, sparsity, part) in enumerate(((heads, self.head_sparsity, logits[:, :H]),
                                                            (neurons, self.neuron_sparsity, logits[:, H:]))):
                    if mask is None:
                        continue
                    scores[i][:, layer + 1] = part
                    chosen[i][:, layer + 1] = keep_mask(part[:, None], sparsity, dense_layers=())[:, 0]
                    mask[:, -1, layer + 1] = (forced[i] if forced is not None else chosen[i])[:, layer + 1]
            return None
        return observer
