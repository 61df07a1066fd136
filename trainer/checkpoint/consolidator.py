"""Rank 0 consolidates each save in a background child process (trainer.offline.consolidate)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any


class BackgroundConsolidator:
    """Consolidates saved checkpoints in a child process on rank 0 while training goes on.

    The converter reads the shard files just written, so it needs no GPU memory and no
    collective: the other ranks never wait for it. One runs at a time; others queue, and the
    loop's `poll()` at every step starts the next. Nothing waits for them but the end of
    training (`wait()`), so even a queue of them (redone after a resume) never holds rank 0 in
    a collective. A checkpoint being consolidated has no consolidated/ yet, which keeps its
    state from retention (trainer.checkpoint.retention.prune).
    """

    def __init__(self, log_dir: Path, say: Any):
        self.log_dir, self.say = Path(log_dir), say
        self.proc: Any = None
        self.tag_dir: Path | None = None
        self.queue: list[Path] = []
        self.last: Path | None = None  # the newest successful output
        self.t0 = 0.0

    def start(self, tag_dir: Path) -> None:
        self.queue.append(Path(tag_dir))
        self.poll()

    def poll(self) -> None:
        """Collect a finished child and start the next queued tag; never blocks."""
        if self.proc is not None and self.proc.poll() is not None:
            self._collect()
        if self.proc is None and self.queue:
            self._launch(self.queue.pop(0))

    def _launch(self, tag_dir: Path) -> None:
        import subprocess

        self.log_dir.mkdir(parents=True, exist_ok=True)
        repo = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_dir / f"consolidate-{tag_dir.name}.log", "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trainer.offline.consolidate", str(tag_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.tag_dir, self.t0 = tag_dir, time.perf_counter()

    def _collect(self) -> None:
        rc, tag_dir = self.proc.wait(), self.tag_dir
        self.proc = None
        seconds = time.perf_counter() - self.t0
        if rc != 0:
            self.say(
                f"consolidation of {tag_dir} failed (exit {rc}); see "
                f"{self.log_dir / f'consolidate-{tag_dir.name}.log'}"
            )
            self.last = None
            return
        self.say(f"consolidated {tag_dir / 'consolidated'} in {seconds:.1f}s (background)")
        self.last = tag_dir / "consolidated"

    def wait(self) -> Path | None:
        """Run every queued consolidation to the end; the newest output dir, or None if none ran
        or the last one failed."""
        while self.proc is not None or self.queue:
            if self.proc is not None:
                self._collect()
            self.poll()
        return self.last


class NullConsolidator:
    """What ranks other than 0 hold: consolidation is rank 0's file work."""

    def start(self, tag_dir: Path) -> None: ...

    def poll(self) -> None: ...

    def wait(self) -> Path | None:
        return None
