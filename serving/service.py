"""Generation for a server: requests that arrive together, validated one by one, run as left-padded
batches, each row's text streamed and finished on its own (serving/triton_model.py puts Triton's
Python backend in front of it; nothing here knows Triton).

A request carries the fields of Triton's generate extension: text_input, max_tokens, temperature,
top_p, seed, stream, sparsity. Requests batch together when they can share one generation loop: the
same sparsity (the graph's runtime input) and the same sampling; a seeded sampled request runs alone,
so its seed gives the same text whatever else arrived with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from shadowllm.models import ShadowError

from shadowllm.runtime.generate import Completion, generate
from shadowllm.runtime.sampling import Sampling

DEFAULT_MAX_TOKENS = 64


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: Sampling = Sampling()
    sparsity: float = 0.0
    stream: bool = False

    def batch_key(self, index: int):
        """Requests with equal keys share a generation loop."""
        alone = not self.sampling.greedy and self.sampling.seed is not None
        return (self.sparsity, self.sampling, index if alone else None)


def parse_request(fields: dict, default_sparsity: float, max_positions: int) -> GenerateRequest:
    """A request from its fields (absent ones take their defaults); one clear line naming the field
    when a value is out of range."""
    prompt = fields.get("text_input")
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8", errors="replace")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ShadowError("text_input: expected a non-empty prompt")
    max_tokens = _number(fields, "max_tokens", DEFAULT_MAX_TOKENS, int)
    if not 1 <= max_tokens < max_positions:
        raise ShadowError(f"max_tokens must lie in [1, {max_positions}), got {max_tokens}")
    temperature = _number(fields, "temperature", 0.0, float)
    top_p = _number(fields, "top_p", 1.0, float)
    seed = fields.get("seed")
    sparsity = _number(fields, "sparsity", default_sparsity, float)
    if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
        raise ShadowError(f"sparsity must lie in [0, 1), got {sparsity}")
    try:
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=None if seed is None else int(seed))
    except ShadowError as e:  # Sampling names the CLI flags; a request names its fields
        raise ShadowError(str(e).replace("--top-p", "top_p").replace("--temperature", "temperature")) from None
    return GenerateRequest(prompt, max_tokens, sampling, sparsity, bool(fields.get("stream", False)))


def _number(fields: dict, name: str, default, kind):
    value = fields.get(name)
    if value is None:
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ShadowError(f"{name}: expected a number, got {value!r}") from None
    if kind is float and not math.isfinite(number):
        raise ShadowError(f"{name}: expected a finite number, got {value!r}")
    return number


class GenerationService:
    """One loaded export (or TensorRT engine) serving batches of requests."""

    def __init__(self, folder: str | Path, runtime: str = "ort", threads: int | None = None, backend=None):
        """backend: one already made (Triton's step model, serving/triton_model.py), else runtime's."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if backend is not None:
            self.backend = backend
        elif runtime == "tensorrt":
            from shadowllm.runtime.trt_backend import TrtBackend

            self.backend = TrtBackend(folder)
        elif runtime == "ort":
            from shadowllm.runtime.ort_backend import OrtBackend

            self.backend = OrtBackend(folder, threads=threads)
        else:
            raise ShadowError(f"runtime {runtime!r}: expected ort or tensorrt")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    @property
    def max_positions(self) -> int:
        return self.backend.max_positions

    def run(self, requests: Sequence[GenerateRequest], on_text: Callable[[int, str], None],
            on_done: Callable[[int, Completion | None, str | None], None]) -> None:
        """Generate every request. on_text(i, delta) streams request i's text; on_done(i, completion,
        error) ends it, once, with its completion or the one line that says why it failed."""
        from shadowllm.export.folder import sparsity_value

        groups: dict = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.batch_key(i), []).append(i)
        finished: set[int] = set()

        def done(i, completion, error):
            finished.add(i)
            on_done(i, completion, error)

        for rows in groups.values():
            first = requests[rows[0]]
            try:
                self.backend.sparsity = sparsity_value(self.backend.manifest, first.sparsity, "sparsity")
                generate(self.backend, self.tokenizer, [requests[i].prompt for i in rows],
                         max_new_tokens=[requests[i].max_tokens for i in rows], sampling=first.sampling,
                         on_text=lambda row, delta: on_text(rows[row], delta),
                         on_done=lambda row, completion: done(rows[row], completion, None))
            except ShadowError as e:  # the batch's rows that have not finished get the reason
                for i in rows:
                    if i not in finished:
                        done(i, None, str(e))
