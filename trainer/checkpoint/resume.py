"""Exact resume: which checkpoint, whether its inputs match, and loading it."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import dist, faults
from trainer.checkpoint.layout import (
    COMPLETE,
    CONSOLIDATED,
    PRUNED,
    STATE_FILE,
    UNIVERSAL,
    checkpoint_root,
    complete_checkpoints,
    read_marker,
    step_of,
    verify_files,
)
from trainer.checkpoint.writer import TrainerState, _atomic_write
from trainer.config import ConfigError, RunConfig
from trainer.faults import RunError


@dataclass
class ResumePoint:
    tag_dir: Path
    world_size: int  # ranks that wrote it
    skipped: list[str]  # newer tags that were not complete
    marker: dict[str, Any] = field(default_factory=dict)  # its COMPLETE file
    damaged: list[str] = field(default_factory=list)  # newer complete tags that failed checks


def find_resume_point(cfg: RunConfig) -> ResumePoint | None:
    """Where to resume from, per --resume; raises ConfigError if the run must not start.

    Called before the process group exists, so it only reads files. `--resume auto` takes the
    newest complete checkpoint whose files pass `verify_files`, reporting the damaged ones.
    """
    root = checkpoint_root(cfg.output_dir)
    if cfg.resume == "none":
        if complete_checkpoints(root) and not cfg.overwrite:
            raise ConfigError(
                f"--resume none: {root} already holds checkpoints; pass "
                f"--overwrite to replace the run or --resume auto to continue it"
            )
        return None
    damaged: list[str] = []
    if cfg.resume == "auto":
        done = complete_checkpoints(root)
        while done and (problem := verify_files(done[-1], read_marker(done[-1]) or {})):
            damaged.append(f"{done.pop().name} is damaged ({problem})")
        if not done:
            if damaged:
                raise ConfigError(
                    f"--resume auto: no usable checkpoint in {root}: "
                    f"{'; '.join(damaged)}; pass --resume none --overwrite to "
                    f"start over"
                )
            return None
        tag_dir = done[-1]
        skipped = sorted(
            (
                p.name
                for p in root.glob("checkpoint-*")
                if p.is_dir()
                and step_of(p.name) > step_of(tag_dir.name)
                and not any((p / m).exists() for m in (COMPLETE, PRUNED))
            ),
            key=step_of,
        )
    else:
        tag_dir, skipped = Path(cfg.resume), []
        if not read_marker(tag_dir):
            raise ConfigError(
                f"--resume {tag_dir}: not a complete checkpoint (no {COMPLETE} "
                f"marker); a save was interrupted there, or retention removed "
                f"its resumable state"
            )
        problem = verify_files(tag_dir, read_marker(tag_dir) or {})
        if problem:
            raise ConfigError(f"--resume {tag_dir}: damaged checkpoint: {problem}")
        # Pruned ones count: their consolidated models would be replaced on the way.
        newer = sorted(
            (
                p.name
                for p in root.glob("checkpoint-*")
                if p.is_dir()
                and step_of(p.name) > step_of(tag_dir.name)
                and any((p / m).exists() for m in (COMPLETE, PRUNED, CONSOLIDATED))
            ),
            key=step_of,
        )
        if newer and Path(tag_dir).resolve().parent == root.resolve():
            # They belong to another trajectory: --resume auto would later pick them up, and
            # --keep_last would count them. Going back in time is explicit.
            raise ConfigError(
                f"--resume {tag_dir}: newer checkpoints {newer} exist in {root}; "
                f"move them away or delete them before going back"
            )
    marker = read_marker(tag_dir)
    return ResumePoint(tag_dir, int(marker["world_size"]), skipped, marker, damaged)


def check_inputs(point: ResumePoint, now: dict[str, Any], allow: bool) -> list[str]:
    """Compare the checkpoint's input fingerprint with this run's; ConfigError on a difference
    unless `allow` (--resume_allow_changes). Returns the differences (to be logged)."""
    saved = point.marker.get("fingerprint")
    if not saved:
        return []  # written before fingerprints were recorded
    diffs = faults.differences(saved, now)
    if diffs and not allow:
        raise ConfigError(
            f"--resume: {point.tag_dir} was written with other inputs: "
            f"{'; '.join(diffs)} (they change the data stream or the learning-rate "
            f"schedule); pass --resume_allow_changes to continue anyway, or start "
            f"a new --output_dir"
        )
    return diffs


def check_format(point: ResumePoint, info: dict[str, Any], requested: str) -> None:
    """Refuse to continue a checkpoint in another prompt format or with other end tokens.

    The format decides what every later step trains on and which tokens the saved generation
    config stops on; a run continued in another one would end up with a model trained on both
    and a checkpoint that describes only the second. Checkpoints written before the format was
    recorded were all trained with the chat template.
    """
    saved = point.marker.get("data_format") or {"prompt_format": "chat"}
    if saved["prompt_format"] != info["prompt_format"]:
        how = (
            "--prompt_format auto picks it for this data"
            if requested == "auto"
            else f"--prompt_format {requested}"
        )
        raise ConfigError(
            f"--resume: {point.tag_dir} was trained in the {saved['prompt_format']} "
            f"prompt format, this run would train {info['prompt_format']} ({how}); "
            f"pass --prompt_format {saved['prompt_format']} to continue it, or "
            f"start a new --output_dir"
        )
    ends = [e["id"] for e in info["end_tokens"]]
    if "end_tokens" in saved and saved["end_tokens"] != ends:
        raise ConfigError(
            f"--resume: {point.tag_dir} taught answers to end with token(s) "
            f"{saved['end_tokens']}, this run's tokenizer and data end them with "
            f"{ends}; use the tokenizer it was trained with"
        )


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_state_file(path: Path) -> dict[str, Any]:
    """trainer_state.pt with weights_only=True. Files written before the RNG states were stored
    as tensors hold numpy arrays: exactly numpy's array-rebuilding globals are allowed for them."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        core = getattr(np, "_core", None) or np.core
        allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)


