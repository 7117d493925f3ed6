"""The generation loop shared by every backend: batching with left padding, prefill, decode with the
backend's KV cache, sampling, EOS and stop strings, streaming."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from shadowllm.models import ShadowError

from .backend import Backend
from .sampling import Sampler, Sampling


@dataclass
class Completion:
    prompt: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "stop" | "length"


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as one user turn of the tokenizer's chat template, ready for `encode_batch`. Templates
    that write BOS themselves (Llama-2, Mistral, TinyLlama-chat) would get a second one when the text
    is tokenised with special tokens, so the template's leading BOS is left to the tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ShadowError("--chat: this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def encode_batch(tokenizer, prompts: Sequence[str], pad_id: int):
    """Tokenise prompts and left-pad them: (input_ids [B, S], attention_mask [B, S])."""
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    for p, r in zip(prompts, rows):
        if not r:
            raise ShadowError(f"prompt {p!r} is empty after tokenisation")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


class _Stream:
    """Turns one row's growing token list into text deltas that are final: it holds back a tail
    that could still become a stop string or an incomplete UTF-8 character."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = 0

    def text(self, ids) -> tuple[str, bool]:
        """Full decoded text (cut at the first stop string) and whether a stop string was hit."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def delta(self, text: str, final: bool) -> str:
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        out, self.sent = text[self.sent:end], max(self.sent, end)
        return out


def generate(backend: Backend, tokenizer, prompts: str | Sequence[str], max_new_tokens: int | Sequence[int] = 64,
             sampling: Sampling = Sampling(), stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None,
             on_text: Callable[[int, str], None] | None = None,
             on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
    """Generate a completion for each prompt. `on_text(row, delta)` streams text as it is final;
    `on_done(row, completion)` is called once per row as soon as that row has finished (a server
    answers it while longer rows of the batch go on). max_new_tokens: one limit, or one per prompt."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise ShadowError("no prompt given")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ShadowError(f"{len(limits)} token limits for {len(prompts)} prompts")
    for limit in limits:
        if limit < 1:
            raise ShadowError(f"--max-new-tokens must be >= 1, got {limit}")
    max_new_tokens = max(limits)
    if eos_ids is None:
        eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(eos_ids) or [0])[0]
    input_ids, attention_mask = encode_batch(tokenizer, prompts, pad_id)
    if input_ids.shape[1] + max_new_tokens > backend.max_positions:
        raise ShadowError(f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds the "
                          f"model's {backend.max_positions} positions")
    if int(input_ids.max()) >= backend.vocab_size:
        raise ShadowError(f"tokenizer produced id {int(input_ids.max())} outside the model's vocabulary "
                          f"({backend.vocab_size}): tokenizer and model do not match")

    sampler = Sampler(sampling)
    eos_ids = set(eos_ids)
    B = len(prompts)
    out = [Completion(prompt=p) for p in prompts]
    streams = [_Stream(tokenizer, stop) for _ in prompts]
    done = torch.zeros(B, dtype=torch.bool)

    logits, state = backend.forward(input_ids, attention_mask, None, last_only=True)  # sampling reads the last
    for step in range(max_new_tokens):
        next_ids = sampler(logits[:, -1])
        next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
        for i in range(B):
            if done[i]:
                continue
            tok = int(next_ids[i])
            if tok in eos_ids:
                out[i].finish_reason, done[i] = "eos", True
            else:
                out[i].token_ids.append(tok)
            text, hit = streams[i].text(out[i].token_ids)
            if hit:
                out[i].finish_reason, done[i] = "stop", True
            elif not done[i] and len(out[i].token_ids) >= limits[i]:
                done[i] = True  # finish_reason stays "length"
            out[i].text = text
            delta = streams[i].delta(text, final=bool(done[i]))
            if on_text and delta:
                on_text(i, delta)
            if done[i] and on_done:
                on_done(i, out[i])
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
        logits, state = backend.forward(next_ids[:, None], attention_mask, state)
    return out
