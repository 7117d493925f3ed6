"""lm-evaluation-harness on deployed models: the `shadowllm` model of lm-eval (0.4.x).

    python -m shadowllm.harness --model shadowllm --model_args path=DIR,sparsity=0.5,backend=ort \\
        --tasks TASKS [every other lm_eval flag]

is lm_eval's own command line with this module imported first: lm-eval 0.4.13 has no plugin
discovery for models (its registry knows the models it ships, and whatever an imported module
registers), so `lm_eval --model shadowllm` alone cannot find it. From Python:
`lm_eval.simple_evaluate(model=ShadowLLMHarness(path=DIR, sparsity=0.5), tasks=[...])`.

model_args: `path` an export folder (backend `ort`, default, or `tensorrt`) or a model name / HF
folder (backend `torch`: the dense PyTorch reference); `sparsity` the runtime sparsity of the export;
`batch_size` (lm_eval's --batch_size) requests per forward, left-padded; `max_length` the context cut
(default: the model's positions, at most 2048); `score` how continuations are scored: `decode`
(default) feeds the context as a prefill and then the continuation one token at a time, as
generation would — the decode-time policies (shadow per token, dejavu, thresholds) sparsify only
decode steps, so a one-pass score would measure them dense; `prefill` scores everything in one pass
(faster; exact for dense, static and per-sequence policies).

Scoring follows lm-eval's conventions: a continuation is scored on the tokens the whole string has
after the context's tokens (so a leading space belongs to the continuation); an empty context is
the tokenizer's BOS (or EOS); rolling log-likelihoods use lm-eval's own disjoint windows;
generate_until is greedy unless the task asks for sampling, and stops at the task's `until` strings.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the harness is an optional extra
    raise ImportError("shadowllm.harness needs lm-evaluation-harness: pip install 'shadowllm[lm-eval]' "
                      "(lm-eval==0.4.13)") from e

from shadowllm.models import ShadowError


@register_model("shadowllm")
class ShadowLLMHarness(LM):
    def __init__(self, path: str = "smollm2-135m", sparsity: float | str = 0.0, backend: str = "ort",
                 batch_size: int | str = 1, max_length: int | str | None = None, score: str = "decode", **_ignored):
        super().__init__()
        from .api import is_export_folder

        if score not in ("decode", "prefill"):
            raise ShadowError(f"score={score!r}: expected decode or prefill")
        self.score = score
        self.sparsity = float(sparsity)
        if is_export_folder(path):
            from .api import load

            deployed = load(path, backend, self.sparsity)
            self.backend, self.tokenizer = deployed.backend, deployed.tokenizer
        elif backend == "torch":
            from shadowllm.models import load
            from shadowllm.runtime import TorchBackend

            model, self.tokenizer = load(path)
            self.backend = TorchBackend(model)
        else:
            raise ShadowError(f"path={path}: not an export folder (give backend=torch to evaluate a model itself)")
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length) if max_length else min(self.backend.max_positions, 2048)
        tok = self.tokenizer
        self.prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.prefix

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them: the whole string's tokens after the
        context's, trailing spaces of the context moved to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        head = self._encode(context)
        prefix = [self.prefix] if self.prefix is not None else []
        return prefix + whole[:len(head)], whole[len(head):]

    def _batch(self, rows: list[list[int]]):
        """Left-padded ids and attention mask: every row's last positions line up."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids, mask

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = []
            for ctx, cont in pairs[start:start + self.batch_size]:
                ids = (ctx + cont)[-(self.max_length + 1):]
                n = min(len(cont), len(ids) - 1)
                chunk.append((ids[:-n], ids[-n:]))
            steps = self._decode_logprobs(chunk) if self.score == "decode" else self._prefill_logprobs(chunk)
            for (_, cont), logp in zip(chunk, steps):  # logp [n, V]: the distribution each token was drawn from
                target = torch.tensor(cont)
                out.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def _prefill_logprobs(self, chunk):
        ids, mask = self._batch([ctx + cont[:-1] for ctx, cont in chunk])
        logits, _ = self.backend.forward(ids, mask, None)
        logp = F.log_softmax(torch.as_tensor(logits).float(), -1)
        return [logp[i, ids.shape[1] - len(cont):] for i, (_, cont) in enumerate(chunk)]

    def _decode_logprobs(self, chunk):
        ids, mask = self._batch([ctx for ctx, _ in chunk])
        logits, state = self.backend.forward(ids, mask, None, last_only=True)
        rows = [[F.log_softmax(torch.as_tensor(logits)[i, -1].float(), -1)] for i in range(len(chunk))]
        for t in range(1, max(len(cont) for _, cont in chunk)):
            step = torch.tensor([[cont[t - 1] if t < len(cont) else self.pad_id] for _, cont in chunk])
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=torch.long)], 1)
            logits, state = self.backend.forward(step, mask, state)
            for i, (_, cont) in enumerate(chunk):
                if t < len(cont):
                    rows[i].append(F.log_softmax(torch.as_tensor(logits)[i, -1].float(), -1))
        return [torch.stack(r) for r in rows]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._score([self._pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            (text,) = r.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self.prefix, max_seq_len=self.max_length, context_len=1)]
            out.append(sum(score for score, _ in self._score([(list(c), list(t)) for c, t in windows])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        from shadowllm.runtime import Sampling, generate

        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            max_new = int(kwargs.get("max_gen_toks", 256))
            completion = generate(self.backend, self.tokenizer, [context], max_new, Sampling(temperature),
                                  stop=until)[0]
            out.append(completion.text)
        return out


def main() -> int:
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except ShadowError as e:
        print(f"shadowllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
