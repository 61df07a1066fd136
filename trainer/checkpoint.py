"""Crash-safe save and exact resume: DeepSpeed's engine checkpoint plus the trainer's own state.

Layout (DESIGN.md): OUTPUT_DIR/checkpoints/ is a standard DeepSpeed checkpoint root:

    latest                      tag of the newest COMPLETE checkpoint (written last, atomically)
    zero_to_fp32.py             DeepSpeed's converter
    checkpoint-N/
      zero_pp_rank_*_...pt      DeepSpeed's shards: weights, optimizer, scheduler
      trainer_state.pt          step, samples/tokens consumed, eval history, wandb id, RNG/rank
      hf/                       config, generation config, tokenizer, probe logits
      COMPLETE                  written after every rank finished; no marker = never loaded
      universal/                written on demand when resuming on another number of ranks

DeepSpeed's own save_checkpoint writes `latest` on rank 0 before its final barrier, so a crash
can leave `latest` naming a half-written tag. We save with its `latest` disabled, barrier, mark
the tag complete, then publish `latest` by rename: a crash at any moment leaves the previous
complete checkpoint as the one a restart uses.
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

from trainer import dist
from trainer.config import ConfigError, RunConfig
from trainer.consolidate import HF_SUBDIR, PROBE_FILE

STATE_KEY = "qsft_trainer_state"  # also in DeepSpeed's client_state, for offline readers
STATE_FILE = "trainer_state.pt"
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"
# Fault injection for the crash tests: rank 0 SIGKILLs itself inside the save of this step,
# after the shards are written and before the checkpoint is marked complete.
FAULT_ENV = "QSFT_TEST_KILL_IN_SAVE_AT_STEP"


@dataclass
class TrainerState:
    """What the loop needs, beyond the engine, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done on each rank
    consumed_samples: int = 0  # stream units (packed sequences or examples), all ranks: the
    #                            position in the data stream
    examples_seen: int = 0  # training examples in those units
    tokens_seen: int = 0  # non-padding tokens over all ranks
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    wandb_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)

    @property
    def best(self) -> dict[str, Any] | None:
        return min(self.eval_history, key=lambda r: r["eval_loss"], default=None)


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"checkpoint-{step}"


