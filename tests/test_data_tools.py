"""qsft-data inspect / convert, the near-duplicate finder and the q lint."""

from __future__ import annotations

import itertools
import json
import random
import struct
import subprocess
import sys

import pytest

from trainer.assets import build
from trainer.assets.validate import check
from trainer.config import ASSETS_DIR
from trainer.datatools.cli import main as data_main
from trainer.datatools.convert import convert
from trainer.datatools.near_dup import near_duplicate_pairs, shingles
from trainer.datatools.problems import render_records
from trainer.datatools.qlint import lint
from trainer.records import load_records

REPO = ASSETS_DIR.parent.parent
SPLITS = ("train", "test", "train_no_tests", "test_no_tests")


# --- near duplicates ---------------------------------------------------------------------------


def test_near_duplicates_equal_brute_force_jaccard():
    """Prefix filtering is an exact speed-up: the same pairs as comparing every pair."""
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(300)
    ]
    docs = {i: " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for i in range(100)}
    for i in range(100, 160):  # copies of earlier texts with one word changed or added
        w = docs[rng.randrange(100)].split()
        w.insert(rng.randrange(len(w) + 1), rng.choice(words))
        docs[i] = " ".join(w[: len(w) - rng.randint(0, 1)])
    for t in (0.5, 0.8):
        fast = {(a, b) for a, b, _ in near_duplicate_pairs(docs, docs, t)}
        sets = {k: shingles(v) for k, v in docs.items()}
        # Shingles in >10% of the distinct texts are boilerplate, dropped before comparing.
        distinct = {v: shingles(v) for v in docs.values()}
        freq = {g: sum(g in s for s in distinct.values()) for s in distinct.values() for g in s}
        common = {g for g, n in freq.items() if n > 0.1 * len(distinct)}
        sets = {k: s - common for k, s in sets.items()}
        brute = {
            (a, b)
            for a, b in itertools.permutations(docs, 2)
            if sets[a] and sets[b] and len(sets[a] & sets[b]) / len(sets[a] | sets[b]) >= t
        }
        assert fast == brute and len(brute) > 10


def test_near_duplicates_survive_many_copies_of_one_text():
    """Copies must not turn a text into "boilerplate": a test prompt copied 3x into train is
    found, as are identical texts under the 20-text threshold of the filter."""
    rng = random.Random(1)
    words = ["".join(rng.choice("klmnopqrst") for _ in range(5)) for _ in range(200)]
    train = {i: " ".join(rng.choice(words) for _ in range(12)) for i in range(30)}
    leaked = "Write a q function that returns the running maximum of a list of longs."
    train.update({30: leaked, 31: leaked.upper(), 32: leaked + "  "})
    pairs = near_duplicate_pairs(train, {"t": leaked})
    assert {a for a, b, _ in pairs} == {30, 31, 32} and all(s == 1.0 for *_, s in pairs)
    within = near_duplicate_pairs(train, train)
    assert {(a, b) for a, b, _ in within if a in (30, 31, 32)} == {
        (a, b) for a in (30, 31, 32) for b in (30, 31, 32) if a != b
    }


def test_near_duplicates_ignore_the_template_but_catch_an_edited_copy():
    template = "Translate this q function into an equivalent Python function `solve`.\n\n{}"
    codes = [
        "solve:{[x] (|\\)x}",
        "solve:{[x] 1_(-':)x}",
        "solve:{[t] count each group x}",
        "solve:{[s] lower s}",
        "solve:{[x] x where x>0}",
        "solve:{[x] sum x*x}",
        "solve:{[x] distinct x}",
        "solve:{[x;n] n#desc x}",
        "solve:{[x] x iasc x}",
        "solve:{[d] key d}",
        "solve:{[x] prd 1+til x}",
        "solve:{[x] reverse x}",
        "solve:{[x] max x}",
        "solve:{[a;b] a inter b}",
        "solve:{[x] x mod 7}",
        "solve:{[s] upper s}",
        "solve:{[x] 2 xbar x}",
        "solve:{[d] value d}",
        "solve:{[t] cols t}",
        "solve:{[x] first x}",
        "solve:{[x] last x}",
        "solve:{[x] asc x}",
        "solve:{[x] neg x}",
        "solve:{[x] avg x}",
    ]
    docs = {i: template.format(c) for i, c in enumerate(codes)}
    assert near_duplicate_pairs(docs, docs) == []  # short, different code under one template
    desc = (
        "Given a table of trades with columns sym, price and size, return for each symbol "
        "the volume-weighted average price, as a dictionary from symbol to price."
    )
    edited = desc.replace("Given a table", "Given  a TABLE").replace("price.", "price!")
    pairs = near_duplicate_pairs({"train": desc}, {"test": edited, "other": desc[::-1]})
    assert [(a, b) for a, b, _ in pairs] == [("train", "test")]


# --- q lint ------------------------------------------------------------------------------------


def test_qls_flags_malformed_q_and_passes_good_q():
    found = lint(
        {
            "issue example": "f:{[x] sum x where (0=x mod 2}",
            "unclosed lambda": "solve:{[x] til x",
            "bracket mismatch": "f:{[x] x+1]",
            "undefined name": "f:{[x] x+y}",
            "good": "solve:{[t] select sum qty by sym from t where price>100.5, sym in `a`b}",
            "good multi-line": "solve:{[t]\n  s:0!select n:count i by sym from t;\n  s}",
        }
    )
    assert all(
        found[k] for k in ("issue example", "unclosed lambda", "bracket mismatch", "undefined name")
    )
    assert "cannot find name 'y'" in found["undefined name"][0].message
    assert found["good"] == [] and found["good multi-line"] == []


def test_qls_client_handles_many_snippets_without_deadlock():
    """Both pipes fill with 2000 documents; the client writes from a thread (trainer/qlint)."""
    snippets = {f"s{i}": f"solve{i}:{{[x] x+{i}}}" for i in range(1999)}
    snippets["bad"] = "f:{[x] (x"
    found = lint(snippets, timeout_s=120)
    assert len(found) == 2000 and found["bad"] and not any(found[f"s{i}"] for i in range(1999))


def test_validator_reports_each_kind_of_defect():
    good = build.load_problems()[0]
    wrong_python = dict(good, id="p901", title="x", python="def solve(x):\n    return 0\n")
    broken_q = dict(good, id="p902", q="solve:{[x] sum x where (0=x mod 2}")
    copy = dict(good, id="p903")
    one_test = dict(
        good,
        id="p904",
        description="Something else entirely: count the vowels of a string, case-insensitively.",
        q='solve:{[s] sum lower[s] in "aeiou"}',
        python="def solve(s):\n    return sum(c in 'aeiou' for c in s.lower())\n",
        tests=good["tests"][:1],
    )
    report = check([good, wrong_python, broken_q, copy, one_test])
    assert "p001" not in report
    assert any("test 0: got 0, expected 6" in e for e in report["p901"])
    assert any(e.startswith("q ") for e in report["p902"])
    assert any("description near-duplicate of p001" in e for e in report["p903"])
    assert report["p904"] == ["needs 2+ tests"]


# --- convert -----------------------------------------------------------------------------------


def _shipped(name):
    return load_records(ASSETS_DIR / f"q_sft_{name}.jsonl")


def test_convert_problem_directories_reproduces_the_shipped_records(tmp_path):
    """Our sample set written in the original per-problem layout converts back to exactly the
    shipped JSONL: the converter and the asset build share one renderer."""
    build.write_problem_dirs(build.load_problems(), tmp_path / "SFT_Data")
    assert data_main(["convert", str(tmp_path / "SFT_Data"), "--out", str(tmp_path / "out")]) == 0
    for name in SPLITS:
        assert load_records(tmp_path / "out" / f"{name}.jsonl") == _shipped(name), name


def test_convert_reads_expected_answers_and_hash_split(tmp_path):
    root = tmp_path / "flat"
    for i in range(40):
        d = root / f"problem-{i}"
        d.mkdir(parents=True)
        (d / "problem_description.txt").write_text(f"Return {i} plus x.")
        (d / "python_sol.py").write_text(f"def solve(x):\n    return x + {i}\n")
        (d / "q_sol.q").write_text(f"solve:{{[x] x+{i}}}")
        (d / "test_case_1.py").write_text("print(solve(x=1))")
        (d / "q_test_case_1.q").write_text("result:solve[1];\nshow result;")
        (d / "python_exact_ans_test_case_1.txt").write_text(f"{i + 1}\n")
        (d / "q_exact_ans_test_case_1.txt").write_text(f"{i + 1}\n")
    out = convert([root], tmp_path / "out", test_fraction=0.25)
    assert out["train.jsonl"] + out["test.jsonl"] == 40 * 6 and out["test.jsonl"] > 0
    again = convert([root], tmp_path / "out2", test_fraction=0.25)
    assert again == out  # the hash split is stable
    recs = load_records(tmp_path / "out" / "train.jsonl")
    tested = next(r for r in recs if r["task"] == "desc2q" and r["with_tests"])
    assert "result:solve[1];\nshow result;\n/ expected output: " in tested["prompt"]
    q2py = next(r for r in recs if r["task"] == "q2py" and r["with_tests"])
    assert "print(solve(x=1))\n# expected output: " in q2py["prompt"]


def test_convert_parquet_splits_and_problem_tables(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "data"
    src.mkdir()
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    pq.write_table(pa.Table.from_pylist(rows), src / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), src / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), src / "test_no_tests-00000-of-00001.parquet")
    problems = [
        {
            "problem_name": "two-sum",
            "problem_description": "Add.",
            "difficulty": "Easy",
            "python_solution": "def solve(a, b):\n    return a + b\n",
            "q_solution": "solve:{[a;b] a+b}",
            "test_cases": [
                {
                    "python_test_code": "print(solve(1, 2))",
                    "q_test_code": "show solve[1;2];",
                    "python_expected_output": "3",
                    "q_expected_output": "3",
                }
            ],
        }
    ]
    pq.write_table(pa.Table.from_pylist(problems), tmp_path / "problems.parquet")
    out = convert([src, tmp_path / "problems.parquet"], tmp_path / "out")
    assert out == {
        "train.jsonl": 3,
        "test_no_tests.jsonl": 1,
        "problems.jsonl": 6,
        "problems_no_tests.jsonl": 3,
    }
    assert load_records(tmp_path / "out" / "train.jsonl") == rows + rows[:1]
    q2py = [r for r in load_records(tmp_path / "out" / "problems.jsonl") if r["task"] == "q2py"]
    assert q2py[0]["problem_id"] == "two-sum" and q2py[0]["completion"].startswith("```python")
    assert "print(solve(1, 2))\n# expected output: 3" in q2py[1]["prompt"]


