"""An independent oracle: the HF model's own forward, with forward hooks that zero exactly the masked
heads' outputs (the o_proj/out_proj input) and the masked neurons' activations (the down_proj/fc2
input). Nothing here shares code with the sparse reference forward."""

from __future__ import annotations

import contextlib

import torch


def _blocks(model):
    if model.config.model_type == "opt":
        for layer in model.model.decoder.layers:
            yield layer.self_attn.out_proj, layer.fc2
    else:
        for layer in model.model.layers:
            yield layer.self_attn.o_proj, layer.mlp.down_proj


@contextlib.contextmanager
def masked(model, head_mask=None, neuron_mask=None):
    """head_mask [B, L, H] or [B, S, L, H]; neuron_mask [B, L, F] or [B, S, L, F] (bool)."""
    handles = []

    def zeroing(mask, layer, unit):
        def hook(_module, inputs):
            (x,) = inputs  # [B, S, units*unit]; OPT's MLP sees it flattened to [B*S, F]
            shape = x.shape
            x = x.reshape(mask.shape[0], -1, shape[-1])
            m = mask[:, layer] if mask.dim() == 3 else mask[:, :, layer]
            if m.dim() == 2:
                m = m[:, None, :]  # same for every position
            m = m.repeat_interleave(unit, dim=-1).to(x.dtype)
            return ((x * m).reshape(shape),)
        return hook

    head_dim = None
    for layer, (out_proj, down) in enumerate(_blocks(model)):
        if head_mask is not None:
            head_dim = out_proj.in_features // head_mask.shape[-1]
            handles.append(out_proj.register_forward_pre_hook(zeroing(head_mask, layer, head_dim)))
        if neuron_mask is not None:
            handles.append(down.register_forward_pre_hook(zeroing(neuron_mask, layer, 1)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_logits(model, input_ids, attention_mask=None, cache=None, position_ids=None):
    """HF forward with explicit positions from the attention mask (as `generate` computes them)."""
    if attention_mask is None:
        past = 0 if cache is None else cache.get_seq_length()
        attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long)
    if position_ids is None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
    return out.logits, out.cache
