"""Importance criteria for attention heads and FFN neurons (docs/design.md §1).

For a unit u (head h: its slice a of the attention context before o_proj/out_proj, [S, E];
neuron n: its MLP intermediate activation a, [S]) with g = dL/da, L the next-token cross-entropy
of the window (mean over its positions; windows of a batch are independent, their losses summed):

| criterion | per token t                  | per sequence (the window)        |
|-----------|------------------------------|----------------------------------|
| l2_norm   | ||a_t||                      | sum_t ||a_t||                    |
| plainact  | |sum_d a_t g_t|              | sum_t |sum_d a_t g_t|            |
| fisher    | (sum_d a_t g_t)^2            | sum_t (sum_d a_t g_t)^2          |
| grad_norm | ||g_t||                      | sum_t ||g_t||                    |
| snip      | |sum_d a_t g_t|              | |sum_t sum_d a_t g_t| = |dL/dm|  |
| grasp     | (none)                       | -(H dL/dm)_u, H the Hessian in m |

m is a multiplicative gate on the unit (1 = kept): sum_d a g = dL/dm, so `snip` is SNIP's
connection sensitivity of one gate per window, `plainact` the same taken token by token, and `grasp`
GraSP's -Hg (a Hessian-vector product by double backward). For neurons `plainact` is weight-based
as in the paper: sum_j |W_in[n, j] * dL/dW_in[n, j]| with W_in = fc1 (OPT) or up_proj (Llama), and
per token the same sum over that token's share of the weight gradient,
|dL/du_t,n| * sum_j |W_in[n, j] x_t,j| (u = x W_in^T, the input projection's output).
Per-sequence sums over equal-length windows rank exactly as means do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shadowllm.models import ShadowError, adapter_for, sparse_forward
from shadowllm.models.adapters import activation_fn

CRITERIA = ("plainact", "l2_norm", "fisher", "grad_norm", "snip", "grasp")
SEQUENCE_ONLY = ("grasp",)


def check_criteria(criteria) -> list[str]:
    criteria = list(dict.fromkeys(criteria))
    for c in criteria:
        if c not in CRITERIA:
            raise ShadowError(f"criterion {c!r} is unknown (expected one of {', '.join(CRITERIA)})")
    if not criteria:
        raise ShadowError("no criterion given")
    return criteria


@dataclass
class Importance:
    """Scores of one batch of windows. Token scores exist at `positions` for criteria with a token form."""

    heads: dict = field(default_factory=dict)  # criterion -> [B, L, H]
    neurons: dict = field(default_factory=dict)  # criterion -> [B, L, F]
    token_heads: dict = field(default_factory=dict)  # criterion -> [B, K, L, H]
    token_neurons: dict = field(default_factory=dict)  # criterion -> [B, K, L, F]
    attn0: torch.Tensor | None = None  # layer-0 attention output [B, S, D] (ShadowLLM's input)
    residual: torch.Tensor | None = None  # residual inputs at positions [B, K, L, D] (DejaVu's inputs)
    positions: torch.Tensor | None = None  # [K]: where the token scores and residuals were taken


def window_loss(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Sum over windows of each window's mean next-token cross-entropy."""
    B, S, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), windows[:, 1:].reshape(-1), reduction="none")
    return nll.view(B, S - 1).mean(-1).sum()


def _input_projection(arch, w, x):
    """(u, h_of_u): the input projection's output u (requires grad) and the activation h computed from it."""
    u = (x @ w.w_in.t() + (w.b_in if w.b_in is not None else 0)).detach().requires_grad_()
    if arch.gated:
        return u, activation_fn(arch.activation)(x @ w.w_gate.t()).detach() * u
    return u, activation_fn(arch.activation)(u)


