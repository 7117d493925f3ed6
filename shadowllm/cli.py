"""The `shadowllm` command line. Each subcommand parses its flags and calls the stage that does the work;
a ShadowError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line (plus where to look), not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fraction(text: str) -> float:
    """A sparsity flag: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _corpus_args(p):
    p.add_argument("--corpus", default="wiki",
                   help="wiki (embedded), or your text: a .txt file (documents between blank lines), a folder of "
                        ".txt files (one document each) or a .jsonl file; split by document like wiki")
    p.add_argument("--text-field", default="text", help="the text field of a .jsonl --corpus")


def _model_arg(p):
    p.add_argument("model", nargs="?", default=None,
                   help="embedded model name (default: smollm2-135m) or a local Hugging Face folder")


def cmd_info(args):
    from .info import architecture_table
    from shadowllm.models import load

    model, _ = load(args.model)
    print(architecture_table(model))


def cmd_generate(args):
    from shadowllm.runtime import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # validate before loading
    from .api import is_export_folder

    if args.backend in ("ort", "tensorrt") or is_export_folder(args.model):
        from shadowllm.export.folder import check_export_folder, sparsity_value

        from .api import load

        if is_export_folder(args.model):  # the error names the CLI's flag, before anything loads
            sparsity_value(check_export_folder(Path(args.model), graph=False), args.sparsity)
        deployed = load(args.model or "", args.backend or "ort", args.sparsity, dtype=args.dtype)
        tokenizer, backend = deployed.tokenizer, deployed.backend
        where = {"tensorrt": "tensorrt", "cuda": f"CUDA kernels ({args.dtype})"}.get(
            backend.name, f"onnxruntime ({getattr(backend, 'device', 'cpu')})")
        print(f"[shadowllm] {where}, policy {deployed.manifest['policy']}, sparsity {args.sparsity}", file=sys.stderr)
    else:
        tokenizer, backend = _torch_backend(args)
    _run_generation(args, tokenizer, backend, sampling)


def _torch_backend(args):
    from shadowllm.models import load
    from shadowllm.predictor import fixed_masks
    from shadowllm.predictor.fixed_masks import describe
    from shadowllm.runtime import TorchBackend

    if args.backend == "cuda":
        from shadowllm.runtime.cuda_kernels import require_cuda

        require_cuda()  # before loading anything
    model, tokenizer = load(args.model)
    if args.predictor:
        from shadowllm.predictor.predictors import load_predictor

        predictor = load_predictor(args.predictor, model)
        if args.backend == "cuda":
            from shadowllm.runtime.cuda_backend import CudaBackend

            backend = CudaBackend(model, predictor=predictor, head_sparsity=args.head_sparsity,
                                  neuron_sparsity=args.neuron_sparsity, dtype=args.dtype)
        else:
            backend = TorchBackend(model, predictor=predictor, head_sparsity=args.head_sparsity,
                                   neuron_sparsity=args.neuron_sparsity)
        print(f"[shadowllm] {predictor.kind}/{predictor.granularity} predictor masks: heads "
              f"{args.head_sparsity:.0%} off, neurons {args.neuron_sparsity:.0%} off (layer 0 dense)", file=sys.stderr)
    else:
        heads, neurons = fixed_masks(args.masks, model, tokenizer, args.head_sparsity, args.neuron_sparsity,
                                     seed=args.seed or 0)
        if heads is not None or neurons is not None:
            print(f"[shadowllm] {args.masks} masks: heads {describe(heads)}, neurons {describe(neurons)}",
                  file=sys.stderr)
        if args.backend == "cuda":
            from shadowllm.runtime.cuda_backend import CudaBackend

            backend = CudaBackend(model, heads, neurons, dtype=args.dtype)
            print(f"[shadowllm] CUDA kernels on {torch_device_name()}, {args.dtype}", file=sys.stderr)
        else:
            backend = TorchBackend(model, heads, neurons)
    return tokenizer, backend


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def _run_generation(args, tokenizer, backend, sampling):
    from shadowllm.runtime import generate

    prompts = [_format_prompt(tokenizer, p, args.chat) for p in args.prompt]
    stream = len(prompts) == 1
    results = generate(backend, tokenizer, prompts, args.max_new_tokens, sampling, stop=args.stop,
                       on_text=(lambda _, delta: print(delta, end="", flush=True)) if stream else None)
    if stream:
        print()
    else:
        for i, r in enumerate(results):
            print(f"--- [{i}] {args.prompt[i]!r} ({r.finish_reason})\n{r.text}")


