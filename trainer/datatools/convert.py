"""`qsft-data convert`: the original Q SFT data set -> records (rendered by
trainer.datatools.problems, as the shipped sample set is).

The original data (Morgan Stanley's Q SFT pipeline, github.com/morganstanley/MSML,
projects/Fullstack_LLM_Finetuning_Q; layout as its build scripts write it) comes as:

- problem directories ``[train|test/]<name>/`` holding ``problem_description.txt``,
  ``python_sol.py``, ``q_sol.q``, optional ``entry.json`` (its ``difficulty`` is kept) and per
  test N ``test_case_N.py`` + ``q_test_case_N.q`` with the
  expected stdout in ``python_exact_ans_test_case_N.txt`` / ``q_exact_ans_test_case_N.txt``
  (``test_case_N_correct_ans.txt`` when those are missing);
- a problem table in parquet (``problem_description``, ``python_solution``, ``q_solution``,
  optional ``test_cases`` list of {python_test_code, q_test_code, python_expected_output,
  q_expected_output}, optional ``problem_name``/``problem_id``);
- prompt/completion parquet splits (``train-00000-of-00001.parquet``, ``test_no_tests-...``).

Everything is read and checked before anything is written; a bad input is one DataError line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from trainer.datatools.problems import Problem, Test, render_records
from trainer.records import DataError, read_parquet_table, validate_record

PROBLEM_FILES = ("problem_description.txt", "python_sol.py", "q_sol.q")
SPLIT_NAMES = ("train", "test")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


# ---------------------------------------------------------------------------------------------
# Reading the original layouts


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None


def read_problem_dir(path: Path) -> Problem:
    missing = [f for f in PROBLEM_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}")
    text = {f: _read_text(path / f) for f in PROBLEM_FILES}
    for f, t in text.items():
        if not t.strip():
            raise DataError(f"{path / f}: empty")
    tests = []
    # Test numbers as written in the file names ("1", or "01"), ordered numerically.
    py_nums = {
        m.group(1)
        for f in path.glob("test_case_*.py")
        if (m := re.fullmatch(r"test_case_(\d+)\.py", f.name))
    }
    q_nums = {
        m.group(1)
        for f in path.glob("q_test_case_*.q")
        if (m := re.fullmatch(r"q_test_case_(\d+)\.q", f.name))
    }
    if len({int(n) for n in py_nums}) < len(py_nums):
        raise DataError(
            f"{path}: two test_case files have the same number ({', '.join(sorted(py_nums))})"
        )
    for n in sorted(py_nums ^ q_nums, key=int):
        have, lack = (
            (f"test_case_{n}.py", f"q_test_case_{n}.q")
            if n in py_nums
            else (f"q_test_case_{n}.q", f"test_case_{n}.py")
        )
        raise DataError(f"{path}: {have} has no {lack}")
    for n in sorted(py_nums, key=int):
        tests.append(
            Test(
                _with_expected(
                    _read_text(path / f"test_case_{n}.py"), "#", _answer(path, n, "python")
                ),
                _with_expected(_read_text(path / f"q_test_case_{n}.q"), "/", _answer(path, n, "q")),
            )
        )
    difficulty = None
    if (path / "entry.json").is_file():  # LeetCode metadata; we keep the difficulty
        try:
            entry = json.loads(_read_text(path / "entry.json"))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path / 'entry.json'}:line {e.lineno}: invalid JSON ({e.msg})"
            ) from None
        if isinstance(entry, dict) and isinstance(entry.get("difficulty"), str):
            difficulty = entry["difficulty"]
    return Problem(
        path.name,
        text["problem_description.txt"],
        text["q_sol.q"],
        text["python_sol.py"],
        tuple(tests),
        difficulty,
    )


def _answer(path: Path, n: str, lang: str) -> str | None:
    for name in (f"{lang}_exact_ans_test_case_{n}.txt", f"test_case_{n}_correct_ans.txt"):
        if (path / name).is_file():
            return _read_text(path / name).strip()
    return None


def _with_expected(code: str, comment: str, expected: str | None) -> str:
    code = code.strip()
    if expected is None:
        return code
    return (
        code
        + "\n"
        + "\n".join(f"{comment} expected output: {line}" for line in expected.splitlines() or [""])
    )


def _is_problem_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in PROBLEM_FILES)


def _split_of(name: str, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


def problems_from_dirs(root: Path, test_fraction: float) -> dict[str, list[Problem]]:
    """{split: problems} from a tree of problem directories (train/ and test/ kept as given)."""
    if _is_problem_dir(root):
        return {"train": [read_problem_dir(root)]}
    splits: dict[str, list[Problem]] = {}
    given = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLIT_NAMES]
    for split_dir in given:
        splits[split_dir.name] = [
            read_problem_dir(d)
            for d in sorted(split_dir.iterdir())
            if d.is_dir() and _is_problem_dir(d)
        ]
    if not given:
        for d in sorted(root.iterdir()):
            if d.is_dir() and _is_problem_dir(d):
                splits.setdefault(_split_of(d.name, test_fraction), []).append(read_problem_dir(d))
    return {k: v for k, v in splits.items() if v}


SFT_COLUMNS = ("prompt", "completion")
PROBLEM_COLUMNS = ("problem_description", "python_solution", "q_solution")
TEST_FIELDS = ("python_test_code", "q_test_code")
EXPECTED_FIELDS = ("python_expected_output", "q_expected_output")


def read_parquet(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """("sft" | "problems", rows) after checking the columns a converter needs."""
    table = read_parquet_table(path)
    names = table.schema.names
    kind = (
        "sft"
        if all(c in names for c in SFT_COLUMNS)
        else "problems"
        if all(c in names for c in PROBLEM_COLUMNS)
        else None
    )
    if kind is None:
        need = [c for c in SFT_COLUMNS if c not in names]
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, need))} (prompt/"
            f"completion splits) or {', '.join(map(repr, PROBLEM_COLUMNS))} "
            f"(problem tables); has {', '.join(names) or 'none'}"
        )
    import pyarrow as pa

    for c in SFT_COLUMNS if kind == "sft" else PROBLEM_COLUMNS:
        t = table.schema.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"{path}: column {c!r} has type {t}, expected string")
    return kind, table.to_pylist()


def problems_from_rows(path: Path, rows: list[dict[str, Any]], first: int = 0) -> list[Problem]:
    """Problems from a problem table's rows; unnamed ones are <split>-<n>, n counted from
    `first` so the shards of one split do not reuse numbers."""
    problems = []
    for i, r in enumerate(rows):
        where = f"{path}:row {i}"
        for c in PROBLEM_COLUMNS:
            if not (r[c] or "").strip():
                raise DataError(f"{where}: column {c!r} is empty")
        cases = r.get("test_cases")
        if cases is not None and not isinstance(cases, (list, tuple)):
            raise DataError(
                f"{where}: column 'test_cases' must be a list of structs (got "
                f"{type(cases).__name__})"
            )
        tests = []
        for j, t in enumerate(cases or []):
            if not (
                isinstance(t, dict)
                and all(isinstance(t.get(k), str) for k in TEST_FIELDS)
                and all(isinstance(t.get(k), (str, type(None))) for k in EXPECTED_FIELDS)
            ):
                raise DataError(
                    f"{where}: test_cases[{j}] needs string fields "
                    f"{', '.join(TEST_FIELDS)} (and string or null "
                    f"{', '.join(EXPECTED_FIELDS)})"
                )
            tests.append(
                Test(
                    _with_expected(t["python_test_code"], "#", t.get("python_expected_output")),
                    _with_expected(t["q_test_code"], "/", t.get("q_expected_output")),
                )
            )
        name = r.get("problem_name") or r.get("problem_id")
        pid = (
            str(name)
            if name is not None and str(name).strip()
            else (f"{_split_stem(path)}-{first + i}")
        )
        difficulty = r.get("difficulty")
        problems.append(
            Problem(
                pid,
                r["problem_description"],
                r["q_solution"],
                r["python_solution"],
                tuple(tests),
                difficulty if isinstance(difficulty, str) else None,
            )
        )
    return problems


def _split_stem(path: Path) -> str:
    return _SHARD.sub("", path.name.removesuffix(".parquet"))


# ---------------------------------------------------------------------------------------------
# convert


def convert(
    sources: list[Path], out_dir: Path, test_fraction: float = 0.0, overwrite: bool = False
) -> dict[str, int]:
    """Convert problem directories or parquet files into OUT/<split>.jsonl; {file: records}.

    Problems give <split>.jsonl (with the tests variant) and <split>_no_tests.jsonl; a
    prompt/completion parquet split gives <split>.jsonl with its rows, shards concatenated.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory (--out)")
    outputs: dict[str, list[dict[str, Any]]] = {}
    kinds: dict[str, str] = {}  # output file -> "sft" | "problems": never both in one file
    for src in sources:
        if not src.exists():
            raise DataError(f"{src}: not found")
        if src.is_dir():
            files = sorted(src.glob("*.parquet"))
            dirs = [
                d
                for d in sorted(src.iterdir())
                if d.is_dir() and (_is_problem_dir(d) or d.name in SPLIT_NAMES)
            ]
            if files and (dirs or _is_problem_dir(src)):
                raise DataError(
                    f"{src}: holds both *.parquet files and problem directories; "
                    f"convert them as separate sources"
                )
            if not files:
                by_split = problems_from_dirs(src, test_fraction)
                if not by_split:
                    raise DataError(
                        f"{src}: no data files: no problem directories (with "
                        f"{', '.join(PROBLEM_FILES)}) and no *.parquet"
                    )
                for split, problems in by_split.items():
                    _add_problems(outputs, kinds, split, problems)
                continue
        else:
            files = [src]
        for f in files:
            if f.suffix != ".parquet":
                raise DataError(f"{f}: expected a problem directory or a .parquet file")
            kind, rows = read_parquet(f)
            split = _split_stem(f)
            if kind == "problems":
                first = len({r.get("problem_id") for r in outputs.get(f"{split}.jsonl", ())})
                _add_problems(outputs, kinds, split, problems_from_rows(f, rows, first))
            else:
                for i, r in enumerate(rows):
                    validate_record(r, f"{f}:row {i}")
                _claim(kinds, f"{split}.jsonl", "sft")
                outputs.setdefault(f"{split}.jsonl", []).extend(rows)
    _write_all(out_dir, outputs, overwrite)
    return {name: len(recs) for name, recs in outputs.items()}


