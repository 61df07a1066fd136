"""Save and resume: DeepSpeed's engine checkpoint plus the trainer's own state.

Layout (DESIGN.md): OUTPUT_DIR/checkpoints/ is a standard DeepSpeed checkpoint root with `latest`,
DeepSpeed's `zero_to_fp32.py` and one `checkpoint-N/` tag directory per save.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer import dist
from trainer.config import ConfigError, RunConfig

STATE_KEY = "qsft_trainer_state"


@dataclass
class TrainerState:
    """What the loop needs, beyond the engine, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done on each rank
    consumed_samples: int = 0  # examples consumed over all ranks
    tokens_seen: int = 0  # non-padding tokens over all ranks
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    wandb_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"checkpoint-{step}"


def find_resume_tag(cfg: RunConfig) -> tuple[Path, str] | None:
    """Where to resume from, per --resume; raises ConfigError if the run must not start.

    Called before the process group exists, so it only reads files.
    """
    root = checkpoint_root(cfg.output_dir)
    if cfg.resume == "none":
        if root.is_dir() and any(root.glob("checkpoint-*")) and not cfg.overwrite:
            raise ConfigError(f"--resume none: {root} already holds checkpoints; pass "
                              f"--overwrite to replace the run or --resume auto to continue it")
        return None
    if cfg.resume == "auto":
        latest = root / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (root / tag).is_dir():
            raise ConfigError(f"{latest} names {tag!r}, which does not exist; fix or delete it")
        return root, tag
    path = Path(cfg.resume)
    return path.parent, path.name


def clear_previous_run(output_dir: Path) -> None:
    """--resume none --overwrite: remove what an earlier run wrote (rank 0, then barrier)."""
    if dist.is_main():
        for name in ("checkpoints", "logs", "config.yaml"):
            p = Path(output_dir) / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    dist.barrier()


def save(engine: Any, output_dir: Path, state: TrainerState) -> tuple[Path, float, int]:
    """Save a checkpoint on every rank (a collective); returns (tag dir, seconds, bytes)."""
    root, tag = checkpoint_root(output_dir), tag_for(state.step)
    t0 = time.perf_counter()
    engine.save_checkpoint(str(root), tag=tag, client_state={STATE_KEY: state.state_dict()})
    dist.barrier()
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (root / tag).rglob("*") if f.is_file())
    return root / tag, seconds, size


def load(engine: Any, root: Path, tag: str, state: TrainerState) -> None:
    """Load engine + trainer state from root/tag on every rank."""
    path, client = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None or STATE_KEY not in (client or {}):
        raise RuntimeError(f"{root / tag}: not a complete qsft checkpoint")
    state.load_state_dict(client[STATE_KEY])
