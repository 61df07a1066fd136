"""Q problems -> prompt/completion records, one per task kind.

A problem is a description, a q solution, a Python solution and test cases. It renders into one
record per task kind (description->q, Python->q, q->Python), each once as is and once with the
test cases in the prompt, split by problem. The shipped sample set (trainer/assets/build.py) and
the original Q SFT data (trainer.datatools.convert) go through this one renderer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TASKS = {
    "desc2q": (
        "Write a q function `solve` for the following problem.\n\n{description}",
        "```q\n{q}\n```",
        "q",
    ),
    "py2q": (
        "Translate this Python function into an equivalent q function `solve`.\n\n"
        "```python\n{python}\n```",
        "```q\n{q}\n```",
        "q",
    ),
    "q2py": (
        "Translate this q function into an equivalent Python function `solve`.\n\n```q\n{q}\n```",
        "```python\n{python}\n```",
        "python",
    ),
}


# Appended to the prompt of the with-tests variant: the tests the answer's language must pass.
TESTS_SUFFIX = "\n\nYour `solve` must pass these tests:\n\n```{lang}\n{tests}\n```"


# Every prompt ends with a newline. In the raw format the completion follows the prompt directly,
# and a prompt ending in a code fence would otherwise run into the answer's fence ("``````q"),
# which BPE tokenizes across the boundary: the model would be trained on a prompt ending that
# inference never produces (see trainer.data.encode_raw).
PROMPT_END = "\n"


@dataclass(frozen=True)
class Test:
    python: str  # a Python snippet that checks solve (assert, or print + expected output)
    q: str  # the same check in q


@dataclass(frozen=True)
class Problem:
    id: str
    description: str
    q: str
    python: str
    tests: tuple[Test, ...] = ()
    difficulty: str | None = None


def render_records(problems: list[Problem], with_tests: bool = True) -> list[dict[str, Any]]:
    """Records for each problem and task kind; with_tests adds the variant with tests."""
    records = []
    for p in problems:
        fields = {
            "description": p.description.strip(),
            "q": p.q.strip(),
            "python": p.python.strip(),
        }
        variants = [False] + ([True] if with_tests and p.tests else [])
        for tests in variants:
            for task, (prompt, completion, lang) in TASKS.items():
                text = prompt.format(**fields)
                if tests:
                    text += TESTS_SUFFIX.format(
                        lang=lang, tests="\n".join(getattr(t, lang).strip() for t in p.tests)
                    )
                rec = {
                    "id": f"{p.id}-{task}" + ("-tests" if tests else ""),
                    "problem_id": p.id,
                    "task": task,
                    "with_tests": tests,
                }
                if p.difficulty:
                    rec["difficulty"] = p.difficulty
                rec.update(prompt=text + PROMPT_END, completion=completion.format(**fields))
                records.append(rec)
    return records
