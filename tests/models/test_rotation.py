"""Rotations folded into the weights (models/rotation.py): the rotated model computes its source's
function (HF's own forward and the sparse reference), its inputs are in the fitted bases (PCA; the
sparse refinement drops less than PCA when thresholded), a predictor fed through ReadsUnrotated sees
what it was trained on, and bad rotations are one clear line."""

import numpy as np
import pytest
import torch

from shadowllm.models import ShadowError, adapter_for, sparse_forward
from shadowllm.models.rotation import (SPARSIFY_LEVELS, SPARSIFY_MLP_WEIGHT, check_rotation, fit_rotation, fit_steps,
                                      predictor_net_for, rotated, same_rotation, sparsified, thresholded_away)
from shadowllm.models.tiny import build_model


def _fresh_ids(vocab, shape):
    g = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    return torch.randint(0, vocab, shape, generator=g)


@pytest.mark.parametrize("model_type,kind", [("llama", "sparse"), ("llama", "pca"), ("opt", "sparse")])
def test_rotated_model_computes_the_same_function(model_type, kind):
    model = build_model(model_type, seed=11)
    vocab = model.config.vocab_size
    rotation = fit_rotation(model, _fresh_ids(vocab, (4, 20)), kind=kind)
    assert (rotation["residual"] is not None) == (model_type == "llama")  # needs RMSNorm
    out = rotated(model, rotation)
    ids = _fresh_ids(vocab, (2, 15))
    with torch.no_grad():
        want, got = model(ids).logits, out(ids).logits  # HF's own forward, independent of our reference
        ref, _ = sparse_forward(out, ids)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale
    assert float((ref - want).abs().max()) <= 1e-5 * scale
    # the weights did change (the rotation is not the identity), the source is untouched
    a, b = adapter_for(model).attention(1), adapter_for(out).attention(1)
    assert not torch.allclose(a.w_v, b.w_v)
    assert out._shadowllm_rotation is rotation and not hasattr(model, "_shadowllm_rotation")


