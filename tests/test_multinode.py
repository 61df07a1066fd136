"""Multi-node behaviour on one machine (loopback only): preflight checks and a dead rank.

Two per-node launchers (`deepspeed --hostfile H --no_ssh --node_rank N`) make a 2-node job, the
way srun runs one launcher per node on a cluster. The exact-resume test across two such nodes
lives with the other resume tests (tests/test_resume.py).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import EVAL_SMALL, kill_all, start_two_nodes, two_nodes

pytestmark = pytest.mark.multirank


def _tiny(out: Path | str, *extra: str) -> list[str]:
    return [
        "--model_size",
        "tiny",
        "--max_seq_length",
        "512",
        "--output_dir",
        str(out),
        "--max_steps",
        "400",
        "--save_steps",
        "1000",
        "--eval_steps",
        "1000",
        "--logging_steps",
        "1",
        *extra,
    ]


def test_output_dir_not_shared_by_the_nodes_fails_in_seconds(tmp_path):
    """A relative --output_dir resolved in a different directory on each node stands for a
    node-local path: rank 0 cannot see rank 1's probe file."""
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for d in cwds:
        d.mkdir()
    t0 = time.time()
    results = two_nodes(tmp_path, "launch/train.py", _tiny("run"), cwds=cwds, timeout=180)
    assert time.time() - t0 < 120
    for res in results:
        assert res.returncode == 2, res.stdout[-3000:]
    lines = [ln for ln in results[0].stdout.splitlines() if ln.startswith("qsft: ")]
    assert len(lines) == 1, results[0].stdout[-3000:]
    assert "cannot see files written by rank 1" in lines[0] and "shared" in lines[0]
    assert not (cwds[0] / "run" / "checkpoints").exists()  # nothing loaded, nothing written


def test_input_only_one_node_can_read_fails_on_every_rank_naming_it(tmp_path):
    """--train_file given relative: present under node0's directory, missing under node1's."""
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for d in cwds:
        d.mkdir()
    src = Path(__file__).resolve().parent.parent / "trainer" / "assets" / "q_sft_train.jsonl"
    (cwds[0] / "train.jsonl").write_text(src.read_text())
    results = two_nodes(
        tmp_path,
        "launch/train.py",
        _tiny(tmp_path / "run", "--train_file", "train.jsonl"),
        cwds=cwds,
        timeout=180,
    )
    for res in results:
        assert res.returncode == 2, res.stdout[-3000:]
    line = [ln for ln in results[0].stdout.splitlines() if ln.startswith("qsft: ")]
    assert len(line) == 1 and "rank 1 on" in line[0] and "train.jsonl" in line[0], line


def test_a_node_local_data_cache_is_built_once_on_each_node(tmp_path):
    """--data_cache_dir given relative: a different directory on each node, as a node-local
    disk would be; each node's first rank tokenizes into its own, and the job trains."""
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for d in cwds:
        d.mkdir()
    assets = Path(__file__).resolve().parent.parent / "trainer" / "assets"
    args = _tiny(
        tmp_path / "run",
        "--data_cache_dir",
        "cache",
        "--train_file",
        str(assets / "q_sft_train.jsonl"),
        "--eval_file",
        str(EVAL_SMALL),
    )
    args[args.index("--max_steps") + 1] = "2"
    results = two_nodes(tmp_path, "launch/train.py", args, cwds=cwds, timeout=300)
    for res in results:
        assert res.returncode == 0, res.stdout[-3000:]
    for node, res in zip(cwds, results, strict=True):
        assert res.stdout.count("qsft: tokenizing ") == 2, res.stdout[-3000:]  # train + eval
        assert len(list((node / "cache").iterdir())) == 2


def test_nodes_with_different_copies_of_the_training_data_stop_before_training(tmp_path):
    """Relative --train_file and --data_cache_dir: each node reads and caches its own copy;
    copies that differ are one error on every rank, not two models trained on other data."""
    cwds = (tmp_path / "node0", tmp_path / "node1")
    src = (
        (Path(__file__).resolve().parent.parent / "trainer" / "assets" / "q_sft_train.jsonl")
        .read_text()
        .splitlines()
    )
    for d, lines in zip(cwds, (src[:100], src[100:200]), strict=True):
        d.mkdir()
        (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    results = two_nodes(
        tmp_path,
        "launch/train.py",
        _tiny(tmp_path / "run", "--train_file", "train.jsonl", "--data_cache_dir", "cache"),
        cwds=cwds,
        timeout=180,
    )
    for res in results:
        assert res.returncode == 2, res.stdout[-3000:]
    line = [ln for ln in results[0].stdout.splitlines() if ln.startswith("qsft: error")]
    assert len(line) == 1 and "training files differ" in line[0], results[0].stdout[-3000:]


def _rank_of(node) -> psutil.Process:
    for p in psutil.Process(node.pid).children(recursive=True):
        cmd = " ".join(p.cmdline())
        if "launch/train.py" in cmd and "deepspeed.launcher" not in cmd:
            return p
    raise AssertionError("no rank process")


def test_a_dead_rank_on_another_node_stops_the_job_naming_it(tmp_path):
    out = tmp_path / "run"
    nodes = start_two_nodes(tmp_path, "launch/train.py", _tiny(out, "--rank_timeout_s", "8"))
    metrics = out / "logs" / "metrics.jsonl"
    t0 = time.time()
    while not (
        metrics.exists() and any("loss" in json.loads(x) for x in metrics.read_text().splitlines())
    ):
        assert nodes[0].poll() is None and time.time() - t0 < 240, "training did not start"
        time.sleep(0.2)
    _rank_of(nodes[1]).send_signal(signal.SIGKILL)
    killed = time.time()
    try:
        text, _ = nodes[0].communicate(timeout=90)
    finally:
        kill_all(nodes)
    assert nodes[0].returncode != 0
    assert time.time() - killed < 8 + 30  # the timeout, a few heartbeats and the launcher
    assert "rank 1 on" in text and "no heartbeat" in text, text[-3000:]


def test_a_rank_failing_with_an_error_stops_the_other_node_at_once_naming_it(tmp_path):
    """Node 1's rank raises at step 3 (fault injection); node 0 must not wait for a timeout."""
    out = tmp_path / "run"
    nodes = start_two_nodes(
        tmp_path,
        "launch/train.py",
        _tiny(out, "--rank_timeout_s", "120"),
        envs=(None, {"QSFT_TEST_RAISE_AT_STEP": "3"}),
    )
    ended: dict[int, float] = {}
    t0 = time.time()
    try:
        while len(ended) < 2 and time.time() - t0 < 240:
            for n, node in enumerate(nodes):
                if n not in ended and node.poll() is not None:
                    ended[n] = time.time()
            time.sleep(0.2)
        text = nodes[0].communicate(timeout=30)[0]
    finally:
        kill_all(nodes)
    assert len(ended) == 2 and nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert ended[0] - ended[1] < 30  # told at once: no waiting out --rank_timeout_s 120
    line = [ln for ln in text.splitlines() if "stopping:" in ln]
    assert line and "rank 1 on" in line[0] and "injected failure at step 3" in line[0], text[-3000:]
    steps = [
        json.loads(x).get("step", 0)
        for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(steps) <= 3  # nobody trained on past the failure
