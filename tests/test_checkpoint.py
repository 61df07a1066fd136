"""Checkpoint bookkeeping without a launcher: completeness, resume choice, pruning."""

from __future__ import annotations

import json

import pytest

from trainer.checkpoint import (
    COMPLETE,
    TrainerState,
    complete_checkpoints,
    find_resume_point,
    prune,
)
from trainer.config import ConfigError, parse_run_config


def _fake_run(out, steps, incomplete=()):
    root = out / "checkpoints"
    for s in steps:
        d = root / f"checkpoint-{s}"
        d.mkdir(parents=True)
        if s not in incomplete:
            (d / COMPLETE).write_text(json.dumps({"step": s, "world_size": 2}))
    (root / "latest").write_text(f"checkpoint-{max(s for s in steps if s not in incomplete)}")
    return root


def _cfg(out, *extra):
    return parse_run_config(["--model_size", "tiny", "--output_dir", str(out), *extra])


def test_auto_takes_newest_complete_and_reports_incomplete(tmp_path):
    _fake_run(tmp_path, [10, 20, 30], incomplete=[30])
    point = find_resume_point(_cfg(tmp_path))
    assert point.tag_dir.name == "checkpoint-20" and point.world_size == 2
    assert point.skipped == ["checkpoint-30"]


def test_none_refuses_existing_run_unless_overwrite(tmp_path):
    _fake_run(tmp_path, [10])
    with pytest.raises(ConfigError, match="--resume none: .* already holds checkpoints"):
        find_resume_point(_cfg(tmp_path, "--resume", "none"))
    assert find_resume_point(_cfg(tmp_path, "--resume", "none", "--overwrite")) is None


def test_explicit_path_must_be_complete(tmp_path):
    root = _fake_run(tmp_path, [10, 20], incomplete=[20])
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_resume_point(_cfg(tmp_path, "--resume", str(root / "checkpoint-20")))
    point = find_resume_point(_cfg(tmp_path, "--resume", str(root / "checkpoint-10")))
    assert point.tag_dir == root / "checkpoint-10"


def test_going_back_past_newer_checkpoints_is_refused(tmp_path):
    root = _fake_run(tmp_path, [10, 20])
    with pytest.raises(ConfigError, match=r"newer checkpoints \['checkpoint-20'\] exist"):
        find_resume_point(_cfg(tmp_path, "--resume", str(root / "checkpoint-10")))


def test_prune_keeps_last_k_and_the_best(tmp_path):
    root = _fake_run(tmp_path, [10, 20, 30, 40, 50], incomplete=[50])
    state = TrainerState(step=40, eval_history=[
        {"step": 10, "eval_loss": 3.0}, {"step": 20, "eval_loss": 1.0},
        {"step": 30, "eval_loss": 2.0}, {"step": 40, "eval_loss": 2.5}])
    removed = prune(tmp_path, keep_last=2, keep_best=True, state=state)
    assert removed == ["checkpoint-10"]
    assert [p.name for p in complete_checkpoints(root)] == ["checkpoint-20", "checkpoint-30",
                                                          "checkpoint-40"]
    assert (root / "checkpoint-50").is_dir()  # incomplete ones are not ours to judge here
    assert prune(tmp_path, keep_last=0, keep_best=False, state=state) == []


def _info(fmt, ends=(2,)):
    return {"prompt_format": fmt, "end_tokens": [{"id": t} for t in ends]}


def test_resume_refuses_another_prompt_format_or_end_token(tmp_path):
    from trainer.checkpoint import check_format

    _fake_run(tmp_path, [10])
    marker = tmp_path / "checkpoints" / "checkpoint-10" / COMPLETE
    # Written before formats were recorded: every run then used the chat template.
    old = find_resume_point(_cfg(tmp_path))
    check_format(old, _info("chat"), "chat")
    with pytest.raises(ConfigError, match=r"trained in the chat prompt format, this run would "
                                          r"train raw \(--prompt_format auto picks it"):
        check_format(old, _info("raw"), "auto")
    marker.write_text(json.dumps({"step": 10, "world_size": 2, "data_format": {
        "prompt_format": "raw", "end_tokens": [0]}}))
    point = find_resume_point(_cfg(tmp_path))
    check_format(point, _info("raw", [0]), "auto")
    with pytest.raises(ConfigError, match="pass --prompt_format raw to continue it"):
        check_format(point, _info("chat", [2]), "chat")
    with pytest.raises(ConfigError, match=r"end with token\(s\) \[0\], this run's"):
        check_format(point, _info("raw", [2]), "raw")
