"""Crash-safe save and exact resume: DeepSpeed's engine checkpoint plus the trainer's own state.

Layout (DESIGN.md): OUTPUT_DIR/checkpoints/ is a standard DeepSpeed checkpoint root:

    latest                      tag of the newest COMPLETE checkpoint (written last, atomically)
    zero_to_fp32.py             DeepSpeed's converter
    checkpoint-N/
      zero_pp_rank_*_...pt      DeepSpeed's shards: weights, optimizer, scheduler
      trainer_state.pt          step, samples/tokens consumed, eval history, wandb id, RNG/rank
      hf/                       config, generation config, tokenizer, probe logits
      COMPLETE                  written after every rank's files are fsynced: each file's size,
                                the inputs' fingerprint; no marker = never loaded
      universal/                written on demand when resuming on another number of ranks
      consolidated/             the Hugging Face model (trainer.consolidate)
      PRUNED                    instead of COMPLETE once retention removed the resumable state

DeepSpeed's own save_checkpoint writes `latest` on rank 0 before its final barrier, so a crash
can leave `latest` naming a half-written tag. We save with its `latest` disabled, barrier, mark
the tag complete, then publish `latest` by rename: a crash at any moment leaves the previous
complete checkpoint as the one a restart uses. A save that fails on any rank (a full disk) is
removed whole, and the run stops with one line (trainer.faults.RunError).

Retention (`prune`): every consolidated model is kept, the resumable state (shards, trainer
state) only for the newest --keep_last checkpoints, the one `latest` names, and with --keep_best
the best-eval one; a checkpoint with nothing consolidated goes entirely once its state does.
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
from trainer.config import ConfigError, RunConfig
from trainer.consolidate import COMPLETE, EVAL_FILE, HF_SUBDIR, PROBE_FILE, verify_files
from trainer.faults import RunError

STATE_KEY = "qsft_trainer_state"  # also in DeepSpeed's client_state, for offline readers
STATE_FILE = "trainer_state.pt"
PRUNED = "PRUNED"
UNIVERSAL = "universal"
CONSOLIDATED = "consolidated"
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


def step_of(tag: str) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", tag)
    return int(m.group(1)) if m else -1


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(tag_dir) / COMPLETE).read_text())
    except (OSError, ValueError):
        return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete (resumable) tag directories under root, oldest first."""
    tags = [p for p in Path(root).glob("checkpoint-*") if p.is_dir() and step_of(p.name) >= 0]
    return sorted(
        (p for p in tags if read_marker(p) and not (p / PRUNED).exists()),
        key=lambda p: step_of(p.name),
    )


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
    from trainer.plan import Shape

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
