"""Exact changes of basis that make activation thresholds cheaper (PCA rotations).

A threshold skips the entries of a projection input that are small for this token; what that costs
depends on the basis the input is written in. An orthogonal change of basis leaves the model's
function unchanged when every weight that reads the rotated space is multiplied by Q and every
weight that writes it by Q^T; in the basis of the principal components of an input (eigenvectors of
its second moment on calibration text) most of its energy sits in a few coordinates that are large
for every token, and the rest are small for every token, so a threshold at the same byte budget
drops less of what matters. Two spaces are rotated, both free at run time (the rotations are folded
into the weights; the graph and its ops are unchanged):

- the residual stream (`residual`, [D, D]), read through the attention input x and the MLP input x.
  Needs RMSNorm (a rotation keeps a vector's RMS, not its mean): the Llama family. Each norm's scale
  is folded first into the weights that read it (so the normalised vector itself is what rotates),
  and a tied lm_head is untied (the final norm's scale folds into the head, not the embedding);
- each key/value head's value space (`values`, [L, G, E, E]), read through the attention context
  before o: v_proj's rows (and bias) of head g by R_g^T, o_proj's columns of every query head that
  reads g by R_g. Attention mixes positions, not value dimensions, so the context rotates with the
  values. Any family.

The MLP hidden h (before down) is the output of a nonlinearity and cannot be rotated for free.

`kind="sparse"` (the default) then refines the residual basis for what a threshold does: PCA keeps
the most energy in a *fixed* set of coordinates, but a threshold keeps a different set per token, so
the best basis is the one in which each token's vector is sparsest. Alternating (each step lowers
the thresholded-away energy on the fitting windows): threshold every layer's inputs at the
SPARSIFY_LEVELS quantiles (the entries a threshold keeps), then take the orthogonal basis that best
maps the inputs onto what was kept (orthogonal Procrustes: the polar factor of sum X^T Z). What it
drops against PCA on held-out windows, and what that does to perplexity: docs/research/thresholds.md.
"""

from __future__ import annotations

import copy

import torch

from .adapters import adapter_for
from .errors import ShadowError

ROTATIONS = ("sparse", "pca", "none")  # what calibrate --rotate takes; "none": no rotation
SPARSIFY_LEVELS = (0.25, 0.40)  # per-input sparsities the residual basis is refined at (the greedy's 0.60-0.75 bytes)
SPARSIFY_STEPS = 25  # alternations; most of the gain comes in the first 20 (SmolLM2)
SPARSIFY_MLP_WEIGHT = 2.0  # the MLP input carries about half the greedy's cost (it feeds gate and up)
SPACES = ("residual", "values")
# what shadowllm caches on a model object (its fingerprint, adapter, float64 copy): of the source, not the copy
CACHED = ("_shadowllm_fingerprint", "_shadowllm_adapter", "_shadowllm_float64")


def can_rotate_residual(model) -> bool:
    """Whether the residual stream's rotation folds exactly: RMSNorm everywhere, and no norm on a block's
    output (gemma3_text's post-norms scale a rotated vector by a per-coordinate weight between the block
    and the residual add, with no linear after them to absorb the rotation)."""
    arch = adapter_for(model).arch
    return arch.norm == "rmsnorm" and not arch.post_norms


def residual_refusal(model) -> str | None:
    """Why the residual basis stays the model's own (one line for the calibration report), or None."""
    arch = adapter_for(model).arch
    if arch.norm != "rmsnorm":
        return f"residual stream not rotated: {arch.model_type} uses {arch.norm} (a rotation keeps RMS, not the mean)"
    if arch.post_norms:
        return (f"residual stream not rotated: {arch.model_type}'s post-norms sit between each block and the "
                "residual add with no linear to absorb a rotation; value heads rotated only")
    return None


@torch.no_grad()
def fit_rotation(model, windows: torch.Tensor, batch_size: int = 4, progress=None, kind: str = "sparse") -> dict:
    """PCA bases of the residual stream (pooled over every layer's attention and MLP input, each
    normalised and without its norm's scale) and of each layer's value heads (the context of the query
    heads that read them), from the dense forward over `windows`; kind="sparse" then refines the
    residual basis (`sparsified`). Memory: the second moments, and for "sparse" the normalised inputs
    themselves (fp32: 2 x layers x tokens x hidden). `progress` is called with each batch's windows and,
    for "sparse", with 1 after each refinement step (fit_steps() in all)."""
    if kind not in ("sparse", "pca"):
        raise ShadowError(f"rotation kind {kind!r}: expected sparse or pca")
    from .reference import sparse_forward

    adapter = adapter_for(model)
    arch = adapter.arch
    L, G, E, D = arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden
    group = arch.num_heads // G
    residual = torch.zeros(D, D, dtype=torch.float64) if can_rotate_residual(model) else None
    values = torch.zeros(L, G, E, E, dtype=torch.float64)
    inputs = {}  # (layer, name): [normalised inputs [N, D]], kept for the sparse refinement

    def observe(layer, name, t):
        if name in ("attn_in", "mlp_in") and residual is not None:
            norm = adapter.attn_norm(layer) if name == "attn_in" else adapter.mlp_norm(layer)
            scale = norm.weight.double()
            v = torch.where(scale != 0, t.detach().double() / scale, 0.0).flatten(0, 1)  # the normalised vector
            residual.add_(v.T @ v)
            if kind == "sparse":
                inputs.setdefault((layer, name), []).append(v.float())
        elif name == "head_context":
            v = t.detach().double().reshape(-1, G, group, E).transpose(0, 1).reshape(G, -1, E)
            values[layer].add_(v.transpose(1, 2) @ v)
        return None

    for b in range(0, windows.shape[0], batch_size):
        sparse_forward(model, windows[b:b + batch_size], observer=observe)
        if progress is not None:
            progress(min(batch_size, windows.shape[0] - b))
    axes = None if residual is None else _principal_axes(residual)
    if axes is not None and kind == "sparse":
        groups = [(SPARSIFY_MLP_WEIGHT if name == "mlp_in" else 1.0, torch.cat(inputs.pop((layer, name))))
                  for layer, name in sorted(inputs)]
        axes = sparsified(axes, groups, progress=progress)
    return {"residual": axes, "values": _principal_axes(values)}


