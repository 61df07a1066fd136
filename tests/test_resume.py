"""Crash-safe checkpoints and exact resume, through the real launcher with 2 CPU ranks.

The reference is one uninterrupted 12-step run (2 ranks, micro 2 x accumulation 2, a
checkpoint at step 6 and 12). Every interrupted run must reproduce its per-step losses, the
examples each step trained on, and its final weights — bit for bit on the same world size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EVAL_SMALL, launch, start

pytestmark = pytest.mark.multirank

STEPS, SAVE = 12, 6


def _args(out: Path, nproc: int = 2) -> list[str]:
    accum = 4 // nproc  # the same global batch (8) on 1 or 2 ranks
    return [
        "--model_size",
        "tiny",
        "--max_seq_length",
        "512",
        "--output_dir",
        str(out),
        "--eval_file",
        str(EVAL_SMALL),
        "--max_steps",
        str(STEPS),
        "--save_steps",
        str(SAVE),
        "--eval_steps",
        "100",
        "--logging_steps",
        "1",
        "--batch_size",
        "2",
        "--gradient_accumulation_steps",
        str(accum),
    ]


def _run(tmp: Path, out: Path, nproc: int = 2, env: dict | None = None, ok: bool = True):
    res = launch("launch/train.py", _args(out, nproc), nproc=nproc, tmp=tmp, env=env)
    if ok:
        assert res.returncode == 0, res.stdout[-4000:]
    return res


def _last_per_step(path: Path, key: str) -> dict[int, object]:
    """The last record per step: a resumed run logs again the steps it redoes."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def _losses(out: Path) -> dict[int, float]:
    return _last_per_step(out / "logs" / "metrics.jsonl", "loss")


def _samples(out: Path) -> dict[int, list[int]]:
    return _last_per_step(out / "logs" / "data_order.jsonl", "samples")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(
        out / "checkpoints" / f"checkpoint-{STEPS}" / "consolidated" / "model.safetensors"
    )


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _assert_same_run(out: Path, ref: Path, from_step: int) -> None:
    ref_losses, losses = _losses(ref), _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(from_step + 1, STEPS + 1):
        assert losses[step] == ref_losses[step], step  # bit-exact, not approximately
    assert _samples(out) == _samples(ref)  # no example skipped or repeated
    ref_w, w = _weights(ref), _weights(out)
    assert w.keys() == ref_w.keys()
    for k in w:
        assert torch.equal(w[k], ref_w[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    _run(tmp, tmp / "run")
    return tmp / "run"


def _wait_for(predicate, proc, timeout: float = 300) -> None:
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, "timed out waiting"
        time.sleep(0.1)


def _kill(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def test_sigkill_after_a_checkpoint_resumes_exactly(reference, tmp_path):
    out = tmp_path / "run"
    proc = start("launch/train.py", _args(out), nproc=2, tmp=tmp_path)
    _wait_for(lambda: (out / "checkpoints" / f"checkpoint-{SAVE}" / "COMPLETE").exists(), proc)
    # Somewhere in steps 7..9: a new moment each run, reproducible from the printed seed.
    seed = int(os.environ.get("QSFT_TEST_SEED", random.randrange(2**32)))
    delay = random.Random(seed).uniform(0.0, 1.5)
    print(f"SIGKILL {delay:.3f}s after checkpoint-{SAVE} (rerun it: QSFT_TEST_SEED={seed})")
    time.sleep(delay)
    _kill(proc)
    assert _latest(out) == f"checkpoint-{SAVE}"
    assert not (out / "checkpoints" / f"checkpoint-{STEPS}" / "COMPLETE").exists()
    res = _run(tmp_path, out)
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{SAVE}'} at step {SAVE}" in (
        res.stdout
    )
    # The restart maps the data the first launch tokenized (the cache in the output dir).
    assert "qsft: tokenizing" not in res.stdout and "tokenized earlier" in res.stdout
    _assert_same_run(out, reference, SAVE)
    events = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": SAVE, "tag": f"checkpoint-{SAVE}", "world_size": 2} in (
        events
    )


def test_sigkill_while_saving_keeps_the_previous_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    res = _run(tmp_path, out, env={"QSFT_TEST_KILL_IN_SAVE_AT_STEP": str(STEPS)}, ok=False)
    assert res.returncode != 0
    broken = out / "checkpoints" / f"checkpoint-{STEPS}"
    assert (
        broken.is_dir()
        and list(broken.glob("zero_pp_rank_*"))
        and not (broken / "COMPLETE").exists()
    )
    assert _latest(out) == f"checkpoint-{SAVE}"
    res = _run(tmp_path, out)
    assert f"ignoring checkpoint-{STEPS}: incomplete" in res.stdout
    assert f"at step {SAVE}" in res.stdout
    _assert_same_run(out, reference, SAVE)


def _rank_processes(proc) -> list[psutil.Process]:
    kids = psutil.Process(proc.pid).children(recursive=True)
    return [
        p
        for p in kids
        if "launch/train.py" in " ".join(p.cmdline())
        and "deepspeed.launcher" not in " ".join(p.cmdline())
    ]


def _wait_for_step(out: Path, proc, step: int) -> None:
    metrics = out / "logs" / "metrics.jsonl"
    _wait_for(
        lambda: (
            metrics.exists()
            and any(json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines())
        ),
        proc,
    )


def test_sigterm_to_the_ranks_saves_exits_0_and_resumes_exactly(reference, tmp_path):
    out = tmp_path / "run"
    proc = start("launch/train.py", _args(out), nproc=2, tmp=tmp_path)
    _wait_for_step(out, proc, 2)
    t0 = time.time()
    for p in _rank_processes(proc):  # what Kubernetes, or `pkill -TERM -f launch/train.py`, does
        p.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-3000:]
    assert time.time() - t0 < 30  # one optimizer step + one save, here well under a second each
    stopped = int(_latest(out).split("-")[1])
    assert 2 <= stopped < STEPS and f"stopped at step {stopped} (SIGTERM)" in text
    _run(tmp_path, out)
    _assert_same_run(out, reference, stopped)


