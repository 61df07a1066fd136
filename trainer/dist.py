"""Everything rank-related, under one rule: collectives on every rank, writes on rank 0, barrier.

Also the stop agreement (:class:`StopRequest`): a signal or STOP file is one rank's wish, the
decision is taken together.

These helpers also work with no process group (a plain `python` run or a unit test): then the
world is one rank and collectives are identities.
"""

from __future__ import annotations

import contextlib
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist


def env_rank() -> int:
    """Global rank from the launcher's environment, usable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """World size the launcher gives (deepspeed, torchrun and our tests all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(timeout_s: int) -> None:
    """Create the process group through DeepSpeed (NCCL on GPUs, gloo/ccl on CPU).

    Without a launcher (no RANK in the environment) a single-rank group on localhost is made, so
    `python launch/train.py ...` works too; DeepSpeed would otherwise try MPI discovery.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    if torch.cuda.is_available():  # before any collective: NCCL binds to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    _unlink_shm_segment()


def _unlink_shm_segment() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory segment once all ranks mapped it.

    Our own because DeepSpeed 0.19.8's CPU communication op (csrc/cpu/comm/shm.cpp) creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (66 MiB) per rank at
    init_distributed and never unlinks it: every CPU run, and every killed one, leaves its
    segments in RAM-backed /dev/shm (here 327 of them, 22 GB, had filled the machine). Every rank
    maps all segments inside init_distributed; after a barrier the names are no longer needed,
    and unlinked segments are freed by the kernel when the last rank exits, however it exits.
    """
    if torch.cuda.is_available() or not is_initialized():
        return
    tdist.barrier()
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}"
        f"_{os.environ.get('MASTER_PORT')}_{rank()}"
    )
    with contextlib.suppress(OSError):
        os.unlink(name)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few scalars over ranks in one collective (float64 so token counts stay exact)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank: stop decisions are taken together."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank (small picklable objects only)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def teardown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


class StopRequest:
    """SIGTERM / SIGINT (what SLURM and Kubernetes send to every process of a job) or a STOP
    file in the output directory ask the run to stop after the current optimizer step.

    The handler only sets a flag; :meth:`agreed` sums every rank's flag in the step's one
    collective, so all ranks stop at the same step boundary (a rank that stopped alone would
    leave the others hanging in their next collective). The loop then saves and exits 0. A
    second SIGINT restores the default behaviour and re-raises it, for a user who wants out now.
    """

    def __init__(self, stop_file: Path):
        self.stop_file, self.reason = stop_file, ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason and signum == signal.SIGINT:  # Ctrl-C twice: give up the clean stop
            self.restore()
            signal.raise_signal(signum)
            return
        # A repeated SIGTERM is expected (SLURM signals every process and DeepSpeed's launcher
        # forwards its own), so it does not escalate.
        self.reason = self.reason or signal.Signals(signum).name

    def requested(self) -> bool:
        """This rank's wish (rank 0 also looks for the STOP file)."""
        if not self.reason and is_main() and self.stop_file.exists():
            self.reason = f"{self.stop_file} exists"
        return bool(self.reason)

    def agreed(self, loss_sum: float) -> tuple[bool, float]:
        """Collective: (does any rank stop, the step's loss summed over ranks) in one reduction."""
        votes, loss = all_reduce_sum([float(self.requested()), loss_sum])
        return votes > 0, loss

    def clear(self) -> None:
        if is_main():
            self.stop_file.unlink(missing_ok=True)  # or the restart would stop at once

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
