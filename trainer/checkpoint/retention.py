"""What a run keeps: disk checks before saving, pruning old state, clearing a run.

Retention (`prune`): every consolidated model is kept, the resumable state (shards, trainer
state) only for the newest --keep_last checkpoints, the one `latest` names, and with --keep_best
the best-eval one; a checkpoint with nothing consolidated goes entirely once its state does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer import dist, faults
from trainer.checkpoint.layout import (
    COMPLETE,
    CONSOLIDATED,
    PRUNED,
    checkpoint_root,
    complete_checkpoints,
    read_marker,
    step_of,
    tag_for,
)
from trainer.checkpoint.writer import TrainerState, _atomic_write
from trainer.config import ConfigError, RunConfig
from trainer.shape import Shape


def last_checkpoint(cfg: RunConfig) -> str:
    root = checkpoint_root(cfg.output_dir)
    latest = root / "latest"
    return str(root / latest.read_text().strip()) if latest.is_file() else "none"


def wants_consolidation(cfg: RunConfig, step: int) -> bool:
    return cfg.consolidate == "every" or (cfg.consolidate == "final" and step == cfg.max_steps)


def check_disk_at_start(cfg: RunConfig, dtype: torch.dtype, resume_step: int | None) -> None:
    """Refuse to start when the output filesystem cannot hold one more checkpoint: the newest
    checkpoint's recorded size, or before any exists the planner's figure (ConfigError). Not
    when nothing will be saved (resumed at the last step); with --overwrite the old run's
    checkpoints count as free."""
    if not cfg.save_every_n_steps or resume_step == cfg.max_steps:
        return
    root = checkpoint_root(cfg.output_dir)
    overwrite = cfg.resume == "none" and cfg.overwrite
    needed = checkpoint_needs(cfg, dtype, None, measured=not overwrite)
    free = faults.free_bytes(cfg.output_dir)
    if overwrite and root.is_dir():
        free += sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    if free < needed:
        raise ConfigError(
            faults.space_error(
                cfg.output_dir,
                needed,
                free,
                f"--output_dir {cfg.output_dir}: not enough disk for one checkpoint",
                "free space or choose another --output_dir",
            )
        )


def checkpoint_needs(
    cfg: RunConfig, dtype: torch.dtype, step: int | None, measured: bool = True
) -> int:
    """Bytes one more checkpoint takes: the newest checkpoint's state as its COMPLETE marker
    recorded it (not universal/ or a consolidation in progress), else the planner's estimate
    from the model's shape (14 bytes/param); plus the consolidated model when this save gets
    one (its manifest's figure, else parameters x the training dtype's size)."""
    config = json.loads((Path(cfg.model_dir) / "config.json").read_text())
    n = Shape.from_config(config).total_params()
    e = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    consolidates = cfg.consolidate == "every" or (
        cfg.consolidate == "final" and (step is None or step == cfg.max_steps)
    )
    state_b, model_b = faults.state_bytes(n), e * n
    done = complete_checkpoints(checkpoint_root(cfg.output_dir)) if measured else []
    if done:
        state_b = sum((read_marker(done[-1]) or {}).get("files", {}).values()) or state_b
        try:
            manifest = json.loads((done[-1] / CONSOLIDATED / "manifest.json").read_text())
            model_b = sum(f["bytes"] for f in manifest["files"].values())
        except (OSError, ValueError, KeyError):
            pass
    return state_b + (model_b if consolidates else 0)


def clear_previous_run(output_dir: Path) -> None:
    """--resume none --overwrite: remove what an earlier run wrote (rank 0, then barrier)."""
    if dist.is_main():
        for name in ("checkpoints", "logs", "config.yaml", "STOP"):
            p = Path(output_dir) / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    dist.barrier()


def prune(
    output_dir: Path,
    keep_last: int,
    keep_best: bool,
    state: TrainerState,
    keep_consolidated: int = 0,
    wanted: Any = lambda step: False,
) -> list[str]:
    """Apply the retention policy; returns one line per checkpoint changed. Rank 0 only, after
    `latest` names the new checkpoint.

    Resumable states beyond the newest `keep_last` (0 keeps all) go, except the one `latest`
    names, the best-eval one with `keep_best`, and one whose consolidation `wanted(step)` but
    has not succeeded (still running, queued, failed: its state is what a retry needs). A
    checkpoint keeps its consolidated/ model, unless beyond the newest `keep_consolidated`
    models (0 keeps all); one left with neither is removed whole. PRUNED is written first and
    overrides COMPLETE, so a crash halfway never leaves a tag that looks resumable without its
    files, and the next prune finishes the job.
    """
    if not dist.is_main():
        return []
    root = checkpoint_root(output_dir)
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    tags = sorted(
        (
            p
            for p in root.glob("checkpoint-*")
            if p.is_dir()
            and step_of(p.name) >= 0
            and any((p / m).exists() for m in (COMPLETE, PRUNED, CONSOLIDATED))
        ),
        key=lambda p: step_of(p.name),
    )
    saved = {step_of(p.name) for p in tags}
    evals = [r for r in state.eval_history if r["step"] in saved]
    best = tag_for(min(evals, key=lambda r: r["eval_loss"])["step"]) if evals else None
    spared = {latest} | ({best} if keep_best else set())
    resumable = [p for p in tags if _resumable(p)]
    keep_state = (
        {p.name for p in resumable[-keep_last:]} if keep_last > 0 else {p.name for p in resumable}
    )
    models = [p for p in tags if (p / CONSOLIDATED).is_dir()]
    keep_model = (
        {p.name for p in models[-keep_consolidated:]}
        if keep_consolidated > 0
        else {p.name for p in models}
    )
    changes = []
    for p in tags:
        has_model = (p / CONSOLIDATED).is_dir()
        if _resumable(p):
            drop_state = p.name not in keep_state | spared and (
                has_model or not wanted(step_of(p.name))
            )
        else:  # pruned before, or a crash left it half-pruned: nothing resumable to keep
            drop_state = any(i.name not in (CONSOLIDATED, PRUNED) for i in p.iterdir())
        drop_model = has_model and p.name not in keep_model | spared
        if not (drop_state or drop_model):
            continue
        state_gone = drop_state or not _resumable(p)
        if state_gone and (drop_model or not has_model):
            (p / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(p)
            changes.append(f"removed {p.name}")
            continue
        if drop_model:  # its state stays (within --keep_last): only the model goes
            shutil.rmtree(p / CONSOLIDATED)
            changes.append(f"removed {p.name}/{CONSOLIDATED}, kept its resumable state")
            continue
        _atomic_write(
            p / PRUNED,
            json.dumps(
                {
                    "step": step_of(p.name),
                    "kept": CONSOLIDATED,
                    "removed": "resumable state (ZeRO shards, trainer state)",
                }
            ),
        )
        (p / COMPLETE).unlink(missing_ok=True)
        for item in p.iterdir():
            if item.name not in (CONSOLIDATED, PRUNED):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        changes.append(f"removed the resumable state of {p.name}, kept {p.name}/{CONSOLIDATED}")
    return changes


def _resumable(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).exists() and not (tag_dir / PRUNED).exists()
