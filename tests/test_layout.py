"""The house rules of trainer/ (README "Layout and development"), checked from the source."""

from __future__ import annotations

import ast
from pathlib import Path

TRAINER = Path(__file__).resolve().parent.parent / "trainer"
MAX_LINES = 420  # "at most ~400 lines": a module past this is asking to be split


def _modules() -> dict[str, Path]:
    mods = {}
    for path in TRAINER.rglob("*.py"):
        parts = path.relative_to(TRAINER.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(path: Path, known: set[str]) -> set[str]:
    """trainer modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known and n.startswith("trainer.")}
    return found


def test_every_module_is_small():
    sizes = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert {n: k for n, k in sizes.items() if k > MAX_LINES} == {}


def test_no_import_cycles_and_the_rooms_import_one_way():
    mods = _modules()
    graph = {n: _imports(p, set(mods)) - {n} for n, p in mods.items()}

    def room(name: str) -> str:
        parts = name.split(".")
        return parts[1] if len(parts) > 2 else "trainer"

    # The training process never reaches for the tools run by a person: qsft-data, qsft-eval,
    # the consolidator and the planner (the background consolidation is a child process).
    upward = sorted(
        (a, b)
        for a, deps in graph.items()
        for b in deps
        if room(a) in ("trainer", "checkpoint")
        and room(b) in ("datatools", "evaluation", "offline")
    )
    assert upward == []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            assert state.get(m) != 1, "import cycle: " + " -> ".join(path + [n, m])
            if m not in state:
                visit(m, path + [n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