def test_inputs_are_in_their_principal_axes():
    """In the rotated model the attention context's second moment is diagonal with falling entries and
    the residual stream's (over every normalised input) is too: what thresholding exploits."""
    model = build_model("llama", seed=5)
    ids = _fresh_ids(model.config.vocab_size, (4, 24))
    rotation = fit_rotation(model, ids, kind="pca")
    out = rotated(model, rotation)
    arch = adapter_for(out).arch
    moments = {"context": torch.zeros(arch.head_dim, arch.head_dim, dtype=torch.float64),
               "residual": torch.zeros(arch.hidden, arch.hidden, dtype=torch.float64)}

    def observe(layer, name, t):
        if name == "head_context" and layer == 1:
            v = t.double().reshape(-1, arch.num_kv_heads, arch.num_heads // arch.num_kv_heads, arch.head_dim)[:, 0]
            v = v.reshape(-1, arch.head_dim)
            moments["context"] += v.T @ v
        elif name in ("attn_in", "mlp_in"):
            v = t.double().flatten(0, 1)
            moments["residual"] += v.T @ v
        return None

    with torch.no_grad():
        sparse_forward(out, ids, observer=observe)
    for m in moments.values():
        diag = m.diagonal()
        assert float((m - torch.diag(diag)).abs().max()) <= 1e-3 * float(diag.max())
        assert torch.all(diag[:-1] >= diag[1:] - 1e-6 * float(diag.max()))


def test_sparsified_basis_recovers_sparse_sources():
    """Inputs made of sparse sources mixed by a random rotation: PCA cannot unmix them (it keeps the
    energy in fixed coordinates), the refinement finds a basis in which a threshold drops far less."""
    rng = np.random.default_rng()
    n, d = 3000, 48
    sources = rng.standard_normal((n, d)) * (rng.random((n, d)) < 0.2) * np.linspace(3, 1, d)
    mix = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = torch.tensor(sources @ mix.T, dtype=torch.float32)
    _, vectors = torch.linalg.eigh(x.double().T @ x.double())
    pca = vectors.flip(-1).float()
    q = sparsified(pca, [(1.0, x)], steps=30)
    assert float((q.double().T @ q.double() - torch.eye(d, dtype=torch.float64)).abs().max()) < 1e-5
    before, after = thresholded_away(x, pca), thresholded_away(x, q)
    assert all(a < 0.3 * b for a, b in zip(after, before)), (before, after)


def test_sparse_residual_drops_no_more_than_pca():
    """fit_rotation(kind="sparse") starts from the PCA basis and each step can only lower the weighted
    thresholded-away energy of the inputs it was fitted on; values keep their PCA bases."""
    model = build_model("llama", seed=7)
    arch = adapter_for(model).arch
    ids = _fresh_ids(model.config.vocab_size, (4, 24))
    steps = []
    sparse = fit_rotation(model, ids, kind="sparse", progress=steps.append)
    pca = fit_rotation(model, ids, kind="pca")
    assert sum(steps) == fit_steps(model, ids.shape[0], "sparse") > ids.shape[0]
    torch.testing.assert_close(sparse["values"], pca["values"])
    inputs = []

    def observe(layer, name, t):
        if name in ("attn_in", "mlp_in"):
            norm = adapter_for(model).attn_norm(layer) if name == "attn_in" else adapter_for(model).mlp_norm(layer)
            weight = SPARSIFY_MLP_WEIGHT if name == "mlp_in" else 1.0
            inputs.append((weight, (t.double() / norm.weight.double()).flatten(0, 1).float()))
        return None

    with torch.no_grad():
        sparse_forward(model, ids, observer=observe)
    assert len(inputs) == 2 * arch.num_layers

    def objective(q):
        return sum(w * sum(thresholded_away(x, q, SPARSIFY_LEVELS)) for w, x in inputs)

    assert objective(sparse["residual"]) < objective(pca["residual"])
    with pytest.raises(ShadowError, match="rotation kind 'ica': expected sparse or pca"):
        fit_rotation(model, ids, kind="ica")


def test_predictor_reads_the_unrotated_residual():
    model = build_model("llama", seed=2)
    rotation = fit_rotation(model, _fresh_ids(model.config.vocab_size, (2, 16)))
    out = rotated(model, rotation)
    net = torch.nn.Linear(model.config.hidden_size, 7)
    x = torch.randn(3, model.config.hidden_size)
    assert predictor_net_for(model, net) is net
    wrapped = predictor_net_for(out, net)
    torch.testing.assert_close(wrapped(x @ rotation["residual"]), net(x), rtol=1e-5, atol=1e-5)
    # what ShadowLLM reads (the layer-0 attention output) is the rotated model's, in the rotated basis
    from shadowllm.predictor.evaluation import layer0_attention

    ids = _fresh_ids(model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(layer0_attention(out, ids)), net(layer0_attention(model, ids)),
                                   rtol=1e-4, atol=1e-5)


def test_bad_rotations_are_refused():
    model = build_model("llama", seed=2)
    arch = adapter_for(model).arch
    rotation = fit_rotation(model, _fresh_ids(model.config.vocab_size, (2, 16)))
    with pytest.raises(ShadowError, match=r"rotation values has shape \[1,"):
        check_rotation({**rotation, "values": rotation["values"][:1]}, arch, "r.safetensors")
    with pytest.raises(ShadowError, match="rotation residual is not orthogonal"):
        check_rotation({**rotation, "residual": 2 * rotation["residual"]}, arch, "r.safetensors")
    opt = build_model("opt", seed=2)
    with pytest.raises(ShadowError, match="a residual rotation does not fit this model .*opt uses layernorm"):
        rotated(opt, {"residual": torch.eye(opt.config.hidden_size),
                      "values": fit_rotation(opt, _fresh_ids(opt.config.vocab_size, (2, 16)))["values"]})
    assert same_rotation(rotation, dict(rotation)) and not same_rotation(rotation, None)
