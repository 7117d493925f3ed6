"""Each importance criterion against an independent computation on HF's own forward: gates with
requires_grad hooked into o_proj/out_proj and down_proj/fc2 inputs, weight gradients from HF's
backward, and (for grasp) a finite-difference Hessian-vector product in float64."""

import pytest
import torch
import torch.nn.functional as F

from shadowllm.models import adapter_for
from shadowllm.models.tiny import build_model
from shadowllm.predictor.criteria import CRITERIA, importance

TOL = 1e-4


def _blocks(model):
    if model.config.model_type == "opt":
        return [(l.self_attn.out_proj, l.fc2, l.fc1) for l in model.model.decoder.layers]
    return [(l.self_attn.o_proj, l.mlp.down_proj, l.mlp.up_proj) for l in model.model.layers]


def hf_gated(model, windows, gate_h, gate_n):
    """HF forward with gates [B, S|1, L, H] / [B, S|1, L, F] on the head and neuron outputs.

    Returns (loss, contexts, activations): the gated o_proj / down_proj inputs of each layer.
    """
    arch = adapter_for(model).arch
    B, S = windows.shape
    contexts, acts, handles = [], [], []

    def gate_hook(gate, layer, unit, store):
        def hook(_m, inputs):
            (x,) = inputs
            shape = x.shape
            x = x.reshape(B, S, -1)
            y = x * gate[:, :, layer].repeat_interleave(unit, dim=-1)
            store.append(y)
            return (y.reshape(shape),)
        return hook

    for layer, (o, down, _) in enumerate(_blocks(model)):
        handles.append(o.register_forward_pre_hook(gate_hook(gate_h, layer, arch.head_dim, contexts)))
        handles.append(down.register_forward_pre_hook(gate_hook(gate_n, layer, 1, acts)))
    try:
        logits = model(windows).logits
    finally:
        for h in handles:
            h.remove()
    V = logits.shape[-1]
    loss = sum(F.cross_entropy(logits[b, :-1].reshape(-1, V), windows[b, 1:]) for b in range(B))
    return loss, contexts, acts


def reference(model, windows):
    """Independent per-token dL/dm, activations and activation gradients from HF."""
    arch = adapter_for(model).arch
    B, S = windows.shape
    L, H, Fn, E = arch.num_layers, arch.num_heads, arch.ffn, arch.head_dim
    gate_h = torch.ones(B, S, L, H, dtype=torch.float64, requires_grad=True)
    gate_n = torch.ones(B, S, L, Fn, dtype=torch.float64, requires_grad=True)
    loss, contexts, acts = hf_gated(model, windows, gate_h, gate_n)
    grads = torch.autograd.grad(loss, [gate_h, gate_n] + contexts + acts)
    dm_h, dm_n = grads[0], grads[1]  # [B, S, L, H], [B, S, L, F]
    a_h = torch.stack([c.detach().view(B, S, H, E) for c in contexts], dim=2)
    g_h = torch.stack([g.view(B, S, H, E) for g in grads[2:2 + L]], dim=2)
    a_n = torch.stack([c.detach() for c in acts], dim=2)
    g_n = torch.stack(list(grads[2 + L:]), dim=2)
    return dict(dm_h=dm_h, dm_n=dm_n, a_h=a_h, g_h=g_h, a_n=a_n, g_n=g_n)


def close(ours, ref, tol=TOL):
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().max().clamp(min=1e-12)
    assert ((ours - ref).abs().max() / scale).item() < tol


@pytest.fixture(scope="module", params=["opt", "llama"])
def setup(request):
    model = build_model(request.param, seed=4).double()
    g = torch.Generator().manual_seed(123)
    windows = torch.randint(0, 256, (2, 10), generator=g)
    ours = importance(model, windows, CRITERIA)
    return model, windows, ours, reference(model, windows)


def test_plainact_heads_and_snip(setup):
    _, _, ours, ref = setup
    close(ours.token_heads["plainact"], ref["dm_h"].abs())
    close(ours.heads["plainact"], ref["dm_h"].abs().sum(1))
    close(ours.heads["snip"], ref["dm_h"].sum(1).abs())
    close(ours.neurons["snip"], ref["dm_n"].sum(1).abs())
    close(ours.token_neurons["snip"], ref["dm_n"].abs())


