"""Does scaling thresholded inputs by their Fisher diagonal beat the PCA bases alone? (It does not.)

On top of the PCA bases (models/rotation.py), each coordinate of each thresholded input is scaled by
its Fisher diagonal^(alpha/2), sqrt(E[(dL/dv_i)^2]) with labels sampled from the model, folded exactly
into the weights (norm scales, v/o, up/down), so a threshold compares |v_i| * F_ii^(alpha/2): at
alpha = 1 the diagonal second-order loss of dropping entry i, the rule a Lagrangian over a byte
budget picks under that approximation. Each alpha gets its own calibration (128 wiki train windows,
greedy costs on 16) and greedy rows at six sparsities; alpha 0 is the shipped PCA-only calibration.

    .venv/bin/python research/fisher_scale_study.py 0,1.0,0.5        # the eval protocol (16 test windows)
    .venv/bin/python research/fisher_scale_study.py 0,1.0 64         # 64 other test windows (16..79)

~6 min per alpha on 2 cores (+4 min with 64 windows). Results: docs/research/thresholds.md, "Tried and dropped".
"""
import json
import sys
import time

import torch

from shadowllm.models import adapter_for, corpus, sparse_forward
from shadowllm.models.loading import load
from shadowllm.models.rotation import fit_rotation, fresh_copy, rotated
from shadowllm.predictor.evaluation import Threshold, evaluate_method
from shadowllm.predictor.thresholds import calibrate_thresholds, fisher_gradients, threshold_table

torch.manual_seed(0)
ALPHAS = [float(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0.0, 1.0, 0.5]
SPARS = [0.25, 0.26, 0.4, 0.41, 0.5, 0.51]
EVAL_WINDOWS = int(sys.argv[2]) if len(sys.argv) > 2 else 16
NAMES = ("attn_in", "head_context", "mlp_in", "neuron_act")


def fisher_diag(model, windows, batch=4):
    """{(layer, input name): the Fisher diagonal of that input, summed over tokens and sampled labels}."""
    F = {}
    g = torch.Generator().manual_seed(0)  # one stream of labels over every batch
    for b in range(0, windows.shape[0], batch):
        _, grads = fisher_gradients(model, windows[b:b + batch], at=NAMES, generator=g)
        for k, gs in grads.items():
            for gr in gs:
                F[k] = F.get(k, 0) + gr.double().pow(2).flatten(0, 1).sum(0)  # [D] | [H, E] | [F]
    return F


@torch.no_grad()
def scaled(model, F, alpha):
    out = fresh_copy(model)
    ad = adapter_for(out)
    arch = ad.arch
    G, E = arch.num_kv_heads, arch.head_dim
    group = arch.num_heads // G

    def norm_scale(f):
        s = f.sqrt().pow(alpha)
        return s / s.mean()

    for layer in range(arch.num_layers):
        a, m = ad.attention(layer), ad.mlp(layer)
        for name, norm, readers in (("attn_in", ad.attn_norm(layer), (a.w_q, a.w_k, a.w_v)),
                                    ("mlp_in", ad.mlp_norm(layer), (m.w_gate, m.w_in))):
            s = norm_scale(F[(layer, name)])
            norm.weight.copy_((norm.weight.double() * s).float())
            for w in readers:
                w.copy_((w.double() / s).float())
        f = F[(layer, "head_context")].reshape(G, group, E).mean(1)  # [G, E]: shared by a kv head's readers
        s = norm_scale(f)
        a.w_v.copy_((a.w_v.double() * s.reshape(-1, 1)).float())
        if a.b_v is not None:
            a.b_v.copy_((a.b_v.double() * s.reshape(-1)).float())
        so = s[:, None, :].expand(G, group, E).reshape(-1, 1)
        a.w_o_t.copy_((a.w_o_t.double() / so).float())
        s = norm_scale(F[(layer, "neuron_act")])
        m.w_in.copy_((m.w_in.double() * s[:, None]).float())
        if m.b_in is not None:
            m.b_in.copy_((m.b_in.double() * s).float())
        m.w_out_t.copy_((m.w_out_t.double() / s[:, None]).float())
    return out


def main():
    t0 = time.time()
    model, tok = load()
    wins = corpus("wiki").windows(tok, "train", 256, limit=128)
    rotation = fit_rotation(model, wins[:32])
    rm = rotated(model, rotation)
    F = fisher_diag(rm, wins[:16])
    print(f"fisher {time.time() - t0:.0f}s", flush=True)
    # the protocol's 16 windows, or EVAL_WINDOWS others after them
    first = 0 if EVAL_WINDOWS == 16 else 16
    test = corpus("wiki").windows(tok, "test", 256, limit=first + EVAL_WINDOWS)[first:]
    for alpha in ALPHAS:
        sm = scaled(rm, F, alpha) if alpha else rm
        with torch.no_grad():
            d = (sparse_forward(sm, wins[:2])[0] - sparse_forward(rm, wins[:2])[0]).abs().max()
        print(f"alpha {alpha}: max logit diff vs rotated {float(d):.2e}", flush=True)  # the same function
        t1 = time.time()
        calib = calibrate_thresholds(sm, tok, None, samples=128, greedy_windows=16, rotate="none", progress=False)
        table = threshold_table(calib, adapter_for(sm).arch, "greedy")[1]
        print(f"alpha {alpha}: calibrated {time.time() - t1:.0f}s", flush=True)
        for s in SPARS:
            ppl, frac, _ = evaluate_method(sm, Threshold(table, "greedy", "both", s, "per_layer"), test, 128)
            print(json.dumps({"alpha": alpha, "s": s, "ppl": round(ppl, 3), "bytes": round(frac, 4)}), flush=True)
        print(f"alpha {alpha}: done {time.time() - t1:.0f}s", flush=True)


if __name__ == "__main__":
    main()