def level_thresholds(y: torch.Tensor, levels) -> list:
    """The levels' quantiles of |y|, read off a sorted strided sample of its entries (one sort for all
    levels; a full sort of every group at every step would dominate the refinement's time)."""
    sample = y.abs().flatten()[::16].sort().values
    return [sample[min(sample.numel() - 1, int(s * sample.numel()))] for s in levels]


def fit_steps(model, windows: int, kind: str = "sparse") -> int:
    """How many units fit_rotation reports to `progress`: the windows, then the refinement's steps."""
    return windows + (SPARSIFY_STEPS if kind == "sparse" and can_rotate_residual(model) else 0)


def thresholded_away(x: torch.Tensor, q: torch.Tensor, levels=SPARSIFY_LEVELS) -> list[float]:
    """For each level, the fraction of the energy of x Q [N, D] in entries below that level's quantile of
    |x Q|: what a threshold at that sparsity drops in basis q."""
    y = x @ q
    total = float(y.pow(2).sum())
    return [float(torch.where(y.abs() >= t, 0.0, y).pow(2).sum()) / total for t in level_thresholds(y, levels)]


def sparsified(q: torch.Tensor, groups: list, levels=SPARSIFY_LEVELS, steps: int = SPARSIFY_STEPS,
               progress=None) -> torch.Tensor:
    """Refine the orthogonal basis q [D, D] (columns) so that thresholding drops less: minimise, over
    (weight, inputs x [N, D]) groups and levels, the sum of weight x thresholded_away. Each step
    thresholds every group in the current basis (z: the entries kept), then takes the orthogonal Q
    closest to mapping x onto z (Procrustes: Q = U V^T for U S V^T = sum of weight x^T z / energy), so
    the objective never rises (up to the sampled quantiles)."""
    q = q.float()
    energy = [float(x.double().pow(2).sum()) for _, x in groups]
    for _ in range(steps):
        m = torch.zeros(q.shape, dtype=torch.float64)
        for (weight, x), e in zip(groups, energy):
            y = x @ q
            times_kept = sum((y.abs() >= t).float() for t in level_thresholds(y, levels))
            m += (weight / e) * (x.T @ (y * times_kept)).double()
        u, _, vh = torch.linalg.svd(m)
        q = (u @ vh).float()
        if progress is not None:
            progress(1)
    return q


