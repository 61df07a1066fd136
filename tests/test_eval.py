"""qsft-eval: scoring given completions, pass@k, the sandbox against hostile answers, q through
a stand-in interpreter, and the tiny model end to end."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from trainer.config import ASSETS_DIR
from trainer.evaluation import sandbox
from trainer.evaluation.cli import main as eval_main
from trainer.evaluation.scoring import extract_code, pass_at_k, summarize
from trainer.records import load_records

TEST_FILE = ASSETS_DIR / "q_sft_test.jsonl"
ISOLATION = sandbox.isolation()


def _records(task=None):
    return [r for r in load_records(TEST_FILE) if task is None or r["task"] == task]


def _preds(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"id": i, "completion": c}) + "\n" for i, c in rows))
    return path


def _eval(tmp_path, *args):
    out = tmp_path / "ev"
    rc = eval_main(["--eval_file", str(TEST_FILE), "--output_dir", str(out), *map(str, args)])
    report = json.loads((out / "eval_generation.json").read_text()) if rc == 0 else None
    samples = (
        [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        if rc == 0
        else None
    )
    return rc, report, samples


def _eval_file(tmp_path, eval_file, *args):
    out = tmp_path / "ev"
    rc = eval_main(["--eval_file", str(eval_file), "--output_dir", str(out), *map(str, args)])
    if rc:
        return rc, None, None
    report = json.loads((out / "eval_generation.json").read_text())
    return rc, report, [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def test_reference_answers_pass_and_corrupted_ones_fail(tmp_path):
    recs = _records()
    ref = _preds(tmp_path / "ref.jsonl", [(r["id"], r["completion"]) for r in recs])
    rc, report, samples = _eval(tmp_path, "--predictions", ref, "--q_binary", "none")
    assert rc == 0
    q2py = [s for s in samples if s["task"] == "q2py"]
    assert report["pass_at_k"]["q2py"] == {"pass@1": 1.0} and all(s["passed"] for s in q2py)
    assert all(s["how"] == "executed" for s in q2py) and len(q2py) == len(_records("q2py"))
    # No q interpreter given: q answers are linted, counted apart, never in pass@k.
    assert report["q_binary"] is None and report["parses"]["desc2q"] == 1.0
    assert report["samples"] == {"executed": len(q2py), "linted": len(recs) - len(q2py)}
    assert report["pass_at_k"]["overall"] == {"pass@1": 1.0}  # overall = executed prompts only
    # Off by one in every Python answer, and q answers that do not parse.
    bad = []
    for r in recs:
        if r["task"] == "q2py":
            bad.append(
                (
                    r["id"],
                    r["completion"].replace("def solve(", "def _solve(") + "\n"
                    "def solve(*a):\n    return _solve(*a) + 1",
                )
            )
        else:
            bad.append((r["id"], "```q\nsolve:{[x] (x\n```"))
    rc, report, samples = _eval(
        tmp_path, "--predictions", _preds(tmp_path / "b.jsonl", bad), "--q_binary", "none"
    )
    assert rc == 0 and report["pass_at_k"]["q2py"] == {"pass@1": 0.0}
    assert report["parses"]["overall"] == 0.0
    assert all(not s["passed"] and s["detail"] for s in samples)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # 1 - C(3,1)/C(5,1)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 2, 5) == 1.0 and pass_at_k(4, 0, 2) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 5)
    rows = [dict(id="a", task="q2py", how="executed", passed=p) for p in (1, 1, 0, 0, 0)]
    rows += [dict(id="b", task="q2py", how="executed", passed=False) for _ in range(5)]
    got = summarize(rows, [1, 5])["pass_at_k"]["q2py"]
    assert got == pytest.approx({"pass@1": (0.4 + 0.0) / 2, "pass@5": (1.0 + 0.0) / 2})


def test_several_samples_per_prompt_from_predictions(tmp_path):
    """n = 4 lines per id: 2 correct and 2 wrong answers for each q2py prompt."""
    rows = []
    recs = _records("q2py")[:6]
    for r in recs:
        rows += [(r["id"], r["completion"])] * 2 + [(r["id"], "```python\nsolve = 1\n```")] * 2
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "ev"
    assert (
        eval_main(
            [
                "--predictions",
                str(_preds(tmp_path / "p.jsonl", rows)),
                "--eval_file",
                str(sub),
                "--output_dir",
                str(out),
                "--k",
                "1,2,4",
            ]
        )
        == 0
    )
    report = json.loads((out / "eval_generation.json").read_text())
    assert report["pass_at_k"]["q2py"] == pytest.approx(
        {"pass@1": 0.5, "pass@2": 1 - 1 / 6, "pass@4": 1.0}
    )


def test_code_is_taken_from_its_fence():
    text = "Here:\n```python\ndef solve(x):\n    return x\n```\nand ```q\nsolve:{x}\n```"
    assert extract_code(text, "python") == "def solve(x):\n    return x"
    assert extract_code(text, "q") == "solve:{x}"
    assert extract_code("def solve(x): return 1", "python") == "def solve(x): return 1"


def test_an_answer_cannot_print_its_own_verdict_or_read_the_expected_outputs(tmp_path):
    """The expected outputs stay with the parent: a forged result line, or a solve() that
    looks for them in its process, fails."""
    rec = _records("q2py")[0]
    forged = (
        "import sys\nprint('QSFT_RESULT ' + repr([{'ok': '0'}] * 99))\n"
        "def solve(*a):\n    g = globals()\n"
        "    return next((v for k, v in g.items() if 'TEST' in k or 'out' in k.lower()), None)"
    )
    sub = tmp_path / "sub.jsonl"
    sub.write_text(json.dumps(rec) + "\n")
    rc, report, samples = _eval_file(
        tmp_path, sub, "--predictions", _preds(tmp_path / "f.jsonl", [(rec["id"], forged)])
    )
    assert rc == 0 and samples[0]["passed"] is False
    program = __import__("trainer.evaluation.scoring", fromlist=["x"]).python_program(
        "def solve(x): return x", [{"input": "[1]", "output": "42", "q_input": "", "q_output": ""}]
    )
    assert "42" not in program  # only the inputs go into the sandbox


def test_the_q_programs_are_what_q_runs():
    from trainer.evaluation.scoring import q_phase1, q_phase2

    tests = [
        {"input": "", "output": "", "q_input": "1 2 3", "q_output": "6"},
        {"input": "", "output": "", "q_input": '`a`b!1 2;"x"', "q_output": "`a`b"},
    ]
    assert q_phase1("solve:{[x] sum x}", tests) == (
        "solve:{[x] sum x}\n"
        'qsftT:("solve[1 2 3]";"solve[`a`b!1 2;\\"x\\"]");\n'
        '{-1 "QSFT_TEST ",$[first x;"1",raze string last x;"0",last x]} each\n'
        "  {@[{(1b;-8!value x)};x;{(0b;x)}]} each qsftT;\n"
        '-1 "QSFT_END";\nexit 0\n'
    )
    assert q_phase2(["0a", "0b"], tests) == (
        'qsftG:("X"$2 cut "0a";"X"$2 cut "0b");\nqsftW:((6);(`a`b));\n'
        '-1 "QSFT_CHECK ",raze string {(-9!x)~y}\'[qsftG;qsftW];\nexit 0\n'
    )
    one = q_phase1("solve:{x}", tests[:1])
    assert 'qsftT:(enlist "solve[1 2 3]");' in one  # a one-item list needs enlist in q


def test_a_problem_without_tests_is_refused(tmp_path, capsys):
    rec = _records("q2py")[0]
    table = tmp_path / "problems.jsonl"
    table.write_text(json.dumps({"id": rec["problem_id"], "tests": []}) + "\n")
    sub = tmp_path / "sub.jsonl"
    sub.write_text(json.dumps(rec) + "\n")
    preds = _preds(tmp_path / "p.jsonl", [(rec["id"], rec["completion"])])
    rc = eval_main(
        [
            "--predictions",
            str(preds),
            "--eval_file",
            str(sub),
            "--problems",
            str(table),
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "needs tests with input" in capsys.readouterr().err


def test_the_chat_prompt_is_the_rendered_conversation_up_to_the_answer(tmp_path):
    from tests.conftest import qwen_layout_model
    from trainer.data import render
    from trainer.evaluation.generate import prompt_text
    from trainer.model import load_tokenizer

    tok = load_tokenizer(qwen_layout_model(tmp_path / "m"))
    msgs = [
        {"role": "system", "content": "You write q."},
        {"role": "user", "content": "sum?"},
        {"role": "assistant", "content": "sum x"},
        {"role": "user", "content": "max?"},
        {"role": "assistant", "content": "max x"},
    ]
    text, spans = render(msgs, tok)
    prompt = prompt_text({"messages": msgs}, tok, "chat")
    assert prompt == text[: spans[-1][0]] and text.startswith(prompt)
    assert prompt.endswith("<|im_start|>assistant\n") and "sum x<|im_end|>" in prompt
    rec = {"prompt": "max?", "completion": "max x"}
    assert prompt_text(rec, tok, "raw") == "max?"
    assert prompt_text(rec, tok, "chat").endswith("max?<|im_end|>\n<|im_start|>assistant\n")


def test_the_best_checkpoint_is_the_highest_pass_at_1_then_the_lower_loss(tmp_path, monkeypatch):
    """Three checkpoints: 10 and 20 tie on pass@1 (20 has the lower loss), 30 has no eval loss
    and the same pass@1 — 20 wins; then a higher pass@1 beats any loss."""
    from trainer.evaluation import cli

    recs = _records("q2py")[:2]
    right, wrong = recs[0]["completion"], "```python\nsolve = None\n```"
    answers = {10: [right, wrong], 20: [right, wrong], 30: [right, wrong]}

    def fake(model_dir, records, args):
        step = int(Path(model_dir).parent.name.split("-")[1])
        return {r["id"]: [answers[step][i]] for i, r in enumerate(records)}, {"engine": "stub"}

    monkeypatch.setattr(cli, "completions_from_model", fake)
    run = tmp_path / "run"
    for step in answers:
        (run / "checkpoints" / f"checkpoint-{step}" / "consolidated").mkdir(parents=True)
        (run / "checkpoints" / f"checkpoint-{step}" / "consolidated" / "config.json").write_text(
            "{}"
        )
    (run / "logs").mkdir()
    history = [{"step": 10, "eval_loss": 2.0}, {"step": 20, "eval_loss": 1.5}]
    (run / "logs" / "eval_results.json").write_text(json.dumps({"history": history}))
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["--checkpoints", str(run), "--eval_file", str(sub), "--output_dir", str(tmp_path / "o")]
    assert eval_main(argv) == 0
    best = json.loads((run / "best_checkpoint.json").read_text())
    assert (best["step"], best["value"], best["eval_loss"]) == (20, 0.5, 1.5)
    assert [c["step"] for c in best["candidates"]] == [10, 20, 30]
    answers[30] = [right, recs[1]["completion"]]  # 30 now solves both: pass@1 wins over loss
    assert eval_main(argv) == 0
    best = json.loads((run / "best_checkpoint.json").read_text())
    assert (best["step"], best["value"], best["eval_loss"]) == (30, 1.0, None)


# --- untrusted code ------------------------------------------------------------------------


def _python(code: str, wall_s: float = 2.0, guard: bool = True) -> sandbox.Result:
    files = {"answer.py": code}
    argv = [sys.executable, "-I", "-S", "answer.py"]
    if guard:
        files["guard.py"] = sandbox.PY_GUARD
        argv = [sys.executable, "-I", "-S", "guard.py", "answer.py"]
    return sandbox.run(argv, files, sandbox.Limits(wall_s=wall_s), isolated=ISOLATION)


def test_hostile_answers_are_failed_samples_and_the_eval_finishes(tmp_path, request):
    """Each hostile answer fails its sample, quickly, and the eval goes on to the next."""
    listener = socket.socket()
    request.addfinalizer(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    outside = tmp_path / "outside.txt"
    hostile = {
        "hang": "def solve(*a):\n    while True:\n        pass",
        "sleep": "import time\ndef solve(*a):\n    time.sleep(60)",
        "fork_bomb": "import os\ndef solve(*a):\n    while True:\n        os.fork()",
        "memory": "def solve(*a):\n    return len(bytearray(8 << 30))",
        "output": "import sys\ndef solve(*a):\n    while True:\n"
        "        sys.stdout.write('x' * 65536)",
        "write_outside": f"def solve(*a):\n    open({str(outside)!r}, 'w').write('x')",
        "network": "import socket\ndef solve(*a):\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "environment": "import os\ndef solve(*a):\n    return sorted(os.environ)",
        "exit": "import os\nos._exit(0)",
    }
    recs = _records("q2py")[: len(hostile)]
    rows = [
        (r["id"], f"```python\n{code}\n```") for r, code in zip(recs, hostile.values(), strict=True)
    ]
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "ev"
    t0 = time.time()
    rc = eval_main(
        [
            "--predictions",
            str(_preds(tmp_path / "h.jsonl", rows)),
            "--eval_file",
            str(sub),
            "--output_dir",
            str(out),
            "--timeout_s",
            "2",
        ]
    )
    assert rc == 0 and time.time() - t0 < 60
    lines = (out / "samples.jsonl").read_text().splitlines()
    samples = {s["id"]: s for s in map(json.loads, lines)}
    details = {name: samples[r["id"]]["detail"] for name, r in zip(hostile, recs, strict=True)}
    assert not any(s["passed"] for s in samples.values())
    assert details["hang"] == "timeout" and details["sleep"] == "timeout"
    assert "os.fork is not allowed" in details["fork_bomb"]
    assert "MemoryError" in details["memory"] and details["output"] == "output"
    assert "not allowed" in details["write_outside"] and not outside.exists()
    assert "not allowed" in details["network"]
    assert "did not run to the end" in details["exit"]
    listener.settimeout(0.1)
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing ever connected


def test_the_kernel_confines_code_the_python_guard_does_not_see(tmp_path):
    """Without the audit hook (as a q binary runs): no writes outside its directory, no
    network, an empty environment, limits on memory, output and time."""
    if not (ISOLATION["landlock"] and ISOLATION["network_namespace"]):
        pytest.skip(f"this kernel does not give {ISOLATION}")
    outside = tmp_path / "outside.txt"
    r = _python(f"open({str(outside)!r}, 'w').write('x')", guard=False)
    assert r.status == "error" and "Permission denied" in r.stderr and not outside.exists()
    r = _python("open('inside.txt', 'w').write('x'); print(open('inside.txt').read())", guard=False)
    assert r.status == "ok" and r.stdout == "x\n"
    r = _python("import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)", guard=False)
    assert "Network is unreachable" in r.stderr
    r = _python("import os; os.execv('/bin/sh', ['sh', '-c', 'echo ran'])", guard=False)
    assert r.status == "error" and "Permission denied" in r.stderr and "ran" not in r.stdout
    r = _python("import os; print(sorted(k for k in os.environ if k != 'LC_CTYPE'))", guard=False)
    assert r.stdout == "['PATH']\n"
    assert _python("x = bytearray(8 << 30)", guard=False).status == "memory"
    assert _python("print('x' * (4 << 20))", guard=False).status == "output"
    assert _python("while True: pass", wall_s=1, guard=False).status == "timeout"
    # A parent holding many descriptors (torch, CUDA, vLLM do) still confines its children.
    held = [open(__file__) for _ in range(200)]
    try:
        r = _python(f"open({str(outside)!r}, 'w').write('x')", guard=False)
    finally:
        for f in held:
            f.close()
    assert "Permission denied" in r.stderr and not outside.exists()


# --- q through an interpreter ------------------------------------------------------------

STAND_IN = """#!{python}
# A stand-in for the q interpreter, for the plumbing: phase 1 "serialises" good for answers
# written like the reference solutions (solve:{{[...]...}}), bad otherwise; ERR raises 'type in
# every test, LOOP hangs. Phase 2 matches each result with good.
import os, re, sys
text = open(sys.argv[1]).read()
assert sys.argv[2:] == ["-q"], sys.argv
assert sorted(os.environ) in (["PATH", "QHOME"], ["LC_CTYPE", "PATH", "QHOME"]), sorted(os.environ)
if "qsftT:" in text:
    answer, tests = text.split("qsftT:", 1)
    if "LOOP" in answer:
        while True:
            pass
    good = "solve:{{[" in answer and "WRONG" not in answer
    for _ in re.findall(r'"solve\\[', tests) or re.findall(r"solve\\[", tests):
        print("QSFT_TEST 0type" if "ERR" in answer else
              "QSFT_TEST 1" + (b"good" if good else b"bad").hex())
    print("QSFT_END")