def _format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    from shadowllm.runtime.generate import chat_prompt

    return chat_prompt(tokenizer, prompt) if chat else prompt


def cmd_calibrate(args):
    import time

    from shadowllm.models import ShadowError, corpus, load
    from shadowllm.predictor.traces import calibrate

    criteria = args.criterion or ["plainact"]
    text = corpus(args.corpus, args.text_field)  # before loading the model: a bad --corpus is one line
    if "activations" in criteria:
        if len(criteria) > 1:
            raise ShadowError("--criterion activations calibrates activation thresholds into a folder of its own; "
                              "run it without other criteria")
        from shadowllm.predictor.thresholds import calibrate_thresholds

        model, tokenizer = load(args.model)
        start = time.perf_counter()
        calib = calibrate_thresholds(model, tokenizer, args.out, text, args.split, args.samples, args.window,
                                     args.greedy_windows, args.batch_size, rotate=args.rotate)
        rotation = calib.manifest["rotation"]
        print(f"activation thresholds of {calib.manifest['samples']} windows (greedy costs on "
              f"{calib.manifest['greedy_windows']}"
              + (f"; {rotation['kind']} bases of the {' and '.join(rotation['spaces'])} from {rotation['windows']}"
                 if rotation else "")
              + f") in {args.out} [{time.perf_counter() - start:.0f} s, peak RSS "
              f"{_peak_rss_mb():.0f} MB]")
        return
    model, tokenizer = load(args.model)
    start = time.perf_counter()
    manifest = calibrate(model, tokenizer, args.out, criteria, text, args.split,
                         args.samples, args.window, args.batch_size, args.token_positions, args.shard_size, args.seed)
    took = time.perf_counter() - start
    print(f"traces of {manifest['samples']} windows ({', '.join(manifest['criteria'])}) in {args.out} "
          f"[{took:.0f} s this run, peak RSS {_peak_rss_mb():.0f} MB]")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_train(args):
    from shadowllm.predictor.train import train

    model = None
    if args.model:
        from shadowllm.models import load
        model, _ = load(args.model)
    predictor = train(args.traces, args.kind, args.granularity, args.criterion, args.rank, args.width, args.epochs,
                      args.lr, args.batch_size, args.holdout, args.label_keep, model=model,
                      target_scale=args.target_scale)
    predictor.save(args.out)
    m, c = predictor.manifest["metrics"], predictor.manifest["cost"]
    print(f"{args.kind}/{args.granularity} predictor ({predictor.manifest['criterion']}) -> {args.out}")
    print(f"  held-out Spearman: heads {m['heads']['spearman_mean']:.3f}, neurons {m['neurons']['spearman_mean']:.3f}")
    for name in ("heads", "neurons"):
        rec = ", ".join(f"{s}: {v:.3f}" for s, v in m[name]["topk_recall"].items())
        print(f"  top-k recall ({name}) at sparsity {rec}")
    print(f"  {c['parameters']:,} parameters ({c['parameter_fraction']:.2%} of the model's blocks), "
          f"{c['flops_per_prediction']:,} FLOPs per prediction ({c['flops_fraction_per_token']:.2%} of a token), "
          f"runs {c['runs']}")


