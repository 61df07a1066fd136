"""Scoring generated answers against the problems' tests, and pass@k.

Per task kind (the SFT records' `task`):

- q2py (q -> Python): the Python answer runs in the sandbox against the problem's Python tests
  (`solve(*input) == output`, floats to 1e-9 relative, as trainer/assets/validate.py checks the
  reference solutions).
- desc2q, py2q (-> q): with a q interpreter (`--q_binary`, or `q` on PATH) the q answer runs
  against the q tests (`solve[q_input]~q_output`, each test protected so one error fails only
  itself); without one, the answer is linted with qls: a weaker "parses" verdict, counted apart
  from the executed ones and never mixed into pass@k.

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models
Trained on Code"): per prompt with n samples of which c pass, 1 - C(n-c, k) / C(n, k), averaged
over prompts.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

from trainer.evaluation import sandbox

# Tests run inside the answer's process: the answer's code first, then this. It prints one
# line the harness reads: "QSFT_RESULT " + one digit per test (1 = passed).
PY_TESTS = r"""
import ast as _ast, math as _math
def _same(got, want):
    if isinstance(want, float) or isinstance(got, float):
        return (isinstance(got, (int, float)) and isinstance(want, (int, float))
                and not isinstance(got, bool)
                and _math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12))
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return list(got) == list(want) and all(_same(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want
_bits, _err = [], ""
for _inp, _out in _TESTS:
    try:
        _got = solve(*_ast.literal_eval(_inp))
        _bits.append("1" if _same(_got, _ast.literal_eval(_out)) else "0")
    except Exception as _e:
        _bits.append("0")
        _err = _err or (type(_e).__name__ + ": " + str(_e)).replace("\\n", " ")[:200]
if _err:
    print("QSFT_ERROR " + _err)
print("QSFT_RESULT " + "".join(_bits))
"""
RESULT = re.compile(r"^QSFT_RESULT ([01]*)$", re.M)
ERROR = re.compile(r"^QSFT_ERROR (.*)$", re.M)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)
LANG = {"q2py": "python", "desc2q": "q", "py2q": "q"}


@dataclass
class Verdict:
    passed: bool
    how: str  # "executed" or "linted"
    detail: str  # why it failed (first error line, "timeout", ...), "" when it passed


def extract_code(completion: str, lang: str) -> str:
    """The answer's code: the first fenced block in its language (or unlabelled), else the whole
    completion (a model that dropped the fences may still have written code)."""
    blocks = _FENCE.findall(completion)
    for label, code in blocks:
        if label.lower() in ({"python", "py"} if lang == "python" else {"q", "k"}):
            return code.strip("\n")
    for label, code in blocks:
        if not label:
            return code.strip("\n")
    return completion.strip()


def q_string(text: str) -> str:
    """A q string literal for text."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def python_program(code: str, tests: list[dict[str, str]]) -> str:
    pairs = [(t["input"], t["output"]) for t in tests]
    return f"{code}\n\n_TESTS = {pairs!r}\n{PY_TESTS}"


def q_program(code: str, tests: list[dict[str, str]]) -> str:
    """The answer, then each test as a protected evaluation, then the result line and exit."""
    checks = ";".join(
        f"@[value;{q_string('solve[' + t['q_input'] + ']~' + t['q_output'])};0b]" for t in tests
    )
    return f'{code}\nqsftR:({checks});\n-1 "QSFT_RESULT ",raze string qsftR;\nexit 0\n'


def _verdict(res: sandbox.Result, n_tests: int) -> Verdict:
    m = RESULT.search(res.stdout)
    if res.status != "ok" and not (m and len(m.group(1)) == n_tests):
        last = (res.stderr.strip().splitlines() or [res.status])[-1][:200]
        return Verdict(False, "executed", res.status if res.status != "error" else last)
    if not m or len(m.group(1)) != n_tests:
        return Verdict(False, "executed", "no test result (the answer did not run to the end)")
    failed = [i for i, b in enumerate(m.group(1)) if b != "1"]
    if not failed:
        return Verdict(True, "executed", "")
    err = ERROR.search(res.stdout)
    return Verdict(
        False, "executed", f"failed tests {failed}" + (f": {err.group(1)}" if err else "")
    )


class Scorer:
    """Runs answers; built once per eval (it probes the machine's isolation once)."""

    def __init__(self, limits: sandbox.Limits, q_binary: str | None = None):
        self.limits = limits
        self.isolation = sandbox.isolation()
        self.q_binary = None if q_binary == "none" else q_binary or shutil.which("q")
        if self.q_binary:
            self.q_binary = str(Path(self.q_binary).resolve())
        self._lint_cache: dict[str, list[str]] = {}

    def score(self, task: str, completion: str, problem: dict[str, Any]) -> Verdict:
        code = extract_code(completion, LANG[task])
        if not code:
            return Verdict(
                False, "executed" if task == "q2py" or self.q_binary else "linted", "empty answer"
            )
        if task == "q2py":
            res = sandbox.run(
                [sys.executable, "-I", "-S", "guard.py", "answer.py"],
                {"guard.py": sandbox.PY_GUARD, "answer.py": python_program(code, problem["tests"])},
                self.limits,
                isolated=self.isolation,
            )
            return _verdict(res, len(problem["tests"]))
        if self.q_binary:
            env = {k: v for k, v in _q_env().items()}
            res = sandbox.run(
                [self.q_binary, "answer.q", "-q"],
                {"answer.q": q_program(code, problem["tests"])},
                self.limits,
                env=env,
                isolated=self.isolation,
            )
            return _verdict(res, len(problem["tests"]))
        return self.lint(code)

    def lint(self, code: str) -> Verdict:
        problems = self.lint_many({"a": code})["a"]
        return Verdict(not problems, "linted", "; ".join(problems[:3]))

    def lint_many(self, snippets: dict[str, str]) -> dict[str, list[str]]:
        """qls over many answers in one server session; the real problems of each."""
        from trainer.datatools.qlint import lint, real_problems

        todo = {k: v for k, v in snippets.items() if v not in self._lint_cache}
        if todo:
            found = lint(todo, timeout_s=300)
            for k, code in todo.items():
                self._lint_cache[code] = [str(d) for d in real_problems(code, found[k])]
        return {k: self._lint_cache[v] for k, v in snippets.items()}


def _q_env() -> dict[str, str]:
    """What a licensed q needs from the environment, nothing else."""
    import os

    return {k: os.environ[k] for k in ("QHOME", "QLIC") if k in os.environ}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt: n samples, c of them correct (needs n >= k)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(samples: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    """pass@k per task kind and overall over the executed prompts; the linted ones apart."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_prompt.setdefault(s["id"], []).append(s)
    out: dict[str, Any] = {"pass_at_k": {}, "parses": {}, "prompts": {}}
    groups: dict[str, dict[str, list[tuple[int, int]]]] = {"executed": {}, "linted": {}}
    for rows in by_prompt.values():
        how, task = rows[0]["how"], rows[0]["task"]
        counts = (len(rows), sum(r["passed"] for r in rows))
        for key in (task, "overall"):
            groups[how].setdefault(key, []).append(counts)
    for key, counts in groups["executed"].items():
        out["pass_at_k"][key] = {
            f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in ks
            if all(n >= k for n, _ in counts)
        }
        out["prompts"][key] = len(counts)
    for key, counts in groups["linted"].items():
        out["parses"][key] = sum(c for _, c in counts) / max(1, sum(n for n, _ in counts))
        out["prompts"].setdefault(f"{key} (linted)", len(counts))
    out["samples"] = {
        "executed": sum(s["how"] == "executed" for s in samples),
        "linted": sum(s["how"] == "linted" for s in samples),
    }
    return out


def load_problems(path: Path) -> dict[str, dict[str, Any]]:
    """The problem table (trainer/assets/q_problems.jsonl's schema), by id."""
    problems = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                p = json.loads(line)
                problems[p["id"]] = p
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a problem record ({e})") from None
    return problems
