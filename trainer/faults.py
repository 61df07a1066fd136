"""What a long run meets besides kill and resume: full disks, non-finite or diverging losses,
and inputs that changed between a checkpoint and its resume.

Each check is cheap and decided the same way on every rank (from reduced values or shared
files), so a failing check stops every rank at the same point with the same one-line message:
:class:`RunError`, exit status 1 from launch/train.py (bad input stays ConfigError, status 2).
"""

from __future__ import annotations

import errno
import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import torch


class RunError(RuntimeError):
    """The run cannot go on (disk full, loss not finite, damaged checkpoint); one line.

    `everywhere`: every rank raises it at the same point, so rank 0 alone prints it.
    """

    def __init__(self, message: str, everywhere: bool = True):
        super().__init__(message)
        self.everywhere = everywhere


# ---------------------------------------------------------------------------------------------
# Disk

# Fault injection for the disk-full test: right before the save of this step, after the space
# check passed, rank 0 fills the output filesystem up to this many free bytes (as another job on
# a shared filesystem would).
FILL_ENV = "QSFT_TEST_FILL_DISK_AT_STEP"
FILL_LEAVE_BYTES = 4 << 20
FILLER = ".qsft-test-filler"


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem that holds `path` (or would)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def state_bytes(num_params: int) -> int:
    """A checkpoint's resumable state before one exists to measure: the planner's figure (ZeRO
    shards, 2 + 12 bytes/param: trainer.offline.plan), plus a little for trainer state and hf/."""
    return 14 * num_params + (4 << 20)


def space_error(path: Path, needed: int, free: int, what: str, fallback: str) -> str:
    return (
        f"{what}: {path} needs about {_mb(needed)}, {_mb(free)} free on its filesystem; {fallback}"
    )


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def is_out_of_space(error: BaseException, path: Path, needed: int) -> bool:
    """A failed write that means "disk full": ENOSPC/EDQUOT, or torch's zip writer error
    (`unexpected pos ...`), which hides the errno, while the filesystem has no room left."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(error, (OSError, RuntimeError)) and free_bytes(path) < needed


# Fault injection: "RANK:STEP" makes that rank alone fail writing its optimizer shard with
# ENOSPC at that step's save, while the other ranks succeed and wait in DeepSpeed's barrier.
FAIL_ENV = "QSFT_TEST_FAIL_SAVE_ON_RANK"


def fail_writes_for_test(engine: Any) -> None:
    ckpt_engine = engine.checkpoint_engine
    real_save = ckpt_engine.save

    def save(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if "optim_states" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
        return real_save(state_dict, path, *args, **kwargs)

    ckpt_engine.save = save


def fill_for_test(path: Path) -> None:
    free = free_bytes(path)
    with open(Path(path) / FILLER, "wb") as f:
        f.truncate(0)
        left = max(0, free - FILL_LEAVE_BYTES)
        block = b"\0" * (1 << 20)
        while left > 0:
            left -= f.write(block[: min(left, len(block))])


# ---------------------------------------------------------------------------------------------
# Non-finite and diverging losses


def non_finite(step: int, loss: float, grad_norm: float | None, last: str) -> str | None:
    """The stop line when the step's loss or gradient norm is NaN/Inf, else None."""
    bad = [f"loss {loss}"] if not math.isfinite(loss) else []
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"gradient norm {grad_norm}")
    if not bad:
        return None
    return (
        f"step {step}: {' and '.join(bad)}; training stopped before saving these weights. "
        f"Last complete checkpoint: {last} (--resume auto continues from it; lower "
        f"--learning_rate or set gradient_clipping in the DeepSpeed config first)"
    )


def local_weights_finite(engine: Any) -> bool:
    """This rank's share of the weights (ZeRO-3 partitions) holds no NaN/Inf; one sync."""
    flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def diverging(loss: float, history: list[dict[str, Any]], factor: float) -> dict | None:
    """The best earlier eval record when `loss` is more than `factor` times its loss."""
    if factor <= 0 or not history:
        return None
    best = min(history, key=lambda r: r["eval_loss"])
    return best if not loss <= factor * best["eval_loss"] else None


# ---------------------------------------------------------------------------------------------
# What defines the data stream and the schedule: recorded with each checkpoint, compared on resume

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def content_hash(paths: list[Path]) -> str:
    """sha256 over the files' bytes (and, inside a directory, their relative names): a file
    renamed or moved elsewhere hashes the same."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            if not f.exists():
                continue
            h.update(str(f.relative_to(path) if path.is_dir() else "").encode() + b"\0")
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest()[:16]


def fingerprint(cfg: Any, global_batch: int, train_hash: str | None = None) -> dict[str, Any]:
    """The inputs that decide which examples each step trains on and its learning rate.

    train_hash: content_hash(cfg.train_paths) when the caller has it already.
    """
    model_dir = Path(cfg.model_dir)
    # Contents, not paths: the same data moved elsewhere is the same stream.
    extra = {"train_weights": cfg.train_weights} if cfg.train_weights else {}
    return {
        **extra,
        "train_data": f"sha256:{train_hash or content_hash(cfg.train_paths)}",
        "tokenizer": f"sha256:{content_hash([model_dir / f for f in TOKENIZER_FILES])}",
        "seed": cfg.seed,
        "max_seq_length": cfg.max_seq_length,
        "packing": cfg.packing,
        "overlong": cfg.overlong,
        "global_batch": global_batch,
        "max_steps": cfg.max_steps,
        "warmup_steps": cfg.resolved_warmup_steps,
        "learning_rate": cfg.learning_rate,
    }


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key saved -> now' for each recorded input that differs."""
    return [f"{k} {saved[k]} -> {now.get(k)}" for k in saved if saved[k] != now.get(k)]
