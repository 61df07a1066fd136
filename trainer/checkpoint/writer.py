"""Crash-safe save: DeepSpeed's engine checkpoint plus the trainer's own state.

DeepSpeed's own save_checkpoint writes `latest` on rank 0 before its final barrier, so a crash
can leave `latest` naming a half-written tag. We save with its `latest` disabled, barrier, mark
the tag complete, then publish `latest` by rename: a crash at any moment leaves the previous
complete checkpoint as the one a restart uses. A save that fails on any rank (a full disk) is
removed whole, and the run stops with one line (trainer.faults.RunError). The files of a tag are
named in trainer.checkpoint.layout.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import dist, faults
from trainer.checkpoint.layout import (
    COMPLETE,
    EVAL_FILE,
    HF_SUBDIR,
    PROBE_FILE,
    STATE_FILE,
    STATE_KEY,
    checkpoint_root,
    tag_for,
)
from trainer.faults import RunError

# Fault injection for the crash tests: rank 0 SIGKILLs itself inside the save of this step,
# after the shards are written and before the checkpoint is marked complete.
FAULT_ENV = "QSFT_TEST_KILL_IN_SAVE_AT_STEP"


# Fields renamed since checkpoints were first written: old name -> new name.
RENAMED = {"consumed_samples": "consumed_units"}


@dataclass
class TrainerState:
    """What the loop needs, beyond the engine, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done on each rank
    # The position in the data stream: units (packed sequences, or examples without packing)
    # taken by all ranks. Checkpoints before 2026-12 call it consumed_samples.
    consumed_units: int = 0
    examples_seen: int = 0  # training examples in those units
    tokens_seen: int = 0  # non-padding tokens over all ranks
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    wandb_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, RENAMED.get(k, k), v)

    @property
    def best(self) -> dict[str, Any] | None:
        return min(self.eval_history, key=lambda r: r["eval_loss"], default=None)