def _principal_axes(moment: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of symmetric [..., n, n] as columns, largest eigenvalue first (fp32)."""
    eigenvalues, vectors = torch.linalg.eigh(moment)
    order = eigenvalues.argsort(dim=-1, descending=True)
    return torch.gather(vectors, -1, order.unsqueeze(-2).expand_as(vectors)).float()


def _shapes(arch) -> dict:
    """The rotation tensors' shapes for an Arch or a manifest's "arch" dict."""
    get = (lambda k, a: arch[k]) if isinstance(arch, dict) else (lambda k, a: getattr(arch, a))
    E = get("head_dim", "head_dim")
    return {"residual": (get("hidden", "hidden"),) * 2,
            "values": (get("layers", "num_layers"), get("kv_heads", "num_kv_heads"), E, E)}


def check_rotation(rotation: dict, arch, where: str):
    """One clear line when a rotation's tensors do not fit the model's shape or are not orthogonal."""
    for name, shape in _shapes(arch).items():
        q = rotation.get(name)
        if q is None:
            continue
        if tuple(q.shape) != shape:
            raise ShadowError(f"{where}: rotation {name} has shape {list(q.shape)}, expected {list(shape)}")
        eye = torch.eye(shape[-1], dtype=torch.float64)
        if float((q.double().transpose(-1, -2) @ q.double() - eye).abs().max()) > 1e-4:
            raise ShadowError(f"{where}: rotation {name} is not orthogonal")


def same_rotation(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return all((a.get(k) is None) == (b.get(k) is None) and (a.get(k) is None or torch.equal(a[k], b[k]))
               for k in SPACES)


def rotation_tensors(rotation: dict | None) -> dict:
    """The tensors a calibration or export folder stores a rotation as ({} for none)."""
    return {f"rotation.{k}": q.contiguous() for k, q in (rotation or {}).items() if q is not None}


def rotation_from_tensors(tensors: dict, where) -> dict:
    rotation = {k: tensors.get(f"rotation.{k}") for k in SPACES}
    if rotation["values"] is None:
        raise ShadowError(f"{where}: the manifest names a rotation but the file holds no rotation.values")
    return rotation


def fresh_copy(model):
    """A deep copy of `model` without what shadowllm cached on it (CACHED: rebuilt on demand), so weights
    changed on the copy do not answer with the source's fingerprint, adapter or float64 copy."""
    caches = {k: model.__dict__.pop(k) for k in CACHED if k in model.__dict__}
    try:
        return copy.deepcopy(model)
    finally:
        model.__dict__.update(caches)


@torch.no_grad()
def rotated(model, rotation: dict, where: str = "rotation"):
    """A copy of `model` with the rotation folded into its weights: the same function (to fp32
    rounding), its activation inputs in the rotated bases. The copy records the source's fingerprint
    (`_shadowllm_source_fingerprint`: what an export of it names as its model) and the rotation
    (`_shadowllm_rotation`: what the export stores); its own fingerprint is of its new weights. A rotation
    that does not fit the model is one line naming `where` (the file it came from)."""
    from .loading import fingerprint

    check_rotation(rotation, adapter_for(model).arch, where)  # before copying anything
    source = fingerprint(model)
    out = fresh_copy(model)
    out._shadowllm_source_fingerprint = source
    out._shadowllm_rotation = rotation
    adapter = adapter_for(out)
    arch = adapter.arch
    if rotation.get("values") is not None:
        _rotate_values(adapter, arch, rotation["values"].double())
    if rotation.get("residual") is not None:
        if not can_rotate_residual(out):
            raise ShadowError(f"a residual rotation does not fit this model ({residual_refusal(out)})")
        _rotate_residual(out, adapter, arch, rotation["residual"].double())
    return out


def _set(param: torch.Tensor, value: torch.Tensor):
    param.copy_(value.to(param.dtype))


def _rotate_values(adapter, arch, values):
    G, E = arch.num_kv_heads, arch.head_dim
    group = arch.num_heads // G
    for layer in range(arch.num_layers):
        w = adapter.attention(layer)
        wv, wo_t = w.w_v.double().clone(), w.w_o_t.double().clone()  # [G*E, D], [H*E, D]
        bv = None if w.b_v is None else w.b_v.double().clone()
        for g in range(G):
            r = values[layer, g]
            rows = slice(g * E, (g + 1) * E)
            wv[rows] = r.T @ wv[rows]
            if bv is not None:
                bv[rows] = r.T @ bv[rows]
            for h in range(g * group, (g + 1) * group):  # o_proj columns = rows of its transpose
                wo_t[h * E:(h + 1) * E] = r.T @ wo_t[h * E:(h + 1) * E]
        _set(w.w_v, wv)
        _set(w.w_o_t, wo_t)  # a transposed view of o_proj.weight: writes through
        if bv is not None:
            _set(w.b_v, bv)


def _rotate_residual(model, adapter, arch, q):
    inner = adapter.inner
    if model.lm_head.weight is inner.embed_tokens.weight:  # untie: the head takes the final norm's scale
        tied = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(tied.detach().clone(), requires_grad=tied.requires_grad)
        model.config.tie_word_embeddings = False
    _set(inner.embed_tokens.weight, inner.embed_tokens.weight.double() @ q)
    final = inner.norm.weight
    _set(model.lm_head.weight, model.lm_head.weight.double() * final.double() @ q)
    final.fill_(1.0)
    for layer in range(arch.num_layers):
        a, m = adapter.attention(layer), adapter.mlp(layer)
        for norm, readers in ((adapter.attn_norm(layer), (a.w_q, a.w_k, a.w_v)),
                              (adapter.mlp_norm(layer), (m.w_gate, m.w_in))):
            for w in readers:
                _set(w, w.double() * norm.weight.double() @ q)
            norm.weight.fill_(1.0)
        for w_t, b in ((a.w_o_t, a.b_o), (m.w_out_t, None)):  # writers: [in, D] rows rotate as x -> x Q
            _set(w_t, w_t.double() @ q)
            if b is not None:
                _set(b, b.double() @ q)


class ReadsUnrotated(torch.nn.Module):
    """A predictor trained on the model's own residual stream (ShadowLLM reads the layer-0 attention
    output), fed the rotated model's: x Q^T puts the input back in the basis it was trained on."""

    def __init__(self, net: torch.nn.Module, residual: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("unrotate", residual.t().contiguous().float(), persistent=False)

    def forward(self, x):
        return self.net(x @ self.unrotate.to(x.dtype))


def predictor_net_for(model, net):
    """`net` as a rotated `model` (rotated()) must feed it: unchanged when the residual is not rotated."""
    residual = (getattr(model, "_shadowllm_rotation", None) or {}).get("residual")
    return net if residual is None else ReadsUnrotated(net, residual)
