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

import ast
import json
import re
import shutil
import sys
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

from trainer.evaluation import sandbox

# After the answer's code, in its process: call solve on each test input and print what it
# returned (repr) or raised, as one JSON line. The expected outputs never enter the sandbox: the
# parent compares (an answer cannot print a verdict, or read the answers, to pass).
PY_HARNESS = r"""
def _qsft_run(inputs):
    import ast, json
    out = []
    for text in inputs:
        try:
            out.append({"ok": repr(solve(*ast.literal_eval(text)))})
        except Exception as e:
            out.append({"error": (type(e).__name__ + ": " + str(e))[:200]})
    print("QSFT_RESULT " + json.dumps(out), flush=True)
"""
# q, phase 1 (the answer's process): each test's solve[input], protected, serialised with -8!
# (or the error's name); phase 2 (a separate process with no answer code): the serialised
# results against the expected q values, compared with ~ (match: type and value).
Q_PHASE1 = """{code}
qsftT:({tests});
{{-1 "QSFT_TEST ",$[first x;"1",raze string last x;"0",last x]}} each
  {{@[{{(1b;-8!value x)}};x;{{(0b;x)}}]}} each qsftT;
-1 "QSFT_END";
exit 0
"""
Q_PHASE2 = """qsftG:({got});
qsftW:({want});
-1 "QSFT_CHECK ",raze string {{(-9!x)~y}}'[qsftG;qsftW];
exit 0
"""
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
    """A q string literal for text (a one-character string needs enlist in q)."""
    body = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return f"enlist {body}" if len(text) == 1 else body


def q_list(items: list[str]) -> str:
    """A q general list of the given q expressions (one item needs enlist)."""
    return f"enlist {items[0]}" if len(items) == 1 else ";".join(items)


def python_program(code: str, tests: list[dict[str, str]]) -> str:
    inputs = [t["input"] for t in tests]
    return f"{code}\n\n{PY_HARNESS}\n_qsft_run({inputs!r})\n"


def q_phase1(code: str, tests: list[dict[str, str]]) -> str:
    return Q_PHASE1.format(
        code=code, tests=q_list([q_string(f"solve[{t['q_input']}]") for t in tests])
    )


def q_phase2(got_hex: list[str], tests: list[dict[str, str]]) -> str:
    got = q_list([f'"X"$2 cut "{h}"' for h in got_hex])
    want = q_list([f"({t['q_output']})" for t in tests])
    return Q_PHASE2.format(got=got, want=want)


def _last(stdout: str, marker: str) -> list[str]:
    """Lines with the marker, after the last one the harness wrote before them."""
    return [x[len(marker) :] for x in stdout.splitlines() if x.startswith(marker)]


def _failed(res: sandbox.Result) -> Verdict:
    last = (res.stderr.strip().splitlines() or [res.status])[-1][:200]
    return Verdict(False, "executed", res.status if res.status != "error" else last)


def python_verdict(res: sandbox.Result, tests: list[dict[str, str]]) -> Verdict:
    from trainer.assets.validate import same_value

    lines = _last(res.stdout, "QSFT_RESULT ")
    if res.status != "ok":
        return _failed(res)
    try:
        results = json.loads(lines[-1])
        assert isinstance(results, list) and len(results) == len(tests)
    except (IndexError, ValueError, AssertionError):
        return Verdict(False, "executed", "no test result (the answer did not run to the end)")
    failed, first_error = [], ""
    for i, (r, t) in enumerate(zip(results, tests, strict=True)):
        try:
            ok = same_value(ast.literal_eval(r["ok"]), ast.literal_eval(t["output"]))
        except Exception:  # noqa: BLE001 - an error result, or a repr that is not a literal
            ok = False
            first_error = first_error or str(r.get("error", "not a Python literal"))[:200]
        if not ok:
            failed.append(i)
    if not failed:
        return Verdict(True, "executed", "")
    return Verdict(
        False, "executed", f"failed tests {failed}" + (f": {first_error}" if first_error else "")
    )