def test_sigterm_to_every_process_like_slurm_still_saves(tmp_path):
    out = tmp_path / "run"
    proc = start("launch/train.py", _args(out), nproc=2, tmp=tmp_path)
    _wait_for_step(out, proc, 2)
    os.killpg(proc.pid, signal.SIGTERM)  # runner, DeepSpeed's per-node launcher and ranks
    text, _ = proc.communicate(timeout=120)
    stopped = int(_latest(out).split("-")[1])
    assert 2 <= stopped < STEPS, text[-3000:]
    assert (out / "checkpoints" / f"checkpoint-{stopped}" / "COMPLETE").exists()
    assert f"stopped at step {stopped} (SIGTERM)" in (out / "logs" / "training_log.txt").read_text()


def test_stop_file_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = start("launch/train.py", _args(out), nproc=2, tmp=tmp_path)
    _wait_for_step(out, proc, 2)
    (out / "STOP").touch()
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-3000:]
    stopped = int(_latest(out).split("-")[1])
    assert stopped < STEPS and "STOP exists" in text
    assert not (out / "STOP").exists()  # consumed, so that a restart does not stop at once


def _copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        src_run / "checkpoints" / f"checkpoint-{step}",
        dst_run / "checkpoints" / f"checkpoint-{step}",
        ignore=shutil.ignore_patterns("consolidated"),
    )


# Changing the number of ranks changes the order of floating-point reductions only: 1 and 2
# ranks on the same global batch give losses within ~1e-7 relative over 12 steps here. Without
# the workaround in checkpoint.resume._unshare_adam_steps the elastic resume was off by 1e-4.
ELASTIC_RTOL = 1e-6


@pytest.mark.parametrize("src_ranks,dst_ranks", [(2, 1), (1, 2)])
def test_elastic_resume_on_another_number_of_ranks(reference, tmp_path, src_ranks, dst_ranks):
    if src_ranks == 2:
        src = reference
    else:  # a 1-rank run up to its first checkpoint (stopped there: the rest is not needed)
        src = tmp_path / "src"
        proc = start("launch/train.py", _args(src, 1), nproc=1, tmp=tmp_path)
        _wait_for(lambda: (src / "checkpoints" / f"checkpoint-{SAVE}" / "COMPLETE").exists(), proc)
        _kill(proc)
    out = tmp_path / "run"
    _copy_checkpoint(src, SAVE, out)
    res = _run(tmp_path, out, nproc=dst_ranks)
    assert f"saved by {src_ranks} ranks, now {dst_ranks}" in res.stdout
    # Against the uninterrupted 2-rank run: 1 and 2 ranks agree to ~1e-7 (see above).
    ref, got = _losses(reference), _losses(out)
    for step in range(SAVE + 1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=ELASTIC_RTOL), step
    later = _samples(out)
    assert all(later[s] == _samples(reference)[s] for s in range(SAVE + 1, STEPS + 1))


def test_two_nodes_on_loopback_train_save_and_resume_like_one_node(reference, tmp_path):
    """Two per-node launchers (--no_ssh --node_rank 0/1, a hostfile of two 1-slot hosts), killed
    after the first checkpoint and started again: the same losses, data order and weights as
    the single-node 2-rank reference, bit for bit."""
    from tests.conftest import start_two_nodes, two_nodes

    out = tmp_path / "run"
    nodes = start_two_nodes(tmp_path, "launch/train.py", _args(out))
    _wait_for(lambda: (out / "checkpoints" / f"checkpoint-{SAVE}" / "COMPLETE").exists(), nodes[0])
    logs = []
    for node in nodes:
        os.killpg(node.pid, signal.SIGKILL)
        logs.append(node.communicate(timeout=60)[0])
    # Each launcher started only its own node's rank of a 2-rank world.
    assert "nnodes=2, num_local_procs=1, node_rank=0" in logs[0], logs[0][-2000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in logs[1], logs[1][-2000:]
    assert "world 2," in (out / "logs" / "training_log.txt").read_text()

    results = two_nodes(tmp_path, "launch/train.py", _args(out))
    for res in results:
        assert res.returncode == 0, res.stdout[-3000:]
    assert "dist_world_size=2" in results[1].stdout
    assert f"at step {SAVE}" in results[0].stdout
    _assert_same_run(out, reference, 0)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_and_resumes_exactly(
    reference, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shard = (
        out / "checkpoints" / f"checkpoint-{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    with open(shard, "r+b") as f:  # what a full disk or a killed copy leaves behind
        f.truncate(shard.stat().st_size // 2)
    res = _run(tmp_path, out)
    assert f"ignoring checkpoint-{STEPS} is damaged ({shard}: " in res.stdout
    assert f"falling back to checkpoint-{SAVE}" in res.stdout
    _assert_same_run(out, reference, SAVE)


def test_resuming_with_inputs_that_change_the_data_stream_is_refused(reference, tmp_path):
    out = tmp_path / "run"
    _copy_checkpoint(reference, SAVE, out)
    res = launch(
        "launch/train.py", [*_args(out), "--seed", "7", "--batch_size", "1"], nproc=2, tmp=tmp_path
    )
    assert res.returncode == 2, res.stdout[-3000:]
    line = [x for x in res.stdout.splitlines() if "qsft: error" in x]
    assert len(line) == 1 and "--resume_allow_changes" in line[0]
    assert "was written with other inputs: seed 42 -> 7; global_batch 8 -> 4" in line[0]