def importance(model, windows: torch.Tensor, criteria, positions: torch.Tensor | None = None,
               keep_residual: bool = False) -> Importance:
    """Scores of `criteria` for each window of `windows` [B, S] (one forward, one backward for all).

    positions: LongTensor [K] of token positions for token scores (None: every position).
    """
    criteria = check_criteria(criteria)
    adapter = adapter_for(model)
    arch = adapter.arch
    B, S = windows.shape
    L = arch.num_layers
    pos = torch.arange(S) if positions is None else positions
    grasp = "grasp" in criteria
    gradients = any(c != "l2_norm" for c in criteria)
    out = Importance(positions=pos)
    contexts, acts, mlp_ins, residuals = [None] * L, [None] * L, [None] * L, [None] * L
    gate_h = torch.ones(B, L, arch.num_heads, requires_grad=True) if grasp else None
    gate_n = torch.ones(B, L, arch.ffn, requires_grad=True) if grasp else None

    def observe(layer, name, t):
        if name == "residual":
            residuals[layer] = t.detach()[:, pos] if keep_residual else None
            if layer == 0 and gradients:
                return t.detach().requires_grad_()  # the graph starts here; no weight gradients needed
        elif name == "attn_out" and layer == 0:
            out.attn0 = t.detach()
        elif name == "head_context":
            contexts[layer] = t if gate_h is None else t * gate_h[:, None, layer, :, None]
            return contexts[layer]
        elif name == "mlp_in":
            mlp_ins[layer] = t.detach()
        elif name == "neuron_act":
            acts[layer] = t if gate_n is None else t * gate_n[:, None, layer, :]
            return acts[layer]
        return None

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits, _ = sparse_forward(model, windows, observer=observe)
            if gradients:
                loss = window_loss(logits, windows)
                grads = torch.autograd.grad(loss, contexts + acts, create_graph=grasp)
                if grasp:
                    g_gates = torch.autograd.grad(loss, [gate_h, gate_n], create_graph=True)
                    z = sum((g * g.detach()).sum() for g in g_gates)
                    hg_h, hg_n = torch.autograd.grad(z, [gate_h, gate_n])
                    out.heads["grasp"], out.neurons["grasp"] = -hg_h, -hg_n
                grads = [g.detach() for g in grads]
    finally:
        for p in params:
            p.requires_grad_(True)
    if keep_residual:
        out.residual = torch.stack(residuals, dim=2)  # [B, K, L, D]

    head_parts = {c: [] for c in criteria if c != "grasp"}
    neuron_parts = {c: [] for c in criteria if c != "grasp"}
    for layer in range(L):
        a = contexts[layer].detach()  # [B, S, H, E]
        h = acts[layer].detach()  # [B, S, F]
        per_token_h = {"l2_norm": a.norm(dim=-1)}
        per_token_n = {"l2_norm": h.abs()}
        if gradients:
            ga, gh = grads[layer], grads[L + layer]
            s_h, s_n = (a * ga).sum(-1), h * gh  # dL/dm per token: [B, S, H], [B, S, F]
            per_token_h.update(plainact=s_h.abs(), fisher=s_h ** 2, grad_norm=ga.norm(dim=-1), snip=s_h.abs())
            per_token_n.update(fisher=s_n ** 2, grad_norm=gh.abs(), snip=s_n.abs())
            if "plainact" in criteria:
                per_token_n["plainact"], seq_plainact = _weight_plainact(arch, adapter.mlp(layer), mlp_ins[layer], gh)
        for c in head_parts:
            th, tn = per_token_h[c], per_token_n[c]
            if c == "snip":
                seq_h, seq_n = s_h.sum(1).abs(), s_n.sum(1).abs()
            else:
                seq_h, seq_n = th.sum(1), (seq_plainact if c == "plainact" else tn.sum(1))
            head_parts[c].append((seq_h, th[:, pos]))
            neuron_parts[c].append((seq_n, tn[:, pos]))
    for c in head_parts:
        out.heads[c] = torch.stack([s for s, _ in head_parts[c]], dim=1)
        out.neurons[c] = torch.stack([s for s, _ in neuron_parts[c]], dim=1)
        out.token_heads[c] = torch.stack([t for _, t in head_parts[c]], dim=2)
        out.token_neurons[c] = torch.stack([t for _, t in neuron_parts[c]], dim=2)
    return out


def _weight_plainact(arch, w, x, g_act):
    """Weight-based plainact for neurons: (per token [B, S, F], per sequence [B, F])."""
    with torch.enable_grad():
        u, h = _input_projection(arch, w, x)
        (g_u,) = torch.autograd.grad(h, u, g_act)  # dL/du: the input projection's output gradient
    w_abs = w.w_in.detach().abs()
    per_token = g_u.abs() * (x.abs() @ w_abs.t())
    weight_grad = torch.einsum("bsf,bsd->bfd", g_u, x)  # per window dL/dW_in
    per_sequence = (weight_grad.abs() * w_abs).sum(-1)
    return per_token, per_sequence