def _threshold_calibration(model, tokenizer, folder, weights: str = "fp32"):
    """The calibration of --thresholds DIR, or the cached built-in one (made once, with a progress bar).
    Quantized weights take an unrotated calibration: a rotation folded into the weights moves them off
    their grid, and rounding them again costs more than thresholds do (SmolLM2 at int4: +52% perplexity)."""
    from shadowllm.models import ShadowError
    from shadowllm.predictor.thresholds import default_calibration, load_calibration

    if folder:
        calib, where = load_calibration(folder, model), str(folder)
        if weights != "fp32" and calib.rotation is not None:
            raise ShadowError(f"--thresholds {folder}: a calibration in rotated bases; --weights {weights} keeps the "
                              "weights on their grid, which a folded rotation leaves: calibrate with --rotate none")
        return calib, where
    if weights != "fp32":
        return (default_calibration(model, tokenizer, rotate="none"),
                "built-in (wiki train, 128 windows of 256 tokens, unrotated: quantized weights)")
    return default_calibration(model, tokenizer), "built-in (wiki train, 128 windows of 256 tokens, sparse bases)"


def cmd_eval(args):
    import shlex

    from shadowllm.models import ShadowError, adapter_for, load
    from shadowllm.predictor.allocation import ALLOCATIONS
    from shadowllm.predictor.evaluation import evaluate, markdown, rows_from_json, scoring_window, write_reports
    from shadowllm.predictor.fixed_masks import static_from_traces
    from shadowllm.predictor.predictors import load_predictor
    from shadowllm.predictor.thresholds import ALLOCATIONS as THRESHOLD_ALLOCATIONS, check_grid_sparsity, threshold_table

    allocations = args.allocation or []
    mask_allocation = ([a for a in allocations if a in ALLOCATIONS] or ["per_layer"])[-1]
    threshold_allocations = [a for a in allocations if a in THRESHOLD_ALLOCATIONS] or ["greedy"]
    # threshold rows when asked for (by --method, or by giving a calibration): they need a calibration
    thresholded = bool({"threshold", "shadow+threshold"} & set(args.method or [])) or args.thresholds is not None
    if thresholded:
        for s in args.sparsity:
            check_grid_sparsity(s)
    from shadowllm.models import corpus
    from shadowllm.models.quant import apply_weights, check_activations, check_weights_flag, token_bytes

    check_weights_flag(args.weights)  # before loading: a bad --weights (or --activations) is one line
    if args.activations is not None:
        check_activations(args.activations)
    text = corpus(args.corpus, args.text_field)  # before loading the model: a bad --corpus is one line
    merged = [rows_from_json(path) for path in args.merge]
    model, tokenizer = load(args.model)
    # the PyTorch reference on the values an export of that format holds
    fmt, blocks, activations = apply_weights(model, args.weights, args.activations)
    args.window, args.prompt, scored = scoring_window(tokenizer, text, args.split, args.window, args.prompt,
                                                      args.max_windows, adapter_for(model).arch.max_positions)
    print(f"[shadowllm] {scored}", file=sys.stderr)
    for path, (old_rows, old_meta) in zip(args.merge, merged):
        mine = {"split": args.split, "window": args.window, "prompt": args.prompt}
        if {k: old_meta.get(k) for k in mine} != mine or any(r.windows != args.max_windows for r in old_rows):
            raise ShadowError(f"--merge {path}: a report of another protocol (split/window/prompt/windows "
                              f"{[old_meta.get(k) for k in mine]}/{old_rows[0].windows if old_rows else None}); "
                              f"this run: {list(mine.values())}/{args.max_windows}")
    merged = [r for old_rows, _ in merged for r in old_rows if r.method != "dense"]
    predictors = [load_predictor(p, model) for p in args.predictor]
    tables, threshold_source, threshold_model = None, None, None
    if thresholded:
        calib, threshold_source = _threshold_calibration(model, tokenizer, args.thresholds, fmt)
        arch = adapter_for(model).arch
        tables = {a: threshold_table(calib, arch, a)[1] for a in threshold_allocations}
        threshold_model = calib.model_for(model)
    static = None
    traces = args.traces or next((p.manifest["training"]["traces"] for p in predictors), None)
    if traces:
        static, _ = static_from_traces(traces, model, args.static_criterion)
    oracle = args.oracle_criterion or sorted({"l2_norm"} | {p.manifest["criterion"] for p in predictors})
    rows = evaluate(model, tokenizer, predictors, args.sparsity, args.target or ["heads", "neurons", "both"],
                    args.split, args.max_windows,
                    args.window, args.prompt, static, oracle, mask_allocation, args.lastword, args.seed,
                    args.method, threshold_tables=tables, hybrid_head_sparsity=args.hybrid_head_sparsity,
                    text_corpus=text, threshold_model=threshold_model)
    arch = adapter_for(model).arch
    for row in rows:
        row.weights = blocks.gguf_types() if blocks is not None else fmt
        row.bytes_per_token = token_bytes(arch, row.bytes_fraction, fmt)
    rows += merged
    command = "shadowllm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = {"model": args.model or "smollm2-135m", **text.describe(), "split": args.split, "window": args.window,
            "prompt": args.prompt, "weights": args.weights, "activations": activations,
            "allocation": mask_allocation, "threshold_allocations": threshold_allocations if thresholded else [],
            "thresholds": threshold_source, "merged": list(args.merge), "predictors": [p.manifest for p in predictors]}
    if args.out:
        write_reports(rows, args.out, command, meta)
    print(markdown(rows, command))