def test_convert_unnamed_problems_across_shards_get_distinct_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {
        "problem_description": "Add.",
        "python_solution": "def solve(a, b):\n    return a+b",
        "q_solution": "solve:{[a;b] a+b}",
        "difficulty": float("nan"),
    }
    for shard in range(2):
        pq.write_table(
            pa.Table.from_pylist([row, row]), tmp_path / f"train-0000{shard}-of-00002.parquet"
        )
    out = convert([tmp_path], tmp_path / "out")
    assert out == {"train.jsonl": 12, "train_no_tests.jsonl": 12}
    recs = load_records(tmp_path / "out" / "train.jsonl")
    assert sorted({r["problem_id"] for r in recs}) == ["train-0", "train-1", "train-2", "train-3"]
    assert all("difficulty" not in r for r in recs)  # NaN is not a difficulty


def _bad_sources(tmp_path):
    """(argv for qsft-data, expected one-line message) per kind of bad input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"prompt": "p", "completion": "c"}
    cases = {}
    f = tmp_path / "utf8.jsonl"
    f.write_bytes(
        json.dumps(good).encode() + b"\n" + b'{"prompt": "\xc3\x28", "completion": "c"}\n'
    )
    cases["invalid utf-8"] = (["inspect", str(f)], "utf8.jsonl:line 2: invalid UTF-8")
    f = tmp_path / "syntax.jsonl"
    f.write_text(json.dumps(good) + "\n" + '{"prompt": "p" "completion": "c"}\n')
    cases["json syntax"] = (["inspect", str(f)], "syntax.jsonl:line 2: invalid JSON")
    f = tmp_path / "types.jsonl"
    f.write_text(json.dumps({"prompt": ["p"], "completion": "c"}) + "\n")
    cases["wrong types"] = (["inspect", str(f)], "types.jsonl:line 1: 'prompt' must be a string")
    f = tmp_path / "empty.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "completion": " "}) + "\n")
    cases["empty completion"] = (["inspect", str(f)], "empty.jsonl:line 2: empty completion")
    f = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "answer": ["a"]}), f)
    cases["parquet missing columns"] = (
        ["convert", str(f)],
        "cols.parquet: missing column(s) 'completion'",
    )
    f = tmp_path / "coltype.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "completion": [3]}), f)
    cases["parquet column type"] = (
        ["convert", str(f)],
        "coltype.parquet: column 'completion' has type int64",
    )
    (tmp_path / "nothing" / "sub").mkdir(parents=True)
    (tmp_path / "nothing" / "README.md").write_text("no data here")
    cases["no data files"] = (["convert", str(tmp_path / "nothing")], "nothing: no data files")
    d = tmp_path / "probs" / "train" / "p1"
    d.mkdir(parents=True)
    (d / "problem_description.txt").write_text("x")
    (d / "python_sol.py").write_bytes(b"def solve():\n    return '\xff'\n")
    (d / "q_sol.q").write_text("solve:{1}")
    cases["problem file utf-8"] = (
        ["convert", str(tmp_path / "probs")],
        "p1/python_sol.py: invalid UTF-8 at byte 25",
    )
    for root, extra in (("dup", "test_case_01.py"), ("orphan", "q_test_case_2.q")):
        d = tmp_path / root / "p2"
        d.mkdir(parents=True)
        for name, text in (
            ("problem_description.txt", "x"),
            ("python_sol.py", "def solve(): 1"),
            ("q_sol.q", "solve:{1}"),
            ("test_case_1.py", "print(solve())"),
            ("q_test_case_1.q", "solve[]"),
            (extra, "solve[]"),
        ):
            (d / name).write_text(text)
    cases["test numbered twice"] = (
        ["convert", str(tmp_path / "dup")],
        "p2: two test_case files have the same number",
    )
    cases["orphan q test"] = (
        ["convert", str(tmp_path / "orphan")],
        "p2: q_test_case_2.q has no test_case_2.py",
    )
    f = tmp_path / "cases.parquet"
    pq.write_table(
        pa.table(
            {
                "problem_description": ["d"],
                "python_solution": ["p"],
                "q_solution": ["q"],
                "test_cases": [3],
            }
        ),
        f,
    )
    cases["test_cases not a list"] = (
        ["convert", str(f)],
        "cases.parquet:row 0: column 'test_cases' must be a list",
    )
    f = tmp_path / "when.parquet"
    pq.write_table(
        pa.table({"prompt": ["p"], "completion": ["c"], "at": pa.array([0], pa.timestamp("s"))}), f
    )
    cases["not JSON-serialisable"] = (["convert", str(f)], "when.jsonl: record 0: not JSON")
    mixed = tmp_path / "mixed"
    (mixed / "train" / "p1").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["p"], "completion": ["c"]}), mixed / "x.parquet")
    cases["parquet and problem dirs"] = (
        ["convert", str(mixed)],
        "mixed: holds both *.parquet files and problem dir",
    )
    pq.write_table(pa.table({"prompt": ["p"], "completion": ["c"]}), tmp_path / "train.parquet")
    cases["one split from two kinds"] = (
        ["convert", str(tmp_path / "train.parquet"), str(tmp_path / "probs2")],
        "train.jsonl: split 'train' comes from both",
    )
    ok = tmp_path / "probs2" / "train" / "p1"
    ok.mkdir(parents=True)
    for name in ("problem_description.txt", "python_sol.py", "q_sol.q"):
        (ok / name).write_text("x")
    (tmp_path / "afile").write_text("")
    cases["--out is a file"] = (
        ["convert", str(tmp_path / "probs2"), "--out", str(tmp_path / "afile")],
        "afile: exists and is not a dir",
    )
    good_file = tmp_path / "good.jsonl"
    good_file.write_text(json.dumps(good) + "\n")
    cases["--histogram is a directory"] = (
        ["inspect", str(good_file), "--histogram", str(tmp_path / "mixed")],
        "mixed: is a directory",
    )
    return cases


@pytest.mark.parametrize(
    "name",
    [
        "invalid utf-8",
        "json syntax",
        "wrong types",
        "empty completion",
        "parquet missing columns",
        "parquet column type",
        "no data files",
        "problem file utf-8",
        "test numbered twice",
        "orphan q test",
        "test_cases not a list",
        "not JSON-serialisable",
        "parquet and problem dirs",
        "one split from two kinds",
        "--out is a file",
        "--histogram is a directory",
    ],
)
def test_bad_data_one_line_exit_2_nothing_written(name, tmp_path):
    argv, expected = _bad_sources(tmp_path)[name]
    out = tmp_path / "out"
    png = tmp_path / "hist.png"
    if "--out" not in argv and "--histogram" not in argv:
        argv += ["--out", str(out)] if argv[0] == "convert" else ["--histogram", str(png)]
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "data.py"), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert not out.exists() and not png.exists()
    assert not list(tmp_path.rglob("*.tmp*"))  # no temp file left behind


def test_convert_refuses_to_overwrite(tmp_path):
    build.write_problem_dirs(build.load_problems()[:12], tmp_path / "src")
    assert data_main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 0
    before = (tmp_path / "o" / "train.jsonl").read_bytes()
    assert data_main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    assert (tmp_path / "o" / "train.jsonl").read_bytes() == before
    assert (
        data_main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--overwrite"])
        == 0
    )


# --- inspect -----------------------------------------------------------------------------------


def test_inspect_reports_kinds_lengths_and_leakage(tmp_path, capsys):
    train, test = ASSETS_DIR / "q_sft_train.jsonl", ASSETS_DIR / "q_sft_test.jsonl"
    png = tmp_path / "h.png"
    assert (
        data_main(
            [
                "inspect",
                str(train),
                str(test),
                "--max_seq_length",
                "300",
                "--histogram",
                str(png),
                "--strict",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    head = out[0].split()
    row = dict(zip(head, out[1].split(), strict=False))
    records = load_records(train)
    assert int(row["records"]) == len(records)
    for kind in ("desc2q", "py2q", "q2py"):
        assert int(row[kind]) == sum(r["task"] == kind for r in records)
    assert row["dups"] == "0"
    assert any(
        line.startswith(
            "train/test overlap q_sft_train.jsonl x q_sft_test.jsonl: 0 "
            "identical records, 0 near-duplicate prompts, 0 shared"
        )
        for line in out
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (640, 360)

    # A test file that repeats training problems is leakage: reported, exit 1 with --strict.
    leaky = tmp_path / "leaky_test.jsonl"
    leaky.write_text("".join(json.dumps(r) + "\n" for r in records[:9] + load_records(test)))
    assert data_main(["inspect", str(train), str(leaky), "--histogram", "none", "--strict"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("train/test"))
    shared = len({r["problem_id"] for r in records[:9]})
    assert f"9 identical records, 9 near-duplicate prompts, {shared} shared problem ids" in line


def test_inspect_reads_train_and_test_from_directory_names(tmp_path, capsys):
    recs = load_records(ASSETS_DIR / "q_sft_train.jsonl")[:12]
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert (
        data_main(
            [
                "inspect",
                str(tmp_path / "train" / "part.jsonl"),
                str(tmp_path / "test" / "part.jsonl"),
                "--histogram",
                "none",
                "--strict",
            ]
        )
        == 1
    )
    assert "train/test overlap part.jsonl x part.jsonl: 12 identical" in capsys.readouterr().out


def test_inspect_counts_over_length_and_infers_task_kinds(tmp_path, capsys, monkeypatch):
    recs = render_records(
        [build.to_problem(p) for p in build.load_problems()[:4]], with_tests=False
    )
    for r in recs:
        for k in ("task", "problem_id", "with_tests", "id", "difficulty"):
            r.pop(k)  # like the original parquet: prompt and completion only
    f = tmp_path / "bare.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.chdir(tmp_path)
    assert data_main(["inspect", str(f), "--max_seq_length", "60"]) == 0
    assert not list(tmp_path.glob("*.png"))  # a picture only where --histogram says
    out = capsys.readouterr().out.splitlines()
    row = dict(zip(out[0].split(), out[1].split(), strict=False))
    assert (row["desc2q"], row["py2q"], row["q2py"]) == ("4", "4", "4")
    from trainer.data import encode
    from trainer.model import load_tokenizer

    tok = load_tokenizer(ASSETS_DIR / "tiny_model")
    # As the trainer would train them: prompt/completion records default to the raw format.
    lengths = [len(encode(r, tok, "raw").input_ids) for r in recs]
    assert int(row[">60"]) == sum(n > 60 for n in lengths) > 0
    assert int(row["max"]) == max(lengths)
    assert (
        data_main(
            [
                "inspect",
                str(f),
                "--max_seq_length",
                "60",
                "--histogram",
                "none",
                "--prompt_format",
                "chat",
            ]
        )
        == 0
    )
    row = dict(zip(*(x.split() for x in capsys.readouterr().out.splitlines()[:2]), strict=False))
    assert int(row["max"]) == max(len(encode(r, tok, "chat").input_ids) for r in recs)
