"""Docs that run: every shell command and Python snippet in README.md and docs/usage.md, collected
from the markdown and executed in order, as a user would paste them, on a tiny random Llama folder in
place of `path/to/your-hf-model` (the embedded model where a snippet names none).

A fenced ```bash or ```python block runs unless the line above it is a marker
`<!-- docs-test: skip REASON -->`; each skipped block is a skipped test item carrying its reason, so
`pytest -rs` lists them and the summary counts them. Shell lines that call `.venv/bin/shadowllm` run
in this process (`shadowllm.cli.main`, no interpreter start-up per line); other lines run in bash.
Every line must exit 0. The blocks of one file share a working folder (later blocks use what earlier
ones wrote) that holds links to the repository's `.venv`, `scripts`, `research` and `docs`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/usage.md"]
MARKER = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->")
PLACEHOLDERS = {"path/to/your-hf-model": "tiny-llama", "my_notes.txt": "my_notes.txt"}


@dataclass
class Block:
    file: str
    line: int
    language: str
    text: str
    skip: str | None  # the reason, for a block that does not run here

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def blocks(file: str) -> list[Block]:
    lines = (ROOT / file).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, language = i, m.group(1)
        i += 1
        body = []
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        marker = MARKER.search(lines[start - 1]) if start else None
        skip = None
        if marker and marker.group(1) == "skip":
            skip = marker.group(2)
            assert skip, f"{file}:{start + 1}: a skip marker must say why"
        if language in ("bash", "python"):
            out.append(Block(file, start + 1, language, "\n".join(body), skip))
    return out


def shell_lines(text: str) -> list[str]:
    """Commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(line)
    return out


def run_shell(block: Block, env: dict, cwd: Path):
    from shadowllm.cli import main

    for line in shell_lines(block.text):
        for part in _statements(line):
            words = shlex.split(part, comments=True)
            if not words:
                continue
            if all(re.match(r"^[A-Za-z_]\w*=", w) for w in words):  # VAR=value assignments (this shell's)
                for w in words:
                    name, value = w.split("=", 1)
                    env[name] = _expand(value, env)
                continue
            argv = [_expand(w, env) for w in words]
            argv = [a for a in argv if a != ""]  # an empty $MODEL stands for no argument, as in bash
            where = f"{block.id}: {part.strip()}"
            if argv[0] == ".venv/bin/shadowllm":
                status = main(argv[1:])
                assert status == 0, f"{where}: exit {status}"
            else:
                run = subprocess.run(["bash", "-c", _expand(part, env)], cwd=cwd, env=env, capture_output=True,
                                     text=True, timeout=600)
                assert run.returncode == 0, f"{where}: exit {run.returncode}\n{run.stderr[-2000:]}"


def _statements(line: str) -> list[str]:
    """`A; B` -> [A, B] (a `;` inside quotes stays)."""
    lexer = shlex.shlex(line, posix=False, punctuation_chars=";")
    lexer.whitespace_split = True
    parts, current = [], []
    for token in lexer:
        if token == ";":
            parts.append(" ".join(current))
            current = []
        else:
            current.append(token)
    parts.append(" ".join(current))
    return parts


def _expand(word: str, env: dict) -> str:
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m.group(1) or m.group(2), ""), word)


def substitute(text: str, cwd: Path) -> str:
    for placeholder, local in PLACEHOLDERS.items():
        text = text.replace(placeholder, str(cwd / local))
    return text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder like a clone's root: links to .venv, scripts, research, docs; the tiny model
    (512 positions, so the default 256-token calibration windows fit) and a text file for --corpus."""
    from shadowllm.models.tiny import save_tiny

    cwd = tmp_path_factory.mktemp("docs")
    for name in (".venv", "scripts", "research", "docs"):
        (cwd / name).symlink_to(ROOT / name)
    # F = 96: whole blocks of 32, so `--weights int4` snippets run on it too
    save_tiny("llama", cwd / "tiny-llama", seed=5, max_position_embeddings=512, intermediate_size=96)
    # ~40 KB of plain text in short paragraphs: this project's own docs, markup stripped
    text = "\n\n".join(re.sub(r"[`*#|<>\[\]]", "", p).strip() for f in ("docs/design.md", "docs/export-format.md")
                       for p in (ROOT / f).read_text().split("\n\n") if p.strip())
    (cwd / "my_notes.txt").write_text(text)
    return cwd


CASES = [(f, None) for f in DOCS] + [(b.file, b) for f in DOCS for b in blocks(f) if b.skip]


@pytest.mark.slow
@pytest.mark.parametrize("file, skipped", CASES,
                         ids=[f if b is None else f"skip-{b.id}" for f, b in CASES])
def test_docs_run(file, skipped, workdir, monkeypatch, capsys):
    if skipped is not None:
        pytest.skip(f"{skipped.id}: {skipped.skip}")
    runnable = [b for b in blocks(file) if b.skip is None]
    assert runnable, f"{file}: no runnable block found"
    cwd = workdir / Path(file).stem
    cwd.mkdir()
    for name in os.listdir(workdir):
        if not (cwd / name).exists() and name not in ("README", "usage"):
            (cwd / name).symlink_to(workdir / name)
    monkeypatch.chdir(cwd)
    env = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}")
    for block in runnable:
        block = Block(block.file, block.line, block.language, substitute(block.text, cwd), None)
        if block.language == "bash":
            run_shell(block, env, cwd)
        else:
            exec(compile(block.text, block.id, "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr()
    with capsys.disabled():
        print(f"\n{file}: {len(runnable)} blocks ran, "
              f"{sum(1 for b in blocks(file) if b.skip)} skipped (reasons: pytest -rs)")
    assert "Traceback" not in out.err


def test_every_block_is_found_and_marked():
    """The collector sees the blocks a reader sees: README's two commands first, and no block in an
    unknown language or with an unknown marker."""
    readme = blocks("README.md")
    assert readme[0].text.splitlines() == ["bash scripts/setup.sh && .venv/bin/shadowllm demo",
                                           "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n auto"]
    for f in DOCS:
        for m in MARKER.finditer((ROOT / f).read_text()):
            assert m.group(1) in ("skip",), f"{f}: unknown docs-test marker {m.group(0)}"


def test_docs_point_nowhere_outside_the_repository():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "docs").rglob("*.json"))]
    outside = re.compile(r"\.\./shared|(?<![\w.])/(?:work|root|home|tmp)/")
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
            if outside.search(line)]
    assert not hits, hits
    links = re.compile(r"\]\(([^)#]+)")
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in links.findall(f.read_text()):
            if "://" not in target:
                assert (f.parent / target).exists(), f"{f.relative_to(ROOT)}: broken link {target}"


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