def _sparsities(text: str):
    values = [fraction(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expects a comma-separated list such as 0.1,0.2,0.3,0.5")
    return values


def cmd_export(args):
    from shadowllm.export.exporter import export
    from shadowllm.models import load
    from shadowllm.models.quant import apply_weights, check_activations, check_weights_flag

    check_weights_flag(args.weights)  # before loading: a bad --weights (or --activations) is one line
    if args.activations is not None:
        check_activations(args.activations)
    model, tokenizer = load(args.model)
    fmt, _, _ = apply_weights(model, args.weights, args.activations)  # first: scores, predictors, thresholds see it
    static, source = None, None
    if args.policy == "static":
        if args.traces:
            from shadowllm.predictor.fixed_masks import static_from_traces

            static, source = static_from_traces(args.traces, model, args.criterion)
        else:
            from shadowllm.predictor.fixed_masks import static_scores

            static = static_scores(model, tokenizer)
            source = {"traces": None, "criterion": "l2_norm", "samples": 8, "note": "built-in calibration"}
    predictor = None
    if args.policy in ("shadow", "dejavu", "shadow+threshold"):
        if not args.predictor:
            from shadowllm.models import ShadowError
            raise ShadowError(f"--policy {args.policy} needs --predictor DIR (from `shadowllm train`)")
        from shadowllm.predictor.predictors import load_predictor

        predictor = load_predictor(args.predictor, model)
    thresholds, threshold_source = None, None
    if args.policy in ("threshold", "shadow+threshold"):
        from shadowllm.models import adapter_for
        from shadowllm.predictor.thresholds import threshold_table

        calib, where = _threshold_calibration(model, tokenizer, args.thresholds, fmt)
        thresholds = threshold_table(calib, adapter_for(model).arch, args.allocation)
        threshold_source = {"calibration": where, "allocation": args.allocation,
                            **{k: calib.manifest.get(k) for k in ("corpus", "split", "samples", "window",
                                                                   "greedy_windows")}}
        model = calib.model_for(model)  # rotated when the calibration was: the export carries the rotation
    out = export(model, tokenizer, args.out, args.policy, static, source, args.target, predictor, args.predictor,
                 thresholds, threshold_source, args.head_sparsity, fmt)
    sizes = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {args.policy} model to {out} ({sizes / 2**20:.1f} MiB)")


def cmd_parity(args):
    from shadowllm.models import load
    from shadowllm.export.folder import check_export_folder
    from shadowllm.parity.check import check, write_report

    manifest = check_export_folder(Path(args.folder), graph=args.backend != "cuda")
    if manifest.get("thresholds"):  # before loading anything: the runtime sparsity picks a row of the table
        from shadowllm.predictor.thresholds import check_grid_sparsity

        check_grid_sparsity(args.sparsity)
    if args.backend == "cuda":
        from shadowllm.runtime.cuda_kernels import require_cuda

        require_cuda()  # before loading anything
    model, tokenizer = load(args.model or manifest.get("model"))
    if args.backend == "cuda":
        from shadowllm.parity.cuda import check_cuda

        report = check_cuda(args.folder, model, tokenizer, args.sparsity, args.steps, args.dtype)
    elif args.against == "tensorrt":
        from shadowllm.parity.check import check_tensorrt

        report = check_tensorrt(args.folder, tokenizer, args.sparsity, args.steps)
    else:
        native = {"auto": None, "on": True, "off": False}[args.native]
        report = check(args.folder, model, tokenizer, args.sparsity, args.steps, golden_path=args.golden,
                       native=native)
    print(report.table())
    write_report(report, args.json or Path(args.folder) / "parity.json")
    return 0 if report.passed else 1


def cmd_build(args):
    import json

    from shadowllm.compiler.build import build

    out = build(args.folder, args.target, args.fp16, args.instances, args.max_batch, args.sparsity, args.step,
                args.op_library)
    info = json.loads((out / "shadowllm.json").read_text())["build"]
    if args.target == "triton":
        print(f"built Triton model repository {out} (model `{info['model']}` on the Python backend, runtime "
              f"{info['runtime']}, {info['instances']} instance(s), batches up to {info['max_batch']}); "
              + ("serve it with: shadowllm serve " + str(out) if info["step"] == "python" else
                 "its step model needs Triton's onnxruntime backend (the NGC container; see docs/serving.md)"))
    elif args.target == "tensorrt":
        print(f"built TensorRT engine {out / 'model.engine'} ({'fp16' if args.fp16 else 'fp32'}; "
              f"{', '.join(info['passes'])})")
    else:
        print(f"built {args.target} model in {out}: {info['nodes_before']} -> {info['nodes_after']} nodes "
              f"({', '.join(info['passes'])})")


def cmd_serve(args):
    from shadowllm.serving.server import serve

    return serve(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port, timeout=args.timeout)


def cmd_bench(args):
    import shlex

    from shadowllm.models import ShadowError
    from shadowllm.bench.run import REAL, SYNTHETIC, Plan, run
    from shadowllm.bench.report import markdown, write

    if args.backend == "cuda":  # the GPU decode rows (bench/cuda.py): its own shapes and report
        from shadowllm.bench.cuda import main as bench_cuda

        return bench_cuda(["--out", args.out or "docs/results/bench-gpu"]
                          + (["--models", ",".join(args.models)] if args.models else []))
    plan = Plan.quick() if args.quick else Plan()
    if args.models:
        unknown = [m for m in args.models if m not in REAL + SYNTHETIC]
        if unknown:
            raise ShadowError(f"--models {','.join(unknown)}: expected some of {', '.join(REAL + SYNTHETIC)}")
        plan.models = tuple(args.models)
    for flag in ("tokens", "repeats", "prompt_tokens", "threads"):
        if getattr(args, flag) is not None:
            setattr(plan, flag, getattr(args, flag))
    if args.no_predictors:
        plan.predictor_policies = False
    if args.no_peers:
        plan.peers = False
    if args.weights is not None:
        unknown = [w for w in args.weights if w not in ("fp32", "int4")]
        if unknown or not args.weights:
            raise ShadowError(f"--weights {','.join(args.weights)}: expected fp32, int4 or both (comma-separated)")
        plan.weights = tuple(args.weights)
    rows, meta = run(plan)
    command = "shadowllm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.out:
        write(rows, meta, args.out, command)
    print(markdown(rows, meta, command))


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.model, quick=args.quick, backend=args.backend)


def build_parser() -> argparse.ArgumentParser:
    from shadowllm.predictor.criteria import CRITERIA
    parser = _Parser(prog="shadowllm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shadowllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("info", help="print a model's architecture table")
    _model_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text: an export folder on onnxruntime, or a model on the "
                                        "sparse PyTorch reference")
    p.add_argument("model", nargs="?", default=None,
                   help="an export folder (onnxruntime), a model name (default smollm2-135m) or a HF folder (torch)")
    p.add_argument("--backend", choices=["torch", "ort", "tensorrt", "cuda"], default=None,
                   help="default: ort for export folders (tensorrt: the engine of `build --target tensorrt`); "
                        "cuda: a model on the GPU through the plugins' CUDA kernels (no TensorRT)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weights on --backend cuda")
    p.add_argument("--sparsity", type=fraction, default=0.0, help="runtime sparsity of an export folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--head-sparsity", type=fraction, default=0.0)
    p.add_argument("--neuron-sparsity", type=fraction, default=0.0)
    p.add_argument("--masks", choices=["static", "random"], default="static",
                   help="where masks come from: static (L2 importance on the wiki train split) or random")
    p.add_argument("--predictor", default=None, help="a shadow predictor folder: masks predicted per input")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("calibrate", help="collect importance traces (scores + predictor inputs) on a corpus, or "
                                          "activation thresholds (--criterion activations)")
    _model_arg(p)
    p.add_argument("--criterion", action="append", choices=CRITERIA + ("activations",),
                   help="repeatable (default: plainact); activations: histograms of every projection input and "
                        "the greedy allocation's costs, for the threshold policies (alone)")
    p.add_argument("--greedy-windows", type=positive_int, default=32,
                   help="activations: windows the greedy allocation's costs are measured on")
    p.add_argument("--rotate", choices=["sparse", "pca", "none"], default="sparse",
                   help="activations: threshold the inputs in rotated bases folded into the weights (the same model, "
                        "less error for the bytes; the residual stream needs RMSNorm): sparse = PCA with the residual "
                        "basis refined so that each token's input is sparsest, pca = PCA only; or none")
    _corpus_args(p)
    p.add_argument("--split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--samples", type=int, default=256, help="number of windows")
    p.add_argument("--window", type=int, default=256, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--token-positions", type=int, default=16, help="positions per window kept for per-token targets")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="traces folder (an unfinished run there is resumed)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("train", help="train a ShadowLLM or DejaVu predictor from traces")
    p.add_argument("--traces", required=True)
    p.add_argument("--kind", choices=["shadow", "dejavu"], default="shadow")
    p.add_argument("--granularity", choices=["sequence", "token"], default="sequence")
    p.add_argument("--criterion", choices=CRITERIA, default=None, help="default: plainact (shadow), l2_norm (dejavu)")
    p.add_argument("--rank", type=int, default=None, help="output bottleneck rank (default 64 shadow, 128 dejavu)")
    p.add_argument("--width", type=int, default=512, help="shadow predictor hidden width")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--label-keep", type=float, default=0.5, help="dejavu: fraction labelled important")
    p.add_argument("--target-scale", choices=["linear", "log"], default="linear",
                   help="shadow: min-max normalise the scores as they are (default) or their log "
                        "(better recall, worse perplexity on SmolLM2-135M)")
    p.add_argument("--model", default=None, help="check the traces against this model's fingerprint")
    p.add_argument("--out", required=True, help="predictor folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="perplexity vs sparsity for every mask method")
    _model_arg(p)
    _corpus_args(p)
    p.add_argument("--predictor", action="append", default=[], help="predictor folder; repeatable")
    p.add_argument("--traces", default=None, help="traces for the static policy (default: the predictor's)")
    p.add_argument("--static-criterion", default="l2_norm")
    p.add_argument("--oracle-criterion", action="append", default=None, choices=CRITERIA)
    p.add_argument("--sparsity", type=_sparsities, default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--target", action="append", default=None, choices=["heads", "neurons", "both"])
    p.add_argument("--method", action="append", default=None,
                   choices=["dense", "static", "random", "shadow", "dejavu", "gate", "oracle", "threshold",
                            "shadow+threshold"])
    p.add_argument("--thresholds", default=None,
                   help="threshold methods (run with --method threshold / shadow+threshold, or when this is given): "
                        "a `calibrate --criterion activations` folder (default: built-in, cached)")
    p.add_argument("--hybrid-head-sparsity", type=_sparsities, default=[0.25],
                   help="shadow+threshold: fractions of heads the per-token predictor drops (comma-separated)")
    p.add_argument("--merge", action="append", default=[],
                   help="rows of an earlier report (JSON) of the same protocol, shown beside this run's")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default 256, or the whole split when it is shorter)")
    p.add_argument("--prompt", type=int, default=None,
                   help="prompt tokens per window; the rest is scored (default 128, or half the window)")
    p.add_argument("--allocation", action="append", default=None,
                   choices=["per_layer", "global", "hybrid", "uniform", "greedy"],
                   help="masks: per_layer (default), global or hybrid; threshold methods: uniform and/or greedy "
                        "(default greedy); repeatable")
    p.add_argument("--lastword", type=int, default=32, help="articles for last-word accuracy (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="report prefix: writes PREFIX.json, .md, .png")
    p.add_argument("--weights", default="fp32",
                   help="score the model with its projections on this format's grid (as `export --weights`): "
                        "fp32, int8, int4 or gguf (the source GGUF's own blocks); threshold rows then use an "
                        "unrotated calibration")
    p.add_argument("--activations", default=None,
                   help="int8 or fp32: the projections' inputs as `export --activations` (default: int8 with "
                        "quantized weights)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export model + masks to ONNX with the sparse custom ops")
    _model_arg(p)
    p.add_argument("--policy", choices=["dense", "static", "shadow", "dejavu", "threshold", "shadow+threshold"],
                   default="dense")
    p.add_argument("--thresholds", default=None,
                   help="threshold policies: a `calibrate --criterion activations` folder (default: built-in, cached)")
    p.add_argument("--allocation", choices=["uniform", "greedy"], default="greedy",
                   help="threshold policies: the same sparsity on every input, or the greedy allocation")
    p.add_argument("--head-sparsity", type=fraction, default=0.25,
                   help="shadow+threshold: fraction of heads the predictor drops (the runtime --sparsity picks "
                        "the thresholds)")
    p.add_argument("--predictor", default=None, help="shadow / dejavu: a predictor folder from `shadowllm train`")
    p.add_argument("--traces", default=None, help="static: importance from a calibrate run (default: built-in)")
    p.add_argument("--criterion", default="l2_norm", help="static: which criterion of the traces")
    p.add_argument("--target", choices=["heads", "neurons", "both"], default="both",
                   help="static: what the runtime sparsity applies to")
    p.add_argument("--weights", default="fp32",
                   help="the projections' format: fp32 (default), int8 (symmetric, the Q8_0 grid) or int4 "
                        "(asymmetric, the Q4_1 grid: the embedded model's own), in blocks of 32 along the input; "
                        "gguf: the source GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks, bit for bit")
    p.add_argument("--activations", default=None,
                   help="what the projections' inputs are: int8 (rounded per block of 32, as llama.cpp and "
                        "onnxruntime's int4 kernels do: the integer kernels then multiply bytes; the default "
                        "with quantized weights) or fp32 (the default with fp32 weights)")
    p.add_argument("--out", required=True, help="export folder (must not exist or be empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("parity", help="check an export folder against the PyTorch reference")
    p.add_argument("folder")
    p.add_argument("--model", default=None, help="the model it was exported from (default: as recorded)")
    p.add_argument("--sparsity", type=fraction, default=0.5)
    p.add_argument("--steps", type=int, default=32, help="greedy tokens compared")
    p.add_argument("--json", default=None, help="report path (default DIR/parity.json)")
    p.add_argument("--golden", default=None, help="also save the PyTorch golden outputs (Polygraphy RunResults JSON)")
    p.add_argument("--native", choices=["auto", "on", "off"], default="auto",
                   help="C++ kernels of the native library (auto: when built) or the ONNX function bodies (off)")
    p.add_argument("--against", choices=["pytorch", "tensorrt"], default="pytorch",
                   help="pytorch: onnxruntime vs the float64 PyTorch reference; tensorrt: the built engine vs "
                        "onnxruntime (needs `build --target tensorrt` first)")
    p.add_argument("--backend", choices=["ort", "cuda"], default="ort",
                   help="cuda: the export's model and policy run by the CUDA kernels vs the PyTorch reference")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights on --backend cuda")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("build", help="compile an export folder for a target (ort-cpu; tensorrt where present)")
    p.add_argument("folder")
    p.add_argument("--target", choices=["ort-cpu", "tensorrt", "triton"], default="ort-cpu")
    p.add_argument("--fp16", action="store_true", help="tensorrt: let TensorRT run layers and plugins in fp16")
    p.add_argument("--instances", type=int, default=1, help="triton: model instances (each its own process)")
    p.add_argument("--max-batch", type=int, default=8, help="triton: requests batched together at most")
    p.add_argument("--sparsity", type=float, default=0.0, help="triton: the sparsity of requests that give none")
    p.add_argument("--step", choices=["python", "onnxruntime"], default="python",
                   help="triton: where a forward step runs: in the Python model (default), or as a model on "
                        "Triton's onnxruntime backend (the NGC container) driven by it")
    p.add_argument("--op-library", help="triton --step onnxruntime: the custom-op library's path on the serving "
                                        "machine (default: this build's)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="serve DIR/triton (from `build --target triton`) with the bundled Triton "
                                      "Inference Server")
    p.add_argument("repository", help="a model repository written by `shadowllm build DIR --target triton`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model to load")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="decode tok/s, prefill, TTFT, peak RSS and the bytes bound per backend and "
                                      "sparsity, in one run")
    p.add_argument("--models", type=lambda v: [m for m in v.split(",") if m], default=None,
                   help="comma-separated: smollm2-135m (real weights), tinyllama-1.1b, opt-1.3b (synthetic, random "
                        "weights); default all three")
    p.add_argument("--backend", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: decode on the GPU (hf-eager-cuda, cuda-dense, cuda-native rows; Llama shapes, bf16)")
    p.add_argument("--quick", action="store_true", help="SmolLM2 only, fewer cells and tokens (under 3 minutes)")
    p.add_argument("--tokens", type=positive_int, default=None, help="new tokens per run (default 64; quick 16)")
    p.add_argument("--repeats", type=positive_int, default=None, help="runs per cell (default 3; quick 2)")
    p.add_argument("--prompt-tokens", type=positive_int, default=None, help="prompt length (default 128; quick 64)")
    p.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--weights", type=lambda v: [w for w in v.split(",") if w], default=None,
                   help="which cells: fp32, int4 (SmolLM2: the embedded GGUF's blocks; synthetic models: int4 "
                        "round-to-nearest) or both (default)")
    p.add_argument("--no-predictors", action="store_true",
                   help="skip the shadow and dejavu cells (their predictors train first: minutes on SmolLM2)")
    p.add_argument("--no-peers", action="store_true",
                   help="skip the peer rows on SmolLM2: llama.cpp on the GGUF (Q4_1 as shipped, Q8_0, F32; when "
                        "llama-cpp-python is installed: scripts/setup.sh --peers) and onnxruntime's own 4-bit "
                        "MatMulNBits on our dense export")
    p.add_argument("--out", default=None, help="report prefix: writes PREFIX.json, PREFIX.md and PREFIX.png")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="end-to-end demo on the embedded default model")
    p.add_argument("--model", default=None, help="model name or folder (default: smollm2-135m)")
    p.add_argument("--quick", action="store_true", help="fewer windows and tokens")
    p.add_argument("--backend", choices=["ort", "cuda"], default="ort",
                   help="where the exports answer and are checked: ONNX Runtime (CPU) or the CUDA kernels (GPU)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from shadowllm.models import ShadowError

    try:
        status = args.func(args)
    except ShadowError as e:
        print(f"shadowllm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a killed writer would
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except KeyboardInterrupt:
        print("shadowllm: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
