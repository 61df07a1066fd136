"""Save and resume: DeepSpeed's engine checkpoint plus the trainer's own state.

Layout (DESIGN.md): OUTPUT_DIR/checkpoints/ is a standard DeepSpeed checkpoint root with `latest`,
DeepSpeed's `zero_to_fp32.py` and one `checkpoint-N/` tag directory per save.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import dist
from trainer.config import ConfigError, RunConfig
from trainer.consolidate import HF_SUBDIR, PROBE_FILE

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


def save(engine: Any, output_dir: Path, state: TrainerState, tokenizer: Any,
         probe_ids: torch.Tensor) -> tuple[Path, float, int]:
    """Save a checkpoint on every rank (a collective); returns (tag dir, seconds, bytes).

    Besides DeepSpeed's shards, the tag gets `hf/`: the model config, generation config and
    tokenizer, plus the live engine's logits on a fixed probe batch, so the tag alone can be
    consolidated into a Hugging Face directory offline and that result verified.
    """
    root, tag = checkpoint_root(output_dir), tag_for(state.step)
    t0 = time.perf_counter()
    engine.save_checkpoint(str(root), tag=tag, client_state={STATE_KEY: state.state_dict()})
    probe = _probe_logits(engine, probe_ids)  # a forward pass: every rank takes part
    if dist.is_main():
        hf = root / tag / HF_SUBDIR
        hf.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(engine.module.config)
        config.use_cache = True  # off for training; what inference downstream wants
        config.save_pretrained(hf)
        if engine.module.generation_config is not None:
            engine.module.generation_config.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        torch.save(probe, hf / PROBE_FILE)
    dist.barrier()
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (root / tag).rglob("*") if f.is_file())
    return root / tag, seconds, size


@torch.no_grad()
def _probe_logits(engine: Any, input_ids: torch.Tensor) -> dict[str, Any]:
    was_training = engine.training
    engine.eval()
    logits = engine(input_ids=input_ids.to(engine.device), use_cache=False).logits.float().cpu()
    engine.train(was_training)
    return {"input_ids": input_ids.cpu(), "lse": torch.logsumexp(logits, dim=-1),
            "head": logits[..., :256].clone(),
            "dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch.")}


def load(engine: Any, root: Path, tag: str, state: TrainerState) -> None:
    """Load engine + trainer state from root/tag on every rank."""
    path, client = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None or STATE_KEY not in (client or {}):
        raise RuntimeError(f"{root / tag}: not a complete qsft checkpoint")
    state.load_state_dict(client[STATE_KEY])
