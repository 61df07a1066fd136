"""A dead rank must not hang the job: heartbeats through the rendezvous store.

On one node the deepspeed launcher tears every rank down within seconds when one dies. Across
nodes it cannot: the launcher of node 0 does not see a rank of node 1 die, and the survivors
wait in their next collective until its timeout (--dist_timeout_s, 30 min by default), or fail
with a transport error that names an address, not a rank. So every rank runs a daemon thread
that bumps a counter in torch.distributed's rendezvous TCPStore (hosted by rank 0 at
MASTER_ADDR:MASTER_PORT) every few seconds and watches everyone else's. A rank whose counter has
not moved for --rank_timeout_s (default 60 s) is declared dead; every survivor prints one line
naming it and its host and exits 1. If the store itself is gone, rank 0 is the one that died.

The thread beats independently of the training loop, so a rank that is merely busy (a long
save, a consolidation, an eval) keeps beating; only a dead process, a frozen node or a network
partition stops it. Staleness is judged by when a counter last changed on the observer's own
clock, so clock skew between nodes does not matter. A finishing rank marks itself done first; a rank
leaving on an error marks itself failed with the error's first line, and the others stop at the
next heartbeat naming it, instead of waiting out the timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
import time
from datetime import timedelta

KEY = "qsft/watchdog"


class Watchdog:
    """Each rank's value under KEY/beat/RANK is its state: a counter while alive, "done" after a
    normal finish, "failed:<why>" after an error on that rank, "stopping:<why>" once it has
    declared another rank dead (so the survivors repeat the first verdict, not blame each
    other). One multi_get per interval reads everyone's state."""

    def __init__(self, rank: int, world: int, timeout_s: float, interval_s: float | None = None):
        import torch.distributed as tdist

        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.interval_s = interval_s or max(0.5, min(5.0, timeout_s / 6))
        self.host = socket.gethostname()
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.where = f"{addr}:{port}"
        # Our own client connection: the thread never shares one with the main thread.
        self.store = tdist.TCPStore(
            addr, port, is_master=False, timeout=timedelta(seconds=max(10.0, timeout_s))
        )
        self.store.set(f"{KEY}/host/{rank}", self.host)
        self.store.set(f"{KEY}/beat/{rank}", "0")
        self._stop = threading.Event()
        self._culprit: str | None = None
        self._found = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the store client is used by the thread and by fail()

    def start(self) -> None:
        """Call on every rank after a barrier (all ranks have registered)."""
        self._thread = threading.Thread(target=self._run, name="qsft-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Normal finish: mark this rank done (not dead) and stop watching."""
        self._finish("done")

    def fail(self, error: BaseException) -> None:
        """This rank is leaving on an error: tell the others at once, naming it."""
        first = (str(error).strip().splitlines() or [""])[0][:300]
        self._finish(f"failed:{type(error).__name__}: {first}")

    def _finish(self, state: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)
        with self._lock, contextlib.suppress(Exception):  # the store may already be gone
            self.store.set(f"{KEY}/beat/{self.rank}", state)

    def wait_for_culprit(self) -> str | None:
        """After a collective failed: wait (up to the timeout) until the dead rank is known."""
        if self._thread is None or self._stop.is_set():
            return None
        self._found.wait(self.timeout_s + 3 * self.interval_s)
        return self._culprit

    def _run(self) -> None:
        beats = 0
        last: dict[int, tuple[str, float]] = {}
        others = [r for r in range(self.world) if r != self.rank]
        keys = [f"{KEY}/beat/{r}" for r in others]
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    beats += 1
                    self.store.set(f"{KEY}/beat/{self.rank}", str(beats))
                    values = [v.decode() for v in self.store.multi_get(keys)]
            except Exception as e:  # noqa: BLE001 - any store failure means rank 0 is gone
                if self._stop.is_set():
                    return
                self._declare(
                    f"lost the rendezvous store on rank 0 ({self.where}): rank 0 "
                    f"died or its node is unreachable ({type(e).__name__})"
                )
                return
            for r, value in zip(others, values, strict=True):
                if value == "done":
                    continue
                if value.startswith("failed:"):
                    self._declare(
                        f"rank {r} on {self._host(r)} failed: {value.removeprefix('failed:')}"
                    )
                    return
                if value.startswith("stopping:"):
                    self._declare(value.removeprefix("stopping:"), tell=False)
                    return
                seen = last.get(r)
                if seen is None or seen[0] != value:
                    last[r] = (value, now)
                elif now - seen[1] > self.timeout_s:
                    self._declare(
                        f"rank {r} on {self._host(r)} sent no heartbeat for "
                        f"{now - seen[1]:.0f} s (--rank_timeout_s "
                        f"{self.timeout_s:g}): it died or its node is unreachable"
                    )
                    return

    def _host(self, r: int) -> str:
        try:
            with self._lock:
                return self.store.get(f"{KEY}/host/{r}").decode()
        except Exception:  # noqa: BLE001
            return "?"

    def _declare(self, why: str, tell: bool = True) -> None:
        self._culprit = f"qsft: rank {self.rank} stopping: {why}"
        self._found.set()
        if tell:  # the other survivors repeat this verdict instead of timing out on us
            with contextlib.suppress(Exception):
                self.store.set(f"{KEY}/beat/{self.rank}", f"stopping:{why}")
        if os.environ.get("LOCAL_RANK", "0") == "0" or self.world <= 8:
            print(self._culprit, file=sys.stderr, flush=True)
        # The main thread may be blocked in a collective that would wait for the full
        # --dist_timeout_s: leave now. Checkpoints are atomic, so nothing half-written is used.
        os._exit(1)


_current: Watchdog | None = None


def start(timeout_s: float) -> None:
    """Collective: register every rank, then start watching (call right after dist.init)."""
    from trainer import dist

    global _current
    _current = Watchdog(dist.rank(), dist.world_size(), timeout_s)
    dist.barrier()
    _current.start()
    # A process that ends without finish() (a script driving setup() itself) must not leave the
    # thread inside a store call while the interpreter shuts down (std::terminate).
    atexit.register(stop)


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def fail(error: BaseException) -> None:
    global _current
    if _current is not None:
        _current.fail(error)
        _current = None


def wait_for_culprit() -> str | None:
    """After an unexpected error: give the watchdog time to name a dead rank (it then exits)."""
    return _current.wait_for_culprit() if _current is not None else None


def is_comm_error(e: BaseException) -> bool:
    """An error raised by a collective or the store (gloo/NCCL/c10d), not by this rank's code."""
    import torch.distributed as tdist

    if isinstance(e, getattr(tdist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text
        for k in (
            "gloo",
            "NCCL",
            "c10d",
            "Connection closed",
            "Connection reset",
            "Broken pipe",
            "timed out",
            "Timed out",
        )
    )
