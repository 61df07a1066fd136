"""Checkpoint bookkeeping without a launcher: completeness, resume choice, pruning."""

from __future__ import annotations

import json

import pytest

from trainer.checkpoint.layout import COMPLETE, complete_checkpoints
from trainer.checkpoint.resume import find_resume_point
from trainer.checkpoint.retention import prune
from trainer.checkpoint.writer import TrainerState
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


def _with_files(root, step, consolidated=False):
    """A tag with a shard, a trainer state and (optionally) a consolidated model; its marker
    records the files' sizes as the trainer's does."""
    d = root / f"checkpoint-{step}"
    (d / "hf").mkdir(parents=True, exist_ok=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"s" * 100)
    (d / "trainer_state.pt").write_bytes(b"t" * 10)
    if consolidated:
        (d / "consolidated").mkdir()
        (d / "consolidated" / "model.safetensors").write_bytes(b"m" * 50)
    files = {
        str(f.relative_to(d)): f.stat().st_size
        for f in d.rglob("*")
        if f.is_file() and "consolidated" not in f.parts
    }
    (d / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "files": files}))
    return d


def test_retention_keeps_every_model_but_only_the_newest_states(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40, 50):
        _with_files(root, step, consolidated=step != 50)  # 50: just saved, not yet consolidated
    (root / "latest").write_text("checkpoint-50")
    state = TrainerState(
        step=50,
        eval_history=[
            {"step": 10, "eval_loss": 3.0},
            {"step": 20, "eval_loss": 1.0},
            {"step": 30, "eval_loss": 2.0},
            {"step": 40, "eval_loss": 2.5},
        ],
    )
    changes = prune(tmp_path, keep_last=2, keep_best=True, state=state)
    assert changes == [
        "removed the resumable state of checkpoint-10, kept checkpoint-10/consolidated",
        "removed the resumable state of checkpoint-30, kept checkpoint-30/consolidated",
    ]
    # The newest two and the best keep their state; every model stays.
    assert [p.name for p in complete_checkpoints(root)] == [
        "checkpoint-20",
        "checkpoint-40",
        "checkpoint-50",
    ]
    assert sorted(f.name for f in (root / "checkpoint-10").iterdir()) == ["PRUNED", "consolidated"]
    assert all((root / f"checkpoint-{s}" / "consolidated").is_dir() for s in (10, 20, 30, 40))
    # Models beyond the newest K go too; a tag left with nothing is removed whole.
    changes = prune(tmp_path, keep_last=2, keep_best=False, state=state, keep_consolidated=1)
    assert changes == ["removed checkpoint-10", "removed checkpoint-20", "removed checkpoint-30"]
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-40", "checkpoint-50"]


def test_retention_keeps_states_it_promised_and_finishes_a_half_done_prune(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _with_files(root, step, consolidated=True)
    (root / "latest").write_text("checkpoint-30")
    # --keep_last 3 keeps every state, --keep_consolidated 1 only the newest model.
    assert prune(
        tmp_path, keep_last=3, keep_best=False, state=TrainerState(step=30), keep_consolidated=1
    ) == [
        "removed checkpoint-10/consolidated, kept its resumable state",
        "removed checkpoint-20/consolidated, kept its resumable state",
    ]
    assert len(complete_checkpoints(root)) == 3
    # A crash halfway through pruning 30's state: PRUNED written, a shard left behind. It is
    # no longer resumable, and the next prune removes what is left.
    (root / "checkpoint-40").mkdir()
    _with_files(root, 40, consolidated=True)
    (root / "latest").write_text("checkpoint-40")
    (root / "checkpoint-30" / "PRUNED").write_text("{}")
    assert [p.name for p in complete_checkpoints(root)][-1] == "checkpoint-40"
    assert "checkpoint-30" not in [p.name for p in complete_checkpoints(root)]
    changes = prune(tmp_path, keep_last=3, keep_best=False, state=TrainerState(step=40))
    assert changes == [
        "removed the resumable state of checkpoint-30, kept checkpoint-30/consolidated"
    ]
    assert sorted(f.name for f in (root / "checkpoint-30").iterdir()) == ["PRUNED", "consolidated"]


def test_retention_never_touches_latest_nor_a_state_still_to_be_consolidated(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _with_files(root, step)  # nothing consolidated (--consolidate final, or it failed)
    (root / "latest").write_text("checkpoint-10")  # e.g. the run went back to 10 explicitly
    state = TrainerState(step=30)
    # 20's consolidation was wanted and has not succeeded: its state is what a retry needs.
    changes = prune(
        tmp_path, keep_last=1, keep_best=False, state=state, wanted=lambda step: step == 20
    )
    assert changes == []
    assert [p.name for p in complete_checkpoints(root)] == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]
    assert prune(tmp_path, keep_last=1, keep_best=False, state=state) == [
        "removed checkpoint-20"
    ]  # not wanted: nothing worth keeping without its state
    assert prune(tmp_path, keep_last=0, keep_best=False, state=state) == []


def test_auto_falls_back_past_a_damaged_checkpoint_and_an_explicit_one_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        _with_files(root, step)
    shard = root / "checkpoint-20" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"s" * 60)  # truncated, as a full disk or a killed copy leaves it
    point = find_resume_point(_cfg(tmp_path))
    assert point.tag_dir.name == "checkpoint-10"
    assert point.damaged == [
        f"checkpoint-20 is damaged ({shard}: 60 bytes, the checkpoint recorded 100)"
    ]
    with pytest.raises(
        ConfigError,
        match=r"--resume .*checkpoint-20: damaged checkpoint: .*"
        r"optim_states.pt: 60 bytes",
    ):
        find_resume_point(_cfg(tmp_path, "--resume", str(root / "checkpoint-20")))
    (root / "checkpoint-10" / "trainer_state.pt").unlink()
    with pytest.raises(ConfigError, match=r"no usable checkpoint .*trainer_state.pt: missing"):
        find_resume_point(_cfg(tmp_path))