class Scorer:
    """Runs answers; built once per eval (it probes the machine's isolation once, and checks
    that a reference solution passes and a wrong one fails through the same path)."""

    def __init__(self, limits: sandbox.Limits, q_binary: str | None = None):
        self.limits = limits
        self.isolation = sandbox.isolation()
        found = None if q_binary == "none" else shutil.which(q_binary or "q")
        if q_binary not in (None, "none") and not (found and Path(found).is_file()):
            raise ValueError(f"--q_binary {q_binary}: not an executable file")
        self.q_binary = str(Path(found).resolve()) if found else None
        self.q_env = _q_env(self.q_binary) if self.q_binary else {}
        self._lint_cache: dict[str, list[str]] = {}

    def self_check(self, problem: dict[str, Any]) -> None:
        """The problem's reference solutions pass and a wrong answer fails, or ValueError: a
        broken interpreter, licence or sandbox must stop the eval, not score every answer 0."""
        checks = [("q2py", f"```python\n{problem['python']}\n```")]
        if self.q_binary:
            checks.append(("desc2q", f"```q\n{problem['q']}\n```"))
        for task, reference in checks:
            v = self.score(task, reference, problem)
            if not v.passed:
                what = "q interpreter" if task != "q2py" else "Python sandbox"
                raise ValueError(
                    f"the {what} fails the reference solution of {problem['id']}: {v.detail}"
                )
            wrong = "```python\nsolve = None\n```" if task == "q2py" else "```q\nsolve:{x}\n```"
            if self.score(task, wrong, problem).passed:
                raise ValueError(f"a wrong answer to {problem['id']} passes: scoring is broken")

    def score(self, task: str, completion: str, problem: dict[str, Any]) -> Verdict:
        code = extract_code(completion, LANG[task])
        if not code:
            how = "executed" if task == "q2py" or self.q_binary else "linted"
            return Verdict(False, how, "empty answer")
        tests = problem["tests"]
        if task == "q2py":
            res = self._run(
                [sys.executable, "-I", "-S", "guard.py", "answer.py"],
                {"guard.py": sandbox.PY_GUARD, "answer.py": python_program(code, tests)},
            )
            return python_verdict(res, tests)
        if self.q_binary:
            return self._q(code, tests)
        return self.lint(code)

    def _run(self, argv: list[str], files: dict[str, str], env=None) -> sandbox.Result:
        return sandbox.run(argv, files, self.limits, env=env, isolated=self.isolation)

    def _q(self, code: str, tests: list[dict[str, str]]) -> Verdict:
        argv = [self.q_binary, "run.q", "-q"]
        res = self._run(argv, {"run.q": q_phase1(code, tests)}, self.q_env)
        if res.status != "ok":
            return _failed(res)
        lines = res.stdout.splitlines()
        if "QSFT_END" not in lines:
            return Verdict(False, "executed", "no test result (the answer did not run to the end)")
        end = len(lines) - 1 - lines[::-1].index("QSFT_END")
        got = [x[len("QSFT_TEST ") :] for x in lines[:end] if x.startswith("QSFT_TEST ")]
        got = got[-len(tests) :]
        if len(got) != len(tests):
            return Verdict(False, "executed", "no test result (the answer did not run to the end)")
        errors = {i: g[1:] for i, g in enumerate(got) if not g.startswith("1")}
        ok_hex = [g[1:] for g in got if g.startswith("1")]
        checked: list[bool] = []
        if ok_hex:  # the expected values, in a process with no answer code in it
            ok_tests = [t for i, t in enumerate(tests) if i not in errors]
            res2 = self._run(argv, {"run.q": q_phase2(ok_hex, ok_tests)}, self.q_env)
            marks = _last(res2.stdout, "QSFT_CHECK ")
            if res2.status != "ok" or not marks or len(marks[-1]) != len(ok_tests):
                return Verdict(False, "executed", "the results could not be compared")
            checked = [c == "1" for c in marks[-1]]
        passed, it = [], iter(checked)
        for i in range(len(tests)):
            passed.append(False if i in errors else next(it))
        failed = [i for i, p in enumerate(passed) if not p]
        if not failed:
            return Verdict(True, "executed", "")
        first = next(iter(errors.values()), "")
        return Verdict(
            False, "executed", f"failed tests {failed}" + (f": '{first}" if first else "")
        )

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


def _q_env(q_binary: str) -> dict[str, str]:
    """What a licensed q needs from the environment, nothing else; QHOME defaults to the
    install's root (q/l64/q -> q/), as q itself would find it from HOME, which the sandbox
    does not pass."""
    import os

    env = {k: os.environ[k] for k in ("QHOME", "QLIC") if k in os.environ}
    env.setdefault("QHOME", str(Path(q_binary).parent.parent))
    return env


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


TEST_KEYS = ("input", "output", "q_input", "q_output")


def load_problems(path: Path) -> dict[str, dict[str, Any]]:
    """The problem table (trainer/assets/q_problems.jsonl's schema), by id: each problem needs
    an id and at least one test with Python and q inputs and outputs (a problem without tests
    would pass every answer)."""
    problems = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        tests = p.get("tests") if isinstance(p, dict) else None
        if not isinstance(p, dict) or not isinstance(p.get("id"), str):
            raise ValueError(f"{path}:{n}: a problem needs a string id")
        if not tests or not all(
            isinstance(t, dict) and all(isinstance(t.get(k), str) for k in TEST_KEYS) for t in tests
        ):
            raise ValueError(
                f"{path}:{n}: problem {p['id']} needs tests with {', '.join(TEST_KEYS)}"
            )
        problems[p["id"]] = p
    return problems
