"""The stages import one way: models <- predictor <- export <- compiler <- runtime <- (parity, bench,
serving) <- shadowllm (the front door). Every module is parsed with `ast`, imports inside function
bodies included (they are how a cycle hides), and each import of a shadowllm stage is held to that
order; research/ and scripts/ sit outside the package and may use public names only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# stage -> rank; a stage may import its own modules and stages of a lower rank, nothing else (stages
# of one rank are siblings: parity, bench and serving do not import each other).
RANKS = {"models": 0, "predictor": 1, "export": 2, "compiler": 3, "runtime": 4,
         "parity": 5, "bench": 5, "serving": 5, "shadowllm": 6}
ORDER = "models <- predictor <- export <- compiler <- runtime <- (parity, bench, serving) <- shadowllm"


def imported_stages(path: Path, stage: str):
    """(line, stage imported, what the import names) for every shadowllm import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:  # `from .x import y`: the module's own stage
                names = [f"shadowllm.{stage}"]
            elif node.level > 1:  # `from .. import y`: the package above the stage, the front door
                names = ["shadowllm"]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "shadowllm":
                continue
            target = parts[1] if len(parts) > 1 and parts[1] in RANKS else "shadowllm"
            yield node.lineno, target, name


def order_violations(root: Path = ROOT) -> list[str]:
    out = []
    for stage in RANKS:
        for path in sorted((root / stage).rglob("*.py")):
            for line, target, name in imported_stages(path, stage):
                if target == stage or RANKS[target] < RANKS[stage]:
                    continue
                why = "a sibling" if RANKS[target] == RANKS[stage] else "a later stage"
                out.append(f"{path.relative_to(root)}:{line}: {stage}/ imports {name} ({target}/ is {why}; "
                           f"imports point one way: {ORDER})")
    return out


def private_uses(root: Path = ROOT) -> list[str]:
    """Names starting with `_` that research/ and scripts/ take from shadowllm: imported by name, or
    read as an attribute of an imported shadowllm module."""
    out = []
    for folder in ("research", "scripts"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            modules = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shadowllm"):
                    for a in node.names:
                        if a.name.startswith("_"):
                            out.append(f"{path.relative_to(root)}:{node.lineno}: imports {node.module}.{a.name}")
                        else:
                            modules.add(a.asname or a.name)
                elif isinstance(node, ast.Import):
                    modules.update(a.asname or a.name for a in node.names if a.name.startswith("shadowllm"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                        and isinstance(node.value, ast.Name) and node.value.id in modules:
                    out.append(f"{path.relative_to(root)}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return out


def test_stages_import_one_way():
    assert (ROOT / "compiler" / "build.py").is_file()  # the walk below found the stages, not an empty tree
    violations = order_violations()
    assert not violations, "\n".join(violations)


def test_research_and_scripts_use_public_names_only():
    uses = private_uses()
    assert not uses, "\n".join(uses)


@pytest.mark.parametrize("planted, expected", [
    ("compiler/planted.py", "compiler/planted.py:2: compiler/ imports shadowllm.runtime.ort_backend (runtime/ is a later stage"),
    ("bench/planted.py", "bench/planted.py:2: bench/ imports shadowllm.parity.check (parity/ is a sibling"),
])
def test_a_planted_reverse_import_is_named(tmp_path, planted, expected):
    """The check itself can fail: a copy of the stages with one import planted against the order,
    inside a function body, is reported with its file, line and the rule."""
    for stage in RANKS:
        (tmp_path / stage).mkdir()
    body = {"compiler/planted.py": "from shadowllm.runtime.ort_backend import OrtBackend",
            "bench/planted.py": "from shadowllm.parity.check import check"}[planted]
    (tmp_path / planted).write_text(f"def f():\n    {body}\n")
    assert any(v.startswith(expected) for v in order_violations(tmp_path)), order_violations(tmp_path)