def test_fisher(setup):
    _, _, ours, ref = setup
    close(ours.token_heads["fisher"], ref["dm_h"] ** 2)
    close(ours.heads["fisher"], (ref["dm_h"] ** 2).sum(1))
    close(ours.neurons["fisher"], (ref["dm_n"] ** 2).sum(1))


def test_l2_norm_and_grad_norm(setup):
    _, _, ours, ref = setup
    close(ours.heads["l2_norm"], ref["a_h"].norm(dim=-1).sum(1))
    close(ours.neurons["l2_norm"], ref["a_n"].abs().sum(1))
    close(ours.token_heads["grad_norm"], ref["g_h"].norm(dim=-1))
    close(ours.neurons["grad_norm"], ref["g_n"].abs().sum(1))


def test_plainact_neurons_is_weight_based(setup):
    """sum_j |W_in * dL/dW_in| from HF's own weight gradient, one window at a time."""
    model, windows, ours, _ = setup
    L = adapter_for(model).arch.num_layers
    for b in range(windows.shape[0]):
        model.zero_grad()
        logits = model(windows[b:b + 1]).logits
        F.cross_entropy(logits[0, :-1], windows[b, 1:]).backward()
        ref = torch.stack([(w_in.weight * w_in.weight.grad).abs().sum(-1) for _, _, w_in in _blocks(model)])
        close(ours.neurons["plainact"][b], ref)
        assert ref.shape[0] == L
    model.zero_grad()
    # per token: the window's weight gradient is the sum of the tokens' shares, so the token scores
    # (sum_j of |share|) bound the sequence score from above
    assert (ours.token_neurons["plainact"].sum(1) >= ours.neurons["plainact"] * (1 - 1e-9)).all()


def test_grasp_by_finite_differences(setup):
    model, windows, ours, _ = setup
    arch = adapter_for(model).arch
    B, S = windows.shape
    shape_h, shape_n = (B, 1, arch.num_layers, arch.num_heads), (B, 1, arch.num_layers, arch.ffn)

    def grad_at(m_h, m_n):
        m_h, m_n = m_h.clone().requires_grad_(), m_n.clone().requires_grad_()
        loss, _, _ = hf_gated(model, windows, m_h.expand(B, S, *shape_h[2:]), m_n.expand(B, S, *shape_n[2:]))
        return torch.autograd.grad(loss, [m_h, m_n])

    one_h, one_n = torch.ones(shape_h, dtype=torch.float64), torch.ones(shape_n, dtype=torch.float64)
    v_h, v_n = grad_at(one_h, one_n)

    def central(eps):
        plus = grad_at(one_h + eps * v_h, one_n + eps * v_n)
        minus = grad_at(one_h - eps * v_h, one_n - eps * v_n)
        return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]

    # HF computes softmax (and RMSNorm) in float32 even in a float64 model, so the step cannot be
    # tiny: Richardson extrapolation of two central differences cancels the O(eps^2) error.
    eps = 1e-3
    coarse, fine = central(eps), central(eps / 2)
    hv_h, hv_n = ((4 * f - c) / 3 for f, c in zip(fine, coarse))
    close(ours.heads["grasp"], -hv_h[:, 0], tol=2e-3)
    close(ours.neurons["grasp"], -hv_n[:, 0], tol=2e-3)


def test_positions_and_inputs(setup):
    model, windows, _, _ = setup
    arch = adapter_for(model).arch
    pos = torch.tensor([2, 7])
    part = importance(model, windows, ["l2_norm", "plainact"], positions=pos, keep_residual=True)
    full = importance(model, windows, ["l2_norm", "plainact"])
    close(part.token_heads["plainact"], full.token_heads["plainact"][:, pos])
    assert part.residual.shape == (2, 2, arch.num_layers, arch.hidden)
    assert part.attn0.shape == (2, windows.shape[1], arch.hidden)
    # gradient-free alone gives the same magnitudes
    only_l2 = importance(model, windows, ["l2_norm"])
    close(only_l2.neurons["l2_norm"], full.neurons["l2_norm"])