def test_resume_guard_names_each_changed_input(tmp_path):
    from trainer.checkpoint.resume import check_inputs
    from trainer.faults import fingerprint

    _fake_run(tmp_path, [10])
    cfg = _cfg(tmp_path)
    saved = fingerprint(cfg, global_batch=8)
    marker = tmp_path / "checkpoints" / "checkpoint-10" / COMPLETE
    marker.write_text(json.dumps({"step": 10, "world_size": 2, "fingerprint": saved}))
    point = find_resume_point(cfg)
    assert check_inputs(point, fingerprint(cfg, 8), allow=False) == []
    changed = _cfg(tmp_path, "--seed", "7", "--max_seq_length", "256", "--no-packing")
    with pytest.raises(
        ConfigError,
        match=r"other inputs: seed 42 -> 7; max_seq_length 1024 -> "
        r"256; packing True -> False; global_batch 8 -> 16 .*"
        r"--resume_allow_changes",
    ):
        check_inputs(point, fingerprint(changed, 16), allow=False)
    train = tmp_path / "train.jsonl"
    train.write_text(cfg.train_paths[0].read_text())
    same_content = _cfg(tmp_path, "--train_file", str(train), "--eval_file", str(cfg.eval_paths[0]))
    assert check_inputs(point, fingerprint(same_content, 8), allow=False) == []  # moved only
    train.write_text(train.read_text() + train.read_text().splitlines()[0] + "\n")
    diffs = check_inputs(point, fingerprint(same_content, 8), allow=True)  # logged, no error
    assert len(diffs) == 1 and diffs[0].startswith("train_data sha256:")


def test_trainer_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np
    import torch

    from trainer.checkpoint.resume import _set_rng_state, load_state_file
    from trainer.checkpoint.writer import _rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = _rng_state()
    path = tmp_path / "trainer_state.pt"
    torch.save({"state": TrainerState(step=3).state_dict(), "rng": [state]}, path)
    want = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(load_state_file(path)["rng"][0])  # weights_only=True inside
    assert (random.random(), np.random.rand(), torch.rand(1)) == want
    # Written before RNG states were tensors: numpy's arrays, and only they, are allowed.
    torch.save({"rng": [{"numpy": np.random.get_state()}]}, path)
    assert load_state_file(path)["rng"][0]["numpy"][0] == "MT19937"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="Unsupported global|WeightsUnpickler"):
        load_state_file(path)


def _info(fmt, ends=(2,)):
    return {"prompt_format": fmt, "end_tokens": [{"id": t} for t in ends]}


def test_resume_refuses_another_prompt_format_or_end_token(tmp_path):
    from trainer.checkpoint.resume import check_format

    _fake_run(tmp_path, [10])
    marker = tmp_path / "checkpoints" / "checkpoint-10" / COMPLETE
    # Written before formats were recorded: every run then used the chat template.
    old = find_resume_point(_cfg(tmp_path))
    check_format(old, _info("chat"), "chat")
    with pytest.raises(
        ConfigError,
        match=r"trained in the chat prompt format, this run would "
        r"train raw \(--prompt_format auto picks it",
    ):
        check_format(old, _info("raw"), "auto")
    marker.write_text(
        json.dumps(
            {
                "step": 10,
                "world_size": 2,
                "data_format": {"prompt_format": "raw", "end_tokens": [0]},
            }
        )
    )
    point = find_resume_point(_cfg(tmp_path))
    check_format(point, _info("raw", [0]), "auto")
    with pytest.raises(ConfigError, match="pass --prompt_format raw to continue it"):
        check_format(point, _info("chat", [2]), "chat")
    with pytest.raises(ConfigError, match=r"end with token\(s\) \[0\], this run's"):
        check_format(point, _info("raw", [2]), "raw")


def test_a_trainer_state_from_before_the_rename_still_loads(tmp_path):
    """Checkpoints written before December 2026 call the stream position consumed_samples."""
    import torch

    from trainer.checkpoint.resume import load_state_file

    old = {"step": 6, "micro_step": 12, "consumed_samples": 48, "examples_seen": 190}
    torch.save({"state": old}, tmp_path / "trainer_state.pt")
    state = TrainerState()
    state.load_state_dict(load_state_file(tmp_path / "trainer_state.pt")["state"])
    assert (state.step, state.consumed_units, state.examples_seen) == (6, 48, 190)
    assert "consumed_samples" not in state.state_dict() and not hasattr(state, "consumed_samples")
