"""The two predictors and their on-disk artifact (safetensors + JSON manifest, never pickle).

- ShadowPredictor: ONE MLP from the layer-0 attention output [D] to every later layer's head and
  neuron scores. Its output layer is (L-1)*(H+F) wide (SmolLM2-135M: 29*1545 = 44,805), so it is
  factorised through a rank-r bottleneck: D -> hidden -> r -> (L-1)*(H+F).
- DejaVuPredictor: one low-rank MLP per layer l >= 1, D -> r -> H+F, fed the residual input of
  layer l-1 (lookahead: the prediction for layer l is ready before layer l runs).
Both standardise their inputs with a mean/std saved beside the weights, and both predict a
correction to a prior, the mean training target of each unit (a `prior` buffer, the static
policy's scores), with the last layer initialised to zero: training starts from the static masks and
can only move away from them where the input says so. Without it, a predictor trained on a few
hundred sequences ranks units worse than the static prior it should refine. Layer 0 is always
dense, so neither predicts it; `split_scores` pads it with +inf (always kept).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shadowllm.models import ShadowError
from shadowllm.models.rotation import predictor_net_for

from .artifacts import check_model, read_manifest

ARTIFACT_WEIGHTS = "predictor.safetensors"
ARTIFACT_MANIFEST = "predictor.json"
FORMAT = "shadowllm-predictor/1"


class ShadowPredictor(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, neurons: int, width: int = 512, rank: int = 64):
        super().__init__()
        self.layers, self.heads, self.neurons = layers, heads, neurons
        self.register_buffer("mean", torch.zeros(hidden))
        self.register_buffer("std", torch.ones(hidden))
        self.register_buffer("prior", torch.zeros(layers - 1, heads + neurons))
        self.body = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, rank, bias=False))
        self.out = nn.Linear(rank, (layers - 1) * (heads + neurons))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> scores [..., L-1, H+F] (layers 1..L-1)."""
        y = self.out(self.body((x - self.mean) / self.std))
        return self.prior + y.view(*x.shape[:-1], self.layers - 1, self.heads + self.neurons)


class DejaVuPredictor(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, neurons: int, rank: int = 128):
        super().__init__()
        self.layers, self.heads, self.neurons = layers, heads, neurons
        n = layers - 1
        self.register_buffer("mean", torch.zeros(n, hidden))
        self.register_buffer("std", torch.ones(n, hidden))
        self.w1 = nn.Parameter(torch.randn(n, hidden, rank) * hidden**-0.5)
        self.b1 = nn.Parameter(torch.zeros(n, rank))
        self.w2 = nn.Parameter(torch.zeros(n, rank, heads + neurons))
        self.b2 = nn.Parameter(torch.zeros(n, heads + neurons))
        self.register_buffer("prior", torch.zeros(n, heads + neurons))  # logit of each unit's label rate

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        """residual [..., L-1, D] (inputs of layers 0..L-2) -> logits [..., L-1, H+F] for layers 1..L-1."""
        x = (residual - self.mean) / self.std
        h = torch.relu(torch.einsum("...ld,ldr->...lr", x, self.w1) + self.b1)
        return torch.einsum("...lr,lro->...lo", h, self.w2) + self.b2 + self.prior

    def layer(self, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """Logits [..., H+F] of one layer (>= 1) from the residual input of layer-1."""
        i = layer - 1
        x = (residual - self.mean[i]) / self.std[i]
        return torch.relu(x @ self.w1[i] + self.b1[i]) @ self.w2[i] + self.b2[i] + self.prior[i]


def split_scores(pred: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., L-1, H+F] -> (heads [..., L, H], neurons [..., L, F]) with layer 0 = +inf (always kept)."""
    pad = torch.full_like(pred[..., :1, :], float("inf"))
    full = torch.cat([pad, pred], dim=-2)
    return full[..., :heads], full[..., heads:]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_prediction(module: nn.Module) -> int:
    """Multiply-adds x 2 of one prediction (one token, or one sequence for per-sequence masks)."""
    if isinstance(module, ShadowPredictor):
        return 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    return 2 * (module.w1.numel() + module.w2.numel())


class Predictor:
    """A trained predictor with its manifest: kind, granularity, criterion, sizes, metrics, model fingerprint."""

    def __init__(self, net: nn.Module, manifest: dict, source: str | None = None):
        self.net, self.manifest = net.eval(), manifest
        self.source = source  # the folder it was loaded from (None when trained in this process)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def granularity(self) -> str:
        return self.manifest["granularity"]

    def fed_by(self, model) -> "Predictor":
        """This predictor as `model` must feed it: itself, or, when `model` is a rotated copy
        (models/rotation.py), one that turns the rotated residual back into the basis it was trained on."""
        net = predictor_net_for(model, self.net)
        return self if net is self.net else Predictor(net, self.manifest, self.source)

    def save(self, folder: str | os.PathLike):
        """Write predictor.safetensors + predictor.json into `folder` atomically (temp folder + rename)."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp / ARTIFACT_WEIGHTS))
        (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)


def build_net(manifest: dict) -> nn.Module:
    s = manifest["sizes"]
    if manifest["kind"] == "shadow":
        return ShadowPredictor(s["hidden"], s["layers"], s["heads"], s["neurons"], s["width"], s["rank"])
    return DejaVuPredictor(s["hidden"], s["layers"], s["heads"], s["neurons"], s["rank"])


def load_predictor(folder: str | os.PathLike, model=None) -> Predictor:
    """Load a predictor folder; with `model`, refuse one trained on another model."""
    folder = Path(folder)
    manifest = read_manifest(folder, ARTIFACT_MANIFEST, FORMAT, "--predictor", "train")
    check_model(manifest, model, f"--predictor {folder} was trained")
    net = build_net(manifest)
    try:
        net.load_state_dict(load_file(str(folder / ARTIFACT_WEIGHTS)))
    except Exception as e:
        raise ShadowError(f"{folder / ARTIFACT_WEIGHTS}: unreadable or mismatched weights "
                          f"({str(e).splitlines()[0]})") from None
    return Predictor(net, manifest, str(folder))
