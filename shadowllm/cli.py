"""The `shadowllm` command line. Each subcommand parses its flags and calls the stage that does the work;
a ShadowError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys

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


def _model_arg(p):
    p.add_argument("model", nargs="?", default=None,
                   help="embedded model name (default: smollm2-135m) or a local Hugging Face folder")


def cmd_info(args):
    from .info import architecture_table
    from shadowllm.models import load

    model, _ = load(args.model)
    print(architecture_table(model))


def cmd_generate(args):
    from shadowllm.models import load
    from shadowllm.predictor import fixed_masks
    from shadowllm.predictor.fixed_masks import describe
    from shadowllm.runtime import Sampling, TorchBackend, generate

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # validate before loading
    model, tokenizer = load(args.model)
    heads, neurons = fixed_masks(args.masks, model, tokenizer, args.head_sparsity, args.neuron_sparsity,
                                 seed=args.seed or 0)
    if heads is not None or neurons is not None:
        print(f"[shadowllm] {args.masks} masks: heads {describe(heads)}, neurons {describe(neurons)}",
              file=sys.stderr)
    prompts = [_format_prompt(tokenizer, p, args.chat) for p in args.prompt]
    backend = TorchBackend(model, heads, neurons)
    stream = len(prompts) == 1
    results = generate(backend, tokenizer, prompts, args.max_new_tokens, sampling, stop=args.stop,
                       on_text=(lambda _, delta: print(delta, end="", flush=True)) if stream else None)
    if stream:
        print()
    else:
        for i, r in enumerate(results):
            print(f"--- [{i}] {args.prompt[i]!r} ({r.finish_reason})\n{r.text}")


def _format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        from shadowllm.models import ShadowError
        raise ShadowError("--chat: this model's tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.model, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shadowllm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shadowllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("info", help="print a model's architecture table")
    _model_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text (backend torch: the sparse PyTorch reference)")
    _model_arg(p)
    p.add_argument("--backend", choices=["torch"], default="torch")
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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="end-to-end demo on the embedded default model")
    p.add_argument("--model", default=None, help="model name or folder (default: smollm2-135m)")
    p.add_argument("--quick", action="store_true", help="fewer windows and tokens")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from shadowllm.models import ShadowError

    try:
        args.func(args)
    except ShadowError as e:
        print(f"shadowllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shadowllm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