def _claim(kinds: dict[str, str], name: str, kind: str) -> None:
    if kinds.setdefault(name, kind) != kind:
        raise DataError(
            f"{name}: split {name.removesuffix('.jsonl')!r} comes from both "
            f"prompt/completion data and problems; convert them to separate --out "
            f"directories"
        )


def _add_problems(
    outputs: dict[str, list], kinds: dict[str, str], split: str, problems: list[Problem]
) -> None:
    _claim(kinds, f"{split}.jsonl", "problems")
    seen = {r["problem_id"] for r in outputs.get(f"{split}.jsonl", ())}
    for p in problems:
        if p.id in seen:
            raise DataError(f"problem {p.id!r} occurs twice in split {split!r}")
        seen.add(p.id)
    records = render_records(problems)
    for r in records:
        validate_record(r, f"{split}: problem {r['problem_id']}")
    outputs.setdefault(f"{split}.jsonl", []).extend(records)
    outputs.setdefault(f"{split}_no_tests.jsonl", []).extend(
        r for r in records if not r["with_tests"]
    )


def _write_all(out_dir: Path, outputs: dict[str, list[dict[str, Any]]], overwrite: bool) -> None:
    """Serialise everything first, then temp files, renamed once all are written: an error
    before the renames leaves nothing new (not even the directory)."""
    existing = [n for n in outputs if (out_dir / n).exists()]
    if existing and not overwrite:
        raise DataError(f"{out_dir}: {', '.join(existing)} already exist(s); pass --overwrite")
    texts = {}
    for name, records in outputs.items():
        lines = []
        for i, r in enumerate(records):
            try:  # parquet may carry timestamps, bytes or NaN: not JSON, so not ours to guess
                lines.append(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
            except (TypeError, ValueError) as e:
                raise DataError(
                    f"{out_dir / name}: record {i}: not JSON-serialisable ({e})"
                ) from None
        texts[name] = "".join(lines)
    created = not out_dir.exists()
    tmps: list[tuple[Path, Path]] = []
    done: list[str] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            tmp = out_dir / f".{name}.tmp-{os.getpid()}"
            tmps.append((tmp, out_dir / name))
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        # Renames of files in one directory: only an I/O error between two of them could
        # leave some new and some old files; the message then says which were replaced.
        for tmp, final in tmps:
            tmp.replace(final)
            done.append(final.name)
    except OSError as e:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        replaced = f"; already replaced: {', '.join(done)}" if done else ""
        raise DataError(f"{out_dir}: cannot write ({e.strerror or e}){replaced}") from None