def prepare_universal(point: ResumePoint) -> Path:
    """Convert a tag to DeepSpeed's universal format (rank 0; once) for another world size."""
    out = point.tag_dir / UNIVERSAL
    if dist.is_main() and not read_marker(out):
        import subprocess
        import sys

        shutil.rmtree(out, ignore_errors=True)
        # DeepSpeed's converter in its own process: it forks worker pools, which is unsafe in a
        # process that holds a process group.
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(point.tag_dir),
                "--output_folder",
                str(out),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"ds_to_universal failed on {point.tag_dir}: {res.stderr.strip().splitlines()[-1:]}"
            )
        shutil.copy2(point.tag_dir / STATE_FILE, out / STATE_FILE)
        _atomic_write(out / COMPLETE, json.dumps({"from": point.tag_dir.name}))
    dist.barrier()
    return out


def _unshare_adam_steps(engine: Any) -> None:
    """Work around DeepSpeed 0.19.8's ZeRO-3 universal load, which gives every parameter group
    the *same* `step` tensor: torch's Adam increments it in place once per group, so with our
    two groups (decay / no decay) the bias correction ran two steps ahead after an elastic
    resume (losses off by 1e-4 after three steps instead of 1e-8). One tensor per group."""
    base = getattr(engine.optimizer, "optimizer", None)
    for st in getattr(base, "state", {}).values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def load(engine: Any, point: ResumePoint, state: TrainerState) -> None:
    """Load engine + trainer state on every rank, from the universal copy if the world differs.

    A file that passed the size check but does not load (damaged content) stops this rank with
    one line naming the checkpoint; the watchdog stops the others naming this rank.
    """
    tag_dir = point.tag_dir
    if point.world_size != dist.world_size():
        tag_dir = prepare_universal(point)
    try:
        path, _ = engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        saved = load_state_file(tag_dir / STATE_FILE)
    except Exception as e:  # noqa: BLE001 - torch/pickle/zip raise many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(
            f"{tag_dir}: cannot load this checkpoint ({type(e).__name__}: {first}); "
            f"it is damaged: move it out of {tag_dir.parent} and --resume auto takes "
            f"the previous complete one",
            everywhere=False,
        ) from None
    if path is None:
        raise RunError(f"{tag_dir}: DeepSpeed could not load this checkpoint", everywhere=False)
    if tag_dir.name == UNIVERSAL:
        _unshare_adam_steps(engine)
    state.load_state_dict(saved["state"])
    # Each rank continues its own random streams; on another world size rank r takes the
    # streams of saved rank r mod saved world size (dropout then differs, the data does not).
    _set_rng_state(saved["rng"][dist.rank() % len(saved["rng"])])
