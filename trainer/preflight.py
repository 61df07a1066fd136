"""Checks every rank runs right after the process group exists, before any model is loaded.

Each rank validates its inputs on its own (the run config, the DeepSpeed config against the
world size the launcher really gave, the tokenizer and model config, the data); a node that
cannot read a path another node can would otherwise fail alone while the rest wait in a
collective until the timeout. So the outcome is gathered: if any rank failed, every rank stops
with the same one-line message naming the rank and host (exit 2 from launch/train.py).

Then the output directory: every rank writes a probe file into OUTPUT_DIR/.preflight and rank 0
must see all of them. Checkpoints are written by every rank into one directory tree, so it must
be a filesystem all nodes share; a node-local path fails here, in seconds, instead of at the
first save (or worse, at resume).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from pathlib import Path

from trainer import dist
from trainer.config import ConfigError

PROBE_DIR = ".preflight"


def gather_errors(local_error: Exception | None) -> None:
    """Collective: raise ConfigError on every rank if any rank's input checks failed."""
    host = socket.gethostname()
    mine = (dist.rank(), host, str(local_error) if local_error is not None else None)
    failed = [e for e in dist.gather_objects(mine) if e[2] is not None]
    if not failed:
        return
    rank, where, message = failed[0]
    if dist.world_size() > 1 and len(failed) < dist.world_size():
        others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        message = f"rank {rank} on {where}{others}: {message}"
    raise ConfigError(message)


def check_output_dir(output_dir: Path) -> None:
    """Collective: every rank can write OUTPUT_DIR and rank 0 sees every rank's file."""
    host = socket.gethostname()
    token = dist.gather_objects(uuid.uuid4().hex if dist.is_main() else None)[0]
    probes = Path(output_dir) / PROBE_DIR / token
    error = None
    try:
        probes.mkdir(parents=True, exist_ok=True)
        (probes / f"rank-{dist.rank()}").write_text(f"{host} {os.getpid()}\n")
    except OSError as e:
        error = f"--output_dir {output_dir}: not writable from this rank: {e.strerror}"
    gather_errors(ConfigError(error) if error else None)
    dist.barrier()  # every probe is written (and closed) before rank 0 looks
    hosts = dist.gather_objects(host)
    missing: list[int] = []
    if dist.is_main():
        missing = [r for r in range(dist.world_size()) if not (probes / f"rank-{r}").is_file()]
        shutil.rmtree(probes, ignore_errors=True)  # this launch's token only: others may run
        with contextlib.suppress(OSError):
            probes.parent.rmdir()  # gone once empty
    missing = dist.gather_objects(missing)[0]
    if missing:
        where = ", ".join(f"rank {r} on {hosts[r]}" for r in missing[:4])
        raise ConfigError(
            f"--output_dir {output_dir}: rank 0 on {hosts[0]} cannot see files "
            f"written by {where}: it must be one filesystem shared by every node "
            f"(checkpoints are written by all ranks)"
        )


def agree(what: str, value: str) -> None:
    """Collective: every rank must have reached the same decision (e.g. the checkpoint to resume
    from: a node with a stale view of the shared filesystem would load other shards)."""
    values = dist.gather_objects(value)
    if len(set(values)) > 1:
        hosts = dist.gather_objects(socket.gethostname())
        odd = next(r for r, v in enumerate(values) if v != values[0])
        raise ConfigError(
            f"ranks disagree on the {what}: rank 0 on {hosts[0]} has {values[0]}, "
            f"rank {odd} on {hosts[odd]} has {values[odd]}"
        )
