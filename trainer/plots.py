"""Pictures people open after a run: the training curves and the data's length histogram.

matplotlib with its file-only Agg backend (no display, no GUI toolkit), imported on first use so
a run or a test that draws nothing never pays for it. Each picture is drawn into a temporary
file and renamed into place: a crash mid-draw leaves the previous picture, never a partial one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CURVES = "curves.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a headless node
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    plt = _pyplot()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def read_steps(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """The logged training steps, the newest record of each step.

    A resumed run appends to metrics.jsonl after a resume event naming the step it continued
    from: what the stopped run logged past that step is dropped, and each step is the record of
    the run that continued.
    """
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = metrics_jsonl.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if rec.get("event") == "resume":  # what a crashed run logged past its checkpoint
            by_step = {s: r for s, r in by_step.items() if s <= rec["step"]}
        elif "event" not in rec and "loss" in rec:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def draw_curves(logs: Path, eval_history: list[dict[str, Any]]) -> Path | None:
    """logs/curves.png: train loss (with eval loss and its best step), learning rate and
    tokens/s against the optimizer step. None when nothing is logged yet."""
    steps = read_steps(logs / "metrics.jsonl")
    if not steps and not eval_history:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(
        3, 1, figsize=(8, 8), sharex=True, height_ratios=(2, 1, 1)
    )
    x = [r["step"] for r in steps]
    ax_loss.plot(x, [r["loss"] for r in steps], label="train loss", color="tab:blue", lw=1)
    if eval_history:
        ex = [r["step"] for r in eval_history]
        ax_loss.plot(
            ex,
            [r["eval_loss"] for r in eval_history],
            "o-",
            label="eval loss",
            color="tab:orange",
            ms=3,
        )
        best = min(eval_history, key=lambda r: r["eval_loss"])
        ax_loss.plot(
            [best["step"]],
            [best["eval_loss"]],
            "*",
            ms=14,
            color="tab:red",
            label=f"best eval {best['eval_loss']:.4f} (step {best['step']})",
        )
    ax_loss.set_ylabel("loss (mean over target tokens)")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(x, [r["lr"] for r in steps], color="tab:green", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)
    ax_tps.plot(x, [r["tokens_per_s"] for r in steps], color="tab:purple", lw=1)
    ax_tps.set_ylabel("tokens/s (all ranks)")
    ax_tps.set_xlabel("optimizer step")
    ax_tps.grid(alpha=0.3)
    fig.suptitle(f"{logs.parent.name}: training curves")
    fig.tight_layout()
    path = logs / CURVES
    _save(fig, path)
    return path


def draw_histogram(path: Path, lengths: list[int], max_seq_length: int) -> None:
    """Example lengths in tokens (about 40 bars), with --max_seq_length as a red line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    top = max(max(lengths, default=0), max_seq_length)
    ax.hist(lengths, bins=40, range=(0, top + 1), color="tab:blue")
    ax.axvline(max_seq_length, color="tab:red", lw=1.5, label=f"--max_seq_length {max_seq_length}")
    over = sum(n > max_seq_length for n in lengths)
    ax.set_xlabel("tokens per example (as trained)")
    ax.set_ylabel("examples")
    ax.set_title(f"{len(lengths)} examples, {over} longer than --max_seq_length")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
