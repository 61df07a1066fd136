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
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from trainer import dist
from trainer.config import ConfigError
from trainer.records import DataError

PROBE_DIR = ".preflight"
T = TypeVar("T")


def attempt(check: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """check()'s value, or this rank's input error for :func:`gather_errors`.

    A ConfigError or DataError as it is; an OSError (e.g. a permission error on one node's copy
    of a path) as a ConfigError naming the path.
    """
    try:
        return check(), None
    except (ConfigError, DataError) as e:
        return None, e
    except OSError as e:
        return None, ConfigError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))


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


def visible_ranks(directory: Path) -> tuple[list[set[int]], str | None]:
    """Collective: which ranks' files each rank sees in `directory`.

    Every rank writes a probe file into directory/.preflight/<token>/ (one token per call, so
    concurrent launches do not mix), all wait, then each looks for every rank's file. Returns,
    on every rank, seen[r] = the ranks whose probe rank r saw, and this rank's write error (None
    if it wrote). A directory every node mounts from one filesystem gives every rank every probe.
    """
    host = socket.gethostname()
    token = dist.gather_objects(uuid.uuid4().hex if dist.is_main() else None)[0]
    probes = Path(directory) / PROBE_DIR / token
    error = None
    try:
        probes.mkdir(parents=True, exist_ok=True)
        (probes / f"rank-{dist.rank()}").write_text(f"{host} {os.getpid()}\n")
    except OSError as e:
        error = e.strerror or str(e)
    dist.barrier()  # every probe is written (and closed) before anyone looks
    # Looked up by name, not by listing the folder: an NFS client may serve a listing of a
    # directory it just wrote to from its cache, while a lookup of a missing name goes out.
    mine = {r for r in range(dist.world_size()) if (probes / f"rank-{r}").exists()}
    seen = dist.gather_objects(mine)  # also the barrier: every rank has looked
    # Each rank removes its own probe (a node-local directory is seen by its node alone), then
    # the emptied folders go; .preflight stays while another launch still probes there.
    with contextlib.suppress(OSError):
        (probes / f"rank-{dist.rank()}").unlink()
    dist.barrier()
    for folder in (probes, probes.parent):
        with contextlib.suppress(OSError):
            folder.rmdir()
    return seen, error


def check_output_dir(output_dir: Path) -> None:
    """Collective: every rank can write OUTPUT_DIR and rank 0 sees every rank's file."""
    seen, error = visible_ranks(output_dir)
    if error:
        error = f"--output_dir {output_dir}: not writable from this rank: {error}"
    gather_errors(ConfigError(error) if error else None)
    missing = sorted(set(range(dist.world_size())) - seen[0])
    if missing:
        hosts = dist.gather_objects(socket.gethostname())
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
