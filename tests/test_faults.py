"""Faults of long runs through the real launcher (2 CPU ranks): a full disk, a non-finite and a
diverging loss, a consolidation lost with a killed job; and the cheap checks behind them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import EVAL_SMALL, REPO, launch

ARGS = [
    "--model_size",
    "tiny",
    "--max_seq_length",
    "512",
    "--eval_steps",
    "100",
    "--eval_file",
    str(EVAL_SMALL),
]


def _train(tmp: Path, out: Path, *extra: str, env: dict | None = None):
    return launch(
        "launch/train.py", [*ARGS, "--output_dir", str(out), *extra], nproc=2, tmp=tmp, env=env
    )


@pytest.fixture
def small_fs(tmp_path):
    """A real small filesystem (tmpfs) of a given size, mounted under tmp_path."""
    mounted = []

    def make(mib: int) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(d)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.multirank
def test_too_small_filesystem_is_refused_at_start(small_fs, tmp_path):
    out = small_fs(40) / "run"  # one checkpoint of the tiny model: ~58 MiB by the planner
    res = _train(tmp_path, out, "--max_steps", "4", "--save_steps", "2")
    assert res.returncode == 2, res.stdout[-3000:]
    line = [x for x in res.stdout.splitlines() if "qsft: error" in x]
    assert len(line) == 1 and "not enough disk for one checkpoint" in line[0]
    assert "MiB free" in line[0]
    assert not (out / "checkpoints").exists()


@pytest.mark.multirank
def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_resume_works(small_fs, tmp_path):
    fs = small_fs(160)
    out = fs / "run"
    args = [
        "--max_steps",
        "6",
        "--save_steps",
        "2",
        "--logging_steps",
        "4",
        "--keep_last",
        "1",
        "--consolidate",
        "none",
    ]
    # Another job fills the disk right after the space check before the save of step 4.
    res = _train(tmp_path, out, *args, env={"QSFT_TEST_FILL_DISK_AT_STEP": "4"})
    assert res.returncode == 1, res.stdout[-3000:]
    errors = [x for x in res.stdout.splitlines() if "qsft: error" in x]
    assert len(errors) == 1, res.stdout[-3000:]
    assert "out of disk space saving checkpoint-4" in errors[0]
    assert "MiB free" in errors[0] and "the partial checkpoint-4 was removed" in errors[0]
    assert f"{out / 'checkpoints' / 'checkpoint-2'} is intact" in errors[0]
    assert "Traceback" not in res.stdout
    ckpts = out / "checkpoints"
    assert not (ckpts / "checkpoint-4").exists()  # nothing half-written left filling the disk
    assert (ckpts / "latest").read_text() == "checkpoint-2"
    # Saved at step 2 although --logging_steps is 4: the open window was logged first, so the
    # checkpoint's token count includes every step up to it.
    saved = torch.load(ckpts / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    records = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    at2 = [r for r in records if r.get("step") == 2 and "loss" in r]
    assert at2 and saved["state"]["tokens_seen"] == at2[0]["tokens_seen"] > 0

    (out / ".qsft-test-filler").unlink()  # space freed
    # Rank 1 alone fails to write (the other rank's save succeeds and waits in DeepSpeed's final
    # barrier): the ranks still meet, decide together and stop with the same line.
    longer = [*args, "--max_steps", "8", "--resume_allow_changes"]
    res = _train(tmp_path, out, *longer, env={"QSFT_TEST_FAIL_SAVE_ON_RANK": "1:4"})
    assert res.returncode == 1, res.stdout[-3000:]
    errors = [x for x in res.stdout.splitlines() if "qsft: error" in x]
    assert len(errors) == 1 and "out of disk space saving checkpoint-4" in errors[0]
    assert not (ckpts / "checkpoint-4").exists() and (ckpts / "latest").read_text() == (
        "checkpoint-2"
    )

    res = _train(tmp_path, out, *longer)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "resumed from" in res.stdout and "at step 2" in res.stdout
    assert "resuming with changed inputs (--resume_allow_changes): max_steps 6 -> 8" in (res.stdout)
    # --keep_last 1, nothing consolidated: only the newest checkpoint remains.
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-8"]
    summary = json.loads((out / "logs" / "summary.json").read_text())
    last = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert summary["tokens_seen"] == [r for r in last if "loss" in r][-1]["tokens_seen"]


@pytest.mark.multirank
def test_divergence_is_flagged_and_a_nan_loss_stops_before_any_save(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3_tiny.json").read_text())
    del ds["gradient_clipping"]  # clipping off and a high learning rate: the loss climbs
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    # The NaN comes at a save step: it must stop the run before that save.
    res = _train(
        tmp_path,
        out,
        "--ds_config",
        str(tmp_path / "ds.json"),
        "--learning_rate",
        "0.2",
        "--max_steps",
        "6",
        "--save_steps",
        "2",
        "--eval_steps",
        "2",
        "--logging_steps",
        "1",
        env={"QSFT_TEST_NAN_LOSS_AT_STEP": "4"},
    )
    assert res.returncode == 1, res.stdout[-3000:]
    assert "the run may be diverging (--divergence_factor 1.5)" in res.stdout
    evals = json.loads((out / "logs" / "eval_results.json").read_text())["history"]
    assert evals[0]["step"] == 0 and "diverged" not in evals[0]
    assert any(r.get("diverged") for r in evals[1:])
    errors = [x for x in res.stdout.splitlines() if "qsft: error" in x]
    assert len(errors) == 1 and "step 4: loss nan" in errors[0], res.stdout[-3000:]
    assert f"Last complete checkpoint: {out / 'checkpoints' / 'checkpoint-2'}" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2"
    ]  # nothing saved after the NaN
    assert "error: step 4: loss nan" in (out / "logs" / "training_log.txt").read_text()


@pytest.mark.multirank
def test_a_consolidation_lost_with_a_killed_job_is_redone_on_resume(trained, tmp_path):
    src, _ = trained
    out = tmp_path / "run"
    shutil.copytree(src, out)
    final = out / "checkpoints" / "checkpoint-16"
    shutil.rmtree(final / "consolidated")  # what a kill during the consolidation leaves
    (final / ".consolidated.tmp-1234").mkdir()
    res = launch(
        "launch/train.py",
        [
            "--model_size",
            "tiny",
            "--max_seq_length",
            "512",
            "--output_dir",
            str(out),
            "--max_steps",
            "16",
            "--save_steps",
            "8",
            "--eval_steps",
            "8",
            "--logging_steps",
            "4",
        ],
        nproc=2,
        tmp=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert "checkpoint-16 was never consolidated (the job stopped first)" in res.stdout
    manifest = json.loads((final / "consolidated" / "manifest.json").read_text())
    assert manifest["source_step"] == 16 and manifest["eval"]["best_step"] is not None
    assert not list(final.glob(".consolidated.tmp-*"))


def test_offline_consolidator_refuses_a_tag_without_complete(trained, tmp_path):
    from trainer.offline.consolidate import main

    src, _ = trained
    tag = tmp_path / "checkpoint-8"
    shutil.copytree(
        src / "checkpoints" / "checkpoint-8", tag, ignore=shutil.ignore_patterns("consolidated")
    )
    marker = (tag / "COMPLETE").read_text()
    (tag / "COMPLETE").unlink()
    assert main([str(tag), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
    assert main([str(tag), "--out", str(tmp_path / "c"), "--allow_incomplete"]) == 0
    (tag / "COMPLETE").write_text(marker)
    shard = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(1000)
    assert main([str(tag), "--out", str(tmp_path / "d")]) == 2  # sizes checked against it
    assert not (tmp_path / "d").exists()


def test_remote_code_needs_the_flag(tmp_path):
    from trainer.config import ConfigError
    from trainer.model import load_tokenizer

    model = tmp_path / "m"
    shutil.copytree(REPO / "trainer" / "assets" / "tiny_model", model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    assert load_tokenizer(model) is not None  # qwen2 is transformers' own: auto_map unused
    config["model_type"] = "evil"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError,
        match=r"config.json: needs custom code \(auto_map\) for a "
        r"class transformers does not have.*"
        r"--trust_remote_code",
    ):
        load_tokenizer(model)


def test_weight_check_sees_a_non_finite_value_in_any_partition():
    from types import SimpleNamespace

    from trainer.faults import local_weights_finite

    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    engine = SimpleNamespace(module=module)
    assert local_weights_finite(engine)
    shard = torch.ones(4)  # what ZeRO-3 keeps of a parameter on this rank
    module[1].weight.ds_tensor = shard
    shard[2] = float("inf")
    assert not local_weights_finite(engine)


def test_non_finite_and_divergence_rules():
    from trainer.faults import diverging, non_finite

    assert non_finite(5, 2.5, 1.0, "c") is None
    assert non_finite(5, 2.5, None, "c") is None  # fp16: DeepSpeed skips overflow steps itself
    assert "step 5: loss inf and gradient norm nan" in non_finite(
        5, float("inf"), float("nan"), "c"
    )
    history = [{"step": 0, "eval_loss": 8.0}, {"step": 10, "eval_loss": 2.0}]
    assert diverging(2.9, history, 1.5) is None
    assert diverging(3.1, history, 1.5)["step"] == 10
    assert diverging(float("nan"), history, 1.5) is not None
    assert diverging(100.0, history, 0) is None  # 0 turns the warning off
