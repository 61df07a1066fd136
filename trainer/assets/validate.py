"""Checks for the team-written problem set (q_problems.jsonl), shared by the tests and authors.

    python -m trainer.assets.validate [EXTRA.jsonl ...]

checks the shipped problems plus any extra problem files (a draft being written) together:
schema, Python solutions against their test cases, q syntax lint (trainer.datatools.qlint),
unique ids and near-duplicate descriptions or solutions. Prints one line per problem found
wrong; exit 1.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from trainer.assets.build import PROBLEMS, load_problems
from trainer.datatools.near_dup import near_duplicate_pairs
from trainer.datatools.qlint import lint, real_problems

DIFFICULTIES = ("easy", "medium", "hard")
TOPICS = (
    "lists",
    "iterators",
    "dictionaries",
    "strings",
    "temporal",
    "tables",
    "qsql",
    "joins",
    "functional",
    "math",
    "sorting",
    "control",
)
REQUIRED = {
    "id": str,
    "title": str,
    "difficulty": str,
    "topics": list,
    "description": str,
    "q": str,
    "python": str,
    "tests": list,
}
TEST_KEYS = ("input", "output", "q_input", "q_output")


def schema_errors(p: dict[str, Any]) -> list[str]:
    errors = [
        f"{k}: missing or not {t.__name__}"
        for k, t in REQUIRED.items()
        if not isinstance(p.get(k), t)
    ]
    if errors:
        return errors
    if not re.fullmatch(r"p\d{3}", p["id"]):
        errors.append(f"id {p['id']!r} is not pNNN")
    if p["difficulty"] not in DIFFICULTIES:
        errors.append(f"difficulty {p['difficulty']!r} not in {DIFFICULTIES}")
    if not p["topics"] or set(p["topics"]) - set(TOPICS):
        errors.append(f"topics {p['topics']} must be a non-empty subset of {TOPICS}")
    for key in ("title", "description", "q", "python"):
        if not p[key].strip():
            errors.append(f"{key} is empty")
    if not p["q"].lstrip().startswith("solve:"):
        errors.append("q must define solve")
    if "```" in p["q"] + p["python"] + p["description"]:
        errors.append("no code fences inside fields (the renderer adds them)")
    if len(p["tests"]) < 2:
        errors.append("needs 2+ tests")
    for i, t in enumerate(p["tests"]):
        if (
            not isinstance(t, dict)
            or sorted(t) != sorted(TEST_KEYS)
            or not all(isinstance(t[k], str) and t[k].strip() for k in TEST_KEYS)
        ):
            errors.append(f"test {i}: needs non-empty strings {TEST_KEYS}")
    return errors


def same_value(got: Any, want: Any) -> bool:
    """Equality that tolerates float rounding (1e-9 relative) but not type confusion."""
    if isinstance(want, float) or isinstance(got, float):
        return (
            isinstance(got, (int, float))
            and isinstance(want, (int, float))
            and not isinstance(got, bool)
            and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
        )
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        pairs = zip(got, want, strict=False)
        return len(got) == len(want) and all(same_value(g, w) for g, w in pairs)
    if isinstance(want, dict) and isinstance(got, dict):
        return list(got) == list(want) and all(same_value(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def python_failures(p: dict[str, Any]) -> list[str]:
    """Run the Python solution on every test input; a message per failing test."""
    scope: dict[str, Any] = {}
    try:
        exec(compile(p["python"], f"<{p['id']} python>", "exec"), scope)  # team-written code
    except Exception as e:
        return [f"python does not load: {type(e).__name__}: {e}"]
    if not callable(scope.get("solve")):
        return ["python defines no solve()"]
    failures = []
    for i, t in enumerate(p["tests"]):
        try:
            args, want = ast.literal_eval(t["input"]), ast.literal_eval(t["output"])
        except (ValueError, SyntaxError) as e:
            failures.append(f"test {i}: input/output not a Python literal ({e})")
            continue
        if not isinstance(args, list):
            failures.append(f"test {i}: input must be a list of arguments")
            continue
        try:
            got = scope["solve"](*args)
        except Exception as e:
            failures.append(f"test {i}: raised {type(e).__name__}: {e}")
            continue
        if not same_value(got, want):
            failures.append(f"test {i}: got {got!r}, expected {want!r}")
    return failures


def lint_errors(problems: list[dict[str, Any]]) -> dict[str, list[str]]:
    """q lint findings per problem id, minus qls's known false positives (see _forgiven)."""
    snippets = {p["id"]: p["q"] for p in problems}
    snippets.update(
        {
            f"{p['id']}/test{i}/{k}": t[k]
            for p in problems
            for i, t in enumerate(p["tests"])
            for k in ("q_input", "q_output")
        }
    )
    found = lint(snippets)
    out: dict[str, list[str]] = {}
    for name, diags in found.items():
        kept = real_problems(snippets[name], diags)
        if kept:
            out.setdefault(name.split("/")[0], []).extend(
                f"{name.partition('/')[2] or 'q'} {d}" for d in kept
            )
    return out


def check(problems: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Every finding, by problem id (empty when the set is clean)."""
    report: dict[str, list[str]] = {}
    ids = [p.get("id") for p in problems]
    for p in problems:
        errors = schema_errors(p)
        if not errors:
            errors = python_failures(p)
        if ids.count(p.get("id")) > 1:
            errors.append("duplicate id")
        if errors:
            report[str(p.get("id"))] = errors
    clean = [p for p in problems if not schema_errors(p)]
    for pid, errors in lint_errors(clean).items():
        report.setdefault(pid, []).extend(errors)
    for field in ("description", "q", "python"):
        texts = {p["id"]: p[field] for p in clean}
        for a, b, score in near_duplicate_pairs(texts, texts):
            if a < b:
                report.setdefault(b, []).append(f"{field} near-duplicate of {a} ({score:.2f})")
    return report


def main(argv: list[str] | None = None) -> int:
    extra = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    problems = load_problems(PROBLEMS)
    for path in extra:
        problems += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    report = check(problems)
    for pid, errors in sorted(report.items()):
        for e in errors:
            print(f"{pid}: {e}")
    print(f"{len(problems)} problems checked, {len(report)} with findings")
    return 1 if report else 0


if __name__ == "__main__":
    sys.exit(main())