else:
    got = re.findall(r'"X"\\$2 cut "([0-9a-f]*)"', text)
    print("QSFT_CHECK " + "".join("1" if bytes.fromhex(h) == b"good" else "0" for h in got))
"""


def test_q_answers_run_through_the_q_interpreter_when_there_is_one(tmp_path, monkeypatch):
    q = tmp_path / "bin" / "q"
    q.parent.mkdir()
    q.write_text(STAND_IN.format(python=sys.executable))
    q.chmod(0o755)
    monkeypatch.setenv("PATH", f"{q.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("QHOME", str(tmp_path))  # a licensed q needs it; passed through alone
    monkeypatch.setenv("SECRET_TOKEN", "x")  # never passed
    recs = [r for r in _records() if r["task"] in ("desc2q", "py2q")][:8]
    rows = [(r["id"], r["completion"]) for r in recs[:4]]
    rows += [(r["id"], "```q\nsolve:{[x] WRONG}\n```") for r in recs[4:6]]
    rows += [(recs[6]["id"], "```q\nsolve:{[x] ERR}\n```")]
    rows += [(recs[7]["id"], "```q\nsolve:{[x] LOOP}\n```")]
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "ev"
    rc = eval_main(
        [
            "--predictions",
            str(_preds(tmp_path / "q.jsonl", rows)),
            "--eval_file",
            str(sub),
            "--output_dir",
            str(out),
            "--timeout_s",
            "2",
        ]
    )
    assert rc == 0
    report = json.loads((out / "eval_generation.json").read_text())
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert report["q_binary"] == str(q) and report["parses"] == {}
    assert all(s["how"] == "executed" for s in samples)
    assert [s["passed"] for s in samples] == [True] * 4 + [False] * 4
    assert samples[-1]["detail"] == "timeout" and samples[-2]["detail"].endswith(": 'type")
    assert report["pass_at_k"]["overall"]["pass@1"] == pytest.approx(4 / 8)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    recs = _records()[:2]
    good = _preds(tmp_path / "p.jsonl", [(r["id"], r["completion"]) for r in recs])
    cases = {
        "unknown id": (
            ["--predictions", str(_preds(tmp_path / "x.jsonl", [("nope", "x")]))],
            "id 'nope' is not in --eval_file",
        ),
        "k above samples": (["--model", str(tmp_path), "--k", "1,5"], "--k 1,5"),
        "greedy samples": (
            ["--model", str(tmp_path), "--samples", "4", "--k", "1"],
            "needs --temperature > 0",
        ),
        "no manifest": (["--model", str(tmp_path)], "no manifest.json naming the prompt format"),
        "not a q binary": (
            ["--predictions", str(good), "--q_binary", str(tmp_path / "q")],
            "not an executable file",
        ),
    }
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for name, (argv, expected) in cases.items():
        rc = eval_main([*argv, "--eval_file", str(sub), "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and expected in err and "\n" not in err, (name, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.multirank
def test_tiny_model_end_to_end_picks_a_checkpoint_for_rl(trained, tmp_path, capsys):
    """The trained tiny run, with checkpoint-8 consolidated too: answers generated in its prompt
    format, scored, a table of eval loss beside pass@1, and best_checkpoint.json."""
    from trainer.offline.consolidate import consolidate

    src, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src / "logs", run / "logs")
    for step in (8, 16):
        tag = src / "checkpoints" / f"checkpoint-{step}"
        dest = run / "checkpoints" / f"checkpoint-{step}" / "consolidated"
        if step == 16:
            shutil.copytree(tag / "consolidated", dest)
        else:
            consolidate(tag, dest)
    recs = _records("q2py")[:3]
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "ev"
    rc = eval_main(
        [
            "--checkpoints",
            str(run),
            "--eval_file",
            str(sub),
            "--output_dir",
            str(out),
            "--max_new_tokens",
            "24",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    losses = {
        r["step"]: r["eval_loss"]
        for r in json.loads((run / "logs" / "eval_results.json").read_text())["history"]
    }
    pass1 = {}
    for step in (8, 16):
        report = json.loads((out / f"checkpoint-{step}" / "eval_generation.json").read_text())
        assert report["prompt_format"] == "raw" and report["engine"] == "transformers"
        assert report["samples"] == {"executed": 3, "linted": 0}
        lines = (out / f"checkpoint-{step}" / "samples.jsonl").read_text().splitlines()
        samples = [json.loads(x) for x in lines]
        assert [x["id"] for x in samples] == [r["id"] for r in recs]
        pass1[step] = report["pass_at_k"]["overall"]["pass@1"]
        assert pass1[step] == sum(x["passed"] for x in samples) / 3
        row = next(x for x in text.splitlines() if x.split()[:1] == [str(step)])
        assert f"{losses[step]:.4f}" in row and f"pass@1 {pass1[step]:.3f}" in row
    best = json.loads((run / "best_checkpoint.json").read_text())
    want = max((8, 16), key=lambda st: (pass1[st], -losses[st], -st))
    assert best["step"] == want and best["criterion"] == "pass@1 (executed)"
    assert Path(best["path"]).is_dir() and best["eval_loss"] == losses[want]
    # Left-padded batches generate what one prompt at a time does (greedy).
    from argparse import Namespace

    from trainer.evaluation.cli import completions_from_model

    args = Namespace(prompt_format=None, samples=1, temperature=0.0, max_new_tokens=24, seed=1)
    model = run / "checkpoints" / "checkpoint-16" / "consolidated"
    one, _ = completions_from_model(model, recs, Namespace(**vars(args), batch_size=1))
    three, info = completions_from_model(model, recs, Namespace(**vars(args), batch_size=3))
    manifest = json.loads((model / "manifest.json").read_text())
    assert one == three  # and generation stops first on the end token training taught:
    assert info["stop_token_ids"][0] == manifest["end_tokens"][0]["id"]
