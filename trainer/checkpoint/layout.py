"""The checkpoint layout: file names in a tag directory and how tags are found.

Layout (DESIGN.md): OUTPUT_DIR/checkpoints/ is a standard DeepSpeed checkpoint root:

    latest                      tag of the newest COMPLETE checkpoint (written last, atomically)
    zero_to_fp32.py             DeepSpeed's converter
    checkpoint-N/
      zero_pp_rank_*_...pt      DeepSpeed's shards: weights, optimizer, scheduler
      trainer_state.pt          step, units/tokens consumed, eval history, wandb id, RNG/rank
      hf/                       config, generation config, tokenizer, probe logits
      COMPLETE                  written after every rank's files are fsynced: each file's size,
                                the inputs' fingerprint; no marker = never loaded
      universal/                written on demand when resuming on another number of ranks
      consolidated/             the Hugging Face model (trainer.offline.consolidate)
      PRUNED                    instead of COMPLETE once retention removed the resumable state

"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

HF_SUBDIR = "hf"  # config, generation config and tokenizer, saved by the trainer in each tag


PROBE_FILE = "verify_probe.pt"  # live-engine logits on a fixed batch, saved with each checkpoint


FORMAT_FILE = "training_format.json"  # prompt format and end tokens; goes into manifest.json


EVAL_FILE = "eval_summary.json"  # this step's eval loss and the best so far; into manifest.json


COMPLETE = "COMPLETE"  # the marker: every rank's files of the tag are saved (checkpoint.writer)

STATE_KEY = "qsft_trainer_state"  # also in DeepSpeed's client_state, for offline readers

STATE_FILE = "trainer_state.pt"

PRUNED = "PRUNED"

UNIVERSAL = "universal"

CONSOLIDATED = "consolidated"


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


def verify_files(tag_dir: Path, marker: dict[str, Any]) -> str | None:
    """Every file the COMPLETE marker lists is there with its recorded size; else what is not.

    Sizes are read only from metadata: free at any checkpoint size, and they catch what a full
    disk, a killed copy or a truncated transfer leaves. (Content damage of the same size is
    caught when the file is loaded.) Markers of older checkpoints list no files: nothing to check.
    """
    for name, size in (marker.get("files") or {}).items():
        f = Path(tag_dir) / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != size:
            return f"{f}: {f.stat().st_size} bytes, the checkpoint recorded {size}"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