def _step_of(tag: str) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", tag)
    return int(m.group(1)) if m else -1


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(tag_dir) / COMPLETE).read_text())
    except (OSError, ValueError):
        return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete tag directories under root, oldest first."""
    tags = [p for p in Path(root).glob("checkpoint-*") if p.is_dir() and _step_of(p.name) >= 0]
    return sorted((p for p in tags if read_marker(p)), key=lambda p: _step_of(p.name))


@dataclass
class ResumePoint:
    tag_dir: Path
    world_size: int  # ranks that wrote it
    skipped: list[str]  # newer tags that were not complete
    marker: dict[str, Any] = field(default_factory=dict)  # its COMPLETE file


def find_resume_point(cfg: RunConfig) -> ResumePoint | None:
    """Where to resume from, per --resume; raises ConfigError if the run must not start.

    Called before the process group exists, so it only reads files.
    """
    root = checkpoint_root(cfg.output_dir)
    if cfg.resume == "none":
        if complete_checkpoints(root) and not cfg.overwrite:
            raise ConfigError(f"--resume none: {root} already holds checkpoints; pass "
                              f"--overwrite to replace the run or --resume auto to continue it")
        return None
    if cfg.resume == "auto":
        done = complete_checkpoints(root)
        if not done:
            return None
        tag_dir = done[-1]
        skipped = sorted((p.name for p in root.glob("checkpoint-*")
                          if p.is_dir() and _step_of(p.name) > _step_of(tag_dir.name)),
                         key=_step_of)
    else:
        tag_dir, skipped = Path(cfg.resume), []
        if not read_marker(tag_dir):
            raise ConfigError(f"--resume {tag_dir}: not a complete checkpoint (no {COMPLETE} "
                              f"marker); a save was interrupted there")
        newer = [p.name for p in complete_checkpoints(root)
                 if _step_of(p.name) > _step_of(tag_dir.name)]
        if newer and Path(tag_dir).resolve().parent == root.resolve():
            # They belong to another trajectory: --resume auto would later pick them up, and
            # --keep_last would count them. Going back in time is explicit.
            raise ConfigError(f"--resume {tag_dir}: newer checkpoints {newer} exist in {root}; "
                              f"move them away or delete them before going back")
    marker = read_marker(tag_dir)
    return ResumePoint(tag_dir, int(marker["world_size"]), skipped, marker)


def check_format(point: ResumePoint, info: dict[str, Any], requested: str) -> None:
    """Refuse to continue a checkpoint in another prompt format or with other end tokens.

    The format decides what every later step trains on and which tokens the saved generation
    config stops on; a run continued in another one would end up with a model trained on both
    and a checkpoint that describes only the second. Checkpoints written before the format was
    recorded were all trained with the chat template.
    """
    saved = point.marker.get("data_format") or {"prompt_format": "chat"}
    if saved["prompt_format"] != info["prompt_format"]:
        how = ("--prompt_format auto picks it for this data" if requested == "auto"
               else f"--prompt_format {requested}")
        raise ConfigError(f"--resume: {point.tag_dir} was trained in the {saved['prompt_format']} "
                          f"prompt format, this run would train {info['prompt_format']} ({how}); "
                          f"pass --prompt_format {saved['prompt_format']} to continue it, or "
                          f"start a new --output_dir")
    ends = [e["id"] for e in info["end_tokens"]]
    if "end_tokens" in saved and saved["end_tokens"] != ends:
        raise ConfigError(f"--resume: {point.tag_dir} taught answers to end with token(s) "
                          f"{saved['end_tokens']}, this run's tokenizer and data end them with "
                          f"{ends}; use the tokenizer it was trained with")


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


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine: Any, output_dir: Path, state: TrainerState, export: Any,
         probe_ids: torch.Tensor) -> tuple[Path, float, int]:
    """Save and publish a checkpoint; all ranks call it. Returns (tag dir, seconds, bytes).

    Besides DeepSpeed's shards, the tag gets the trainer state with every rank's RNG, and `hf/`:
    what `export` (trainer.export.Export) writes — model config, generation config, tokenizer,
    prompt format — and the live engine's logits on a fixed probe batch, so the tag alone can be
    consolidated offline and the result verified.
    """
    root, tag = checkpoint_root(output_dir), tag_for(state.step)
    t0 = time.perf_counter()
    if dist.is_main() and (root / tag).exists():
        shutil.rmtree(root / tag)  # left incomplete by a crash: never mix two saves' files
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={STATE_KEY: state.state_dict()},
                           save_latest=False)
    rng = dist.gather_objects(_rng_state())  # a collective: every rank's generators
    probe = _probe_logits(engine, probe_ids)  # a forward pass: every rank takes part
    tag_dir = root / tag
    if dist.is_main():
        torch.save({"state": state.state_dict(), "rng": rng, "world_size": dist.world_size()},
                   tag_dir / STATE_FILE)
        hf = tag_dir / HF_SUBDIR
        export.write(hf, engine.module)
        torch.save(probe, hf / PROBE_FILE)
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        if os.environ.get(FAULT_ENV) == str(state.step):
            os.kill(os.getpid(), signal.SIGKILL)
        files = {str(p.relative_to(tag_dir)): p.stat().st_size
                 for p in sorted(tag_dir.rglob("*")) if p.is_file()}
        data_format = {"prompt_format": export.info["prompt_format"],
                       "end_tokens": [e["id"] for e in export.info["end_tokens"]]}
        _atomic_write(tag_dir / COMPLETE, json.dumps(
            {"step": state.step, "world_size": dist.world_size(), "files": files,
             "data_format": data_format,
             "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
        _atomic_write(root / "latest", tag)  # DeepSpeed's format: the tag name
    dist.barrier()
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())
    return tag_dir, seconds, size


@torch.no_grad()
def _probe_logits(engine: Any, input_ids: torch.Tensor) -> dict[str, Any]:
    was_training = engine.training
    engine.eval()
    logits = engine(input_ids=input_ids.to(engine.device), use_cache=False).logits.float().cpu()
    engine.train(was_training)
    return {"input_ids": input_ids.cpu(), "lse": torch.logsumexp(logits, dim=-1),
            "head": logits[..., :256].clone(),
            "dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch.")}


def prune(output_dir: Path, keep_last: int, keep_best: bool, state: TrainerState) -> list[str]:
    """Delete complete checkpoints beyond the newest keep_last (0 keeps all), sparing the best.

    Rank 0 only, after `latest` names the new checkpoint, so a crash here loses nothing needed.
    """
    if keep_last <= 0 or not dist.is_main():
        return []
    root = checkpoint_root(output_dir)
    done = complete_checkpoints(root)
    keep = {p.name for p in done[-keep_last:]}
    keep.add((root / "latest").read_text().strip())  # never the one a restart would load
    saved = {_step_of(p.name) for p in done}
    evals = [r for r in state.eval_history if r["step"] in saved]
    if keep_best and evals:  # the best eval among the steps that have a checkpoint
        keep.add(tag_for(min(evals, key=lambda r: r["eval_loss"])["step"]))
    removed = []
    for p in done:
        if p.name not in keep:
            (p / COMPLETE).unlink()  # first: a half-deleted tag is never taken as complete
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


def prepare_universal(point: ResumePoint) -> Path:
    """Convert a tag to DeepSpeed's universal format (rank 0; once) for another world size."""
    out = point.tag_dir / UNIVERSAL
    if dist.is_main() and not read_marker(out):
        import subprocess
        import sys

        shutil.rmtree(out, ignore_errors=True)
        # DeepSpeed's converter in its own process: it forks worker pools, which is unsafe in a
        # process that holds a process group.
        res = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                              "--input_folder", str(point.tag_dir), "--output_folder", str(out),
                              "--num_extract_workers", "1", "--num_merge_workers", "1"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {point.tag_dir}: "
                               f"{res.stderr.strip().splitlines()[-1:]}")
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
    """Load engine + trainer state on every rank, from the universal copy if the world differs."""
    tag_dir = point.tag_dir
    if point.world_size != dist.world_size():
        tag_dir = prepare_universal(point)
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                     load_module_strict=True, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    if tag_dir.name == UNIVERSAL:
        _unshare_adam_steps(engine)
    saved = torch.load(tag_dir / STATE_FILE, weights_only=False)
    state.load_state_dict(saved["state"])
    # Each rank continues its own random streams; on another world size rank r takes the
    # streams of saved rank r mod saved world size (dropout then differs, the data does not).
    _set_rng_state(saved["rng"][dist.rank() % len(saved["rng"])])