def _rng_state() -> dict[str, Any]:
    """Every generator's state in types `torch.load(weights_only=True)` accepts (numpy's key
    array as a tensor), so loading a checkpoint never unpickles arbitrary objects."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself durable before anything that relies on it


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _fsync(paths: list[Path]) -> None:
    """Flush files (and then their directories) to stable storage before the marker names them."""
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in sorted({f.parent for f in paths}):
        _fsync_dir(d)


def _own_files(tag_dir: Path) -> list[Path]:
    """The files this rank wrote: DeepSpeed names each rank's shards by its rank; rank 0 also
    wrote everything without a rank in its name (trainer state, hf/)."""
    mine, rank = [], dist.rank()
    for f in tag_dir.rglob("*"):
        if not f.is_file():
            continue
        m = re.search(r"_rank_(\d+)_mp_rank", f.name)
        if (m and int(m.group(1)) == rank) or (m is None and rank == 0):
            mine.append(f)
    return mine


@dataclass
class SaveInfo:
    """What a save needs besides the engine and the state (see loop.save)."""

    export: Any  # trainer.export.Export: what hf/ holds besides the weights
    probe_ids: torch.Tensor
    marker: dict[str, Any]  # recorded in COMPLETE (the inputs' fingerprint)
    needed: int  # bytes this save is expected to take, for the out-of-space message
    eval_summary: dict[str, Any]  # this step's eval and the best so far -> hf/EVAL_FILE


def save(
    engine: Any, output_dir: Path, state: TrainerState, info: SaveInfo
) -> tuple[Path, float, int]:
    """Save and publish a checkpoint; all ranks call it. Returns (tag dir, seconds, bytes).

    Besides DeepSpeed's shards, the tag gets the trainer state with every rank's RNG, and `hf/`:
    what `export` (trainer.export.Export) writes — model config, generation config, tokenizer,
    prompt format — and the live engine's logits on a fixed probe batch, so the tag alone can be
    consolidated offline and the result verified. If writing fails on any rank, every rank
    raises the same RunError after rank 0 removed the partial tag.
    """
    root, tag = checkpoint_root(output_dir), tag_for(state.step)
    tag_dir = root / tag
    t0 = time.perf_counter()
    if dist.is_main() and tag_dir.exists():
        shutil.rmtree(tag_dir)  # left incomplete by a crash: never mix two saves' files
    if dist.is_main() and os.environ.get(faults.FILL_ENV) == str(state.step):
        faults.fill_for_test(output_dir)  # fault injection: another job fills the disk
    if os.environ.get(faults.FAIL_ENV) == f"{dist.rank()}:{state.step}":
        faults.fail_writes_for_test(engine)  # fault injection: this rank alone fails
    dist.barrier()
    error: BaseException | None = None
    try:
        engine.save_checkpoint(
            str(root), tag=tag, client_state={STATE_KEY: state.state_dict()}, save_latest=False
        )
    except (OSError, RuntimeError) as e:
        # A write failed between DeepSpeed's tag check (its last collective before the writes)
        # and the end of its save_checkpoint, where the ranks that succeeded go on with the
        # ZeRO-3 optimizer's checkpoint epilogue (an all-gather of the persistent parameters)
        # and a barrier (DeepSpeed 0.19.8, engine.save_checkpoint): take part in both, then
        # decide together.
        error = e
        if engine._optimizer_has_ckpt_event_epilogue():
            engine.optimizer.checkpoint_event_epilogue()
        dist.barrier()
    rng = dist.gather_objects(_rng_state())  # a collective: every rank's generators
    probe = _probe_logits(engine, info.probe_ids)  # a forward pass: every rank takes part
    try:
        if dist.is_main() and error is None:
            torch.save(
                {"state": state.state_dict(), "rng": rng, "world_size": dist.world_size()},
                tag_dir / STATE_FILE,
            )
            hf = tag_dir / HF_SUBDIR
            info.export.write(hf, engine.module)
            torch.save(probe, hf / PROBE_FILE)
            (hf / EVAL_FILE).write_text(json.dumps(info.eval_summary, indent=1))
        if error is None:
            _fsync(_own_files(tag_dir))
    except (OSError, RuntimeError) as e:
        error = e
    failures = [
        f for f in dist.gather_objects(_describe(error, output_dir, info.needed)) if f is not None
    ]
    if failures:
        out_of_space, what = failures[0]
        if dist.is_main():
            shutil.rmtree(tag_dir, ignore_errors=True)  # never leave a partial tag filling disk
        dist.barrier()
        latest = root / "latest"
        keep = (
            f"{root / latest.read_text().strip()} is intact and --resume auto continues from it"
            if latest.is_file()
            else "no earlier checkpoint to resume from"
        )
        if out_of_space:
            raise RunError(
                faults.space_error(
                    root,
                    info.needed,
                    faults.free_bytes(root),
                    f"out of disk space saving {tag}",
                    f"the partial {tag} was removed; {keep} once space is freed",
                )
            )
        raise RunError(f"saving {tag} failed ({what}); the partial {tag} was removed; {keep}")
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        if os.environ.get(FAULT_ENV) == str(state.step):
            os.kill(os.getpid(), signal.SIGKILL)
        files = {
            str(p.relative_to(tag_dir)): p.stat().st_size
            for p in sorted(tag_dir.rglob("*"))
            if p.is_file()
        }
        data_format = {
            "prompt_format": info.export.info["prompt_format"],
            "end_tokens": [e["id"] for e in info.export.info["end_tokens"]],
        }
        _atomic_write(
            tag_dir / COMPLETE,
            json.dumps(
                {
                    "step": state.step,
                    "world_size": dist.world_size(),
                    "files": files,
                    "data_format": data_format,
                    **info.marker,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=1,
            ),
        )
        _atomic_write(root / "latest", tag)  # DeepSpeed's format: the tag name
    dist.barrier()
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())
    return tag_dir, seconds, size


def _describe(
    error: BaseException | None, output_dir: Path, needed: int
) -> tuple[bool, str] | None:
    if error is None:
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (
        faults.is_out_of_space(error, output_dir, needed),
        f"rank {dist.rank()}: {type(error).__name__}: {first}",
    )


@torch.no_grad()
def _probe_logits(engine: Any, input_ids: torch.Tensor) -> dict[str, Any]:
    was_training = engine.training
    engine.eval()
    logits = engine(input_ids=input_ids.to(engine.device), use_cache=False).logits.float().cpu()
    engine.train(was_training)
    return {
        "input_ids": input_ids.cpu(),
        "lse": torch.logsumexp(logits, dim=-1),
        "head": logits[..., :256].clone(),
        "dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch."),
    }
