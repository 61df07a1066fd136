"""The engine-driven training loop: forward, backward, step, then plain ifs for log/eval/save.

The run it works on is built by trainer.startup.setup; what it writes goes through the rank-0
sink (trainer.metrics) and the checkpoint writer (trainer.checkpoint).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from trainer import dist, faults, metrics, watchdog
from trainer.batching import StepBatches, eval_batches
from trainer.checkpoint import layout, retention, writer
from trainer.config import RunConfig
from trainer.loss import summed_loss
from trainer.startup import Run, setup
from trainer.tokenized import TokenizedSet

# Fault injection for the multi-node tests: the ranks that have it raise after this step.
RAISE_ENV = "QSFT_TEST_RAISE_AT_STEP"
# Fault injection for the non-finite test: every rank's loss of this step becomes NaN.
NAN_ENV = "QSFT_TEST_NAN_LOSS_AT_STEP"


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run training to cfg.max_steps; returns the summary (also printed by rank 0)."""
    run = setup(cfg)
    try:
        fit(run)
    except faults.RunError as e:
        run.sink.log_event(dict(event="error", step=run.state.step, message=str(e)))
        run.sink.note(f"error: {e}")  # the log file; launch/train.py prints it
        run.sink.close()  # ends the progress bar's line: the error is printed below it
        raise
    return finish(run)


def forward_backward(
    engine: Any, micro_batch: dict[str, torch.Tensor], loss_divisor: float
) -> torch.Tensor:
    """One micro-batch: forward and backward; returns its summed token CE (detached, float64)."""
    loss_sum = summed_loss(engine, micro_batch, engine.device)
    engine.backward(loss_sum / loss_divisor)
    return loss_sum.detach().double()


def accumulate_gradients(run: Run, batches: StepBatches) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches; returns the summed loss.

    The loss of each micro-batch is sum(token CE) / loss_divisor. DeepSpeed's backward then
    divides by the accumulation steps and its gradient reduction averages over ranks, so
    loss_divisor = (target tokens of the whole optimizer step, all ranks) / (world x accum)
    makes the step's gradient that of the mean over ALL its target tokens — not a mean of
    per-micro-batch means, which would overweight short examples.

    engine.step() between micro-batches only counts them; the last backward, at the
    accumulation boundary, reduces the gradients, and the caller's engine.step() then updates
    the weights (the gradient test reads them between the two).
    """
    engine = run.engine
    loss_divisor = batches.num_label_tokens / (run.world * run.cfg.gradient_accumulation_steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    for j, mb in enumerate(batches.micro_batches):
        if j:
            engine.step()  # not the boundary: DeepSpeed only counts the micro-step
            run.state.micro_step += 1
        loss_sum += forward_backward(engine, mb, loss_divisor)
    return loss_sum


def fit(run: Run) -> None:
    """The training loop: micro-batches -> forward/backward/step, then log, eval, save."""
    cfg, engine, state, sink = run.cfg, run.engine, run.state, run.sink
    stop = dist.StopRequest(Path(cfg.output_dir) / "STOP")
    if run.eval_sets and state.step == 0 and not state.eval_history and cfg.eval_at_start:
        run_eval(run)  # the step-0 baseline that later evals are compared with
    window = new_window()
    while state.step < cfg.max_steps:
        batches = run.sampler.step(state.consumed_units)
        lr = run.scheduler.get_last_lr()[0]
        window["tokens"] += batches.tokens
        window["padded"] += batches.padded_tokens
        loss_sum = accumulate_gradients(run, batches)
        engine.step()  # the accumulation boundary: DeepSpeed steps the optimizer
        state.micro_step += 1
        state.step += 1
        if os.environ.get(RAISE_ENV) == str(state.step):  # fault injection for the tests
            raise RuntimeError(f"injected failure at step {state.step} ({RAISE_ENV})")
        if os.environ.get(NAN_ENV) == str(state.step):  # fault injection: a non-finite loss
            loss_sum = loss_sum * float("nan")
        state.consumed_units += run.sampler.global_batch
        state.examples_seen += len(batches.sample_ids)
        sink.log_samples(state.step, batches.sample_ids)
        window["loss_sum"] += loss_sum  # stays on the device until the step's one collective
        window["label_tokens"] += batches.num_label_tokens
        window["lr"] = lr

        # One collective per step: stop together (so no rank leaves a collective hanging), and
        # stop at once on a non-finite loss or gradient norm, before anything is saved.
        stopping, step_loss = stop.agreed(float(loss_sum))
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        fp16 = run.train_dtype == torch.float16  # DeepSpeed skips overflowing fp16 steps itself
        bad = faults.non_finite(
            state.step,
            step_loss / max(batches.num_label_tokens, 1),
            None if fp16 else grad_norm,
            retention.last_checkpoint(cfg),
        )
        if bad:
            sink.log_event(
                dict(
                    event="non_finite",
                    step=state.step,
                    loss=str(step_loss),
                    grad_norm=str(grad_norm),
                )
            )
            raise faults.RunError(bad)
        saving = bool(cfg.save_every_n_steps) and (
            state.step % cfg.save_every_n_steps == 0 or state.step == cfg.max_steps or stopping
        )
        if state.step % cfg.logging_steps == 0 or state.step == cfg.max_steps or saving or stopping:
            # Also before every save and stop: the checkpoint's tokens_seen and the logs then
            # hold every step up to it; nothing of an open window is lost.
            log_window(run, window, grad_norm)
            window = new_window()
        paused = time.perf_counter()  # eval and saves do not count as training time
        if run.eval_sets and (
            (cfg.eval_steps and state.step % cfg.eval_steps == 0) or state.step == cfg.max_steps
        ):
            run_eval(run)
        if saving:
            save(run)
        run.consolidator.poll()  # rank 0: start the next queued consolidation, if any
        window["t0"] += time.perf_counter() - paused
        if stopping:
            sink.message(
                f"stopped at step {state.step} ({stop.reason}); "
                + (
                    "resume with --resume auto"
                    if cfg.save_every_n_steps
                    else "nothing saved (--save_every_n_steps 0)"
                )
            )
            stop.clear()
            run.stopped = True
            break
    stop.restore()


def new_window() -> dict[str, Any]:
    return dict(loss_sum=0.0, label_tokens=0, tokens=0, padded=0, lr=0.0, t0=time.perf_counter())


def log_window(run: Run, window: dict[str, Any], grad_norm: float | None) -> None:
    """Reduce the steps since the last log (one collective) and log them as one record."""
    state, sink = run.state, run.sink
    loss_total, tokens, padded = dist.all_reduce_sum(
        [float(window["loss_sum"]), window["tokens"], window["padded"]]
    )
    elapsed = time.perf_counter() - window["t0"]
    run.train_seconds += elapsed
    state.tokens_seen += int(tokens)
    run.tokens_per_s.append(tokens / elapsed)
    lr = window["lr"]
    record = dict(
        step=state.step,
        loss=loss_total / window["label_tokens"],
        lr=lr,
        grad_norm=grad_norm if grad_norm is not None else float("nan"),
        tokens_per_s=tokens / elapsed,
        padding=1 - tokens / max(padded, 1),
        mfu=tokens / elapsed * run.flops_per_token / (run.peak_flops * run.world),
        consumed_units=state.consumed_units,
        examples_seen=state.examples_seen,
        tokens_seen=state.tokens_seen,
        epoch=state.step / run.sampler.steps_per_epoch,
        elapsed_s=time.perf_counter() - run.wall0,
    )
    if torch.cuda.is_available():  # this rank's peak since the start, allocator view
        record["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    run.mfu.append(record["mfu"])
    sink.log_step(record)
    sink.progress(
        state.step,
        {
            "loss": f"{record['loss']:.3f}",
            "lr": f"{lr:.2e}",
            "tok/s": f"{record['tokens_per_s']:.0f}",
            "mfu": f"{record['mfu']:.1%}",
        },
    )


def save(run: Run) -> None:
    cfg, state, sink = run.cfg, run.state, run.sink
    tag_dir = layout.checkpoint_root(cfg.output_dir) / layout.tag_for(state.step)
    if state.step == run.resumed_at and layout.read_marker(tag_dir):
        return  # resumed here and stopped before another step: this checkpoint is the state
    # Never write weights that are no longer finite (a loss can stay finite for a step after
    # an update made them Inf): every rank checks its own partition, then all agree.
    if dist.any_rank(not faults.local_weights_finite(run.engine)):
        raise faults.RunError(
            f"step {state.step}: the weights are no longer finite; not saved. "
            f"Last complete checkpoint: {retention.last_checkpoint(cfg)}"
        )
    needed = retention.checkpoint_needs(cfg, run.train_dtype, state.step)
    free = faults.free_bytes(cfg.output_dir)
    if dist.any_rank(free < needed):
        raise faults.RunError(
            faults.space_error(
                cfg.output_dir,
                needed,
                free,
                f"not enough disk to save {layout.tag_for(state.step)}",
                f"stopped before writing it; {retention.last_checkpoint(cfg)} is the checkpoint "
                f"--resume auto continues from once space is freed",
            )
        )
    info = writer.SaveInfo(
        run.export, run.probe_ids, {"fingerprint": run.fingerprint}, needed, eval_summary(run)
    )
    path, seconds, size = writer.save(run.engine, cfg.output_dir, state, info)
    sink.message(f"saved {path} in {seconds:.1f}s ({size / 2**20:.1f} MiB)")
    # A checkpoint still (or not yet) being consolidated has no consolidated/: prune keeps its
    # state, so nothing waits for the background consolidations here.
    for line in retention.prune(
        cfg.output_dir,
        cfg.keep_last,
        cfg.keep_best,
        state,
        cfg.keep_consolidated,
        lambda step: retention.wants_consolidation(cfg, step),
    ):
        sink.message(
            f"{line} (--keep_last {cfg.keep_last}"
            + (f", --keep_consolidated {cfg.keep_consolidated}" if cfg.keep_consolidated else "")
            + ")"
        )
    if retention.wants_consolidation(cfg, state.step):
        run.consolidator.start(path)  # rank 0, in the background


def eval_summary(run: Run) -> dict[str, Any]:
    """This step's eval and the best so far, saved with the checkpoint for its manifest."""
    history, step = run.state.eval_history, run.state.step
    here = next((r for r in history if r["step"] == step), None)
    best = min(history, key=lambda r: r["eval_loss"], default=None)
    return {
        "step": step,
        "eval_loss": here["eval_loss"] if here else None,
        "diverged": bool(here and here.get("diverged")),
        "best_step": best["step"] if best else None,
        "best_eval_loss": best["eval_loss"] if best else None,
    }


def run_eval(run: Run) -> None:
    """Every eval file (each a collective), reported per file and pooled over their tokens."""
    sums = [
        evaluate(run.engine, data, run.cfg.batch_size, run.tokenizer.pad_token_id)
        for data in run.eval_sets
    ]
    loss = sum(t for t, _ in sums) / max(1, sum(n for _, n in sums))
    history = run.state.eval_history
    record = dict(step=run.state.step, eval_loss=loss, perplexity=math.exp(min(loss, 50.0)))
    if len(sums) > 1:
        record["eval_loss_by_file"] = {
            Path(data.source).name: t / max(n, 1)
            for data, (t, n) in zip(run.eval_sets, sums, strict=True)
        }
    best = faults.diverging(loss, history, run.cfg.divergence_factor)
    if best is not None:
        record["diverged"] = True
        run.sink.message(
            f"warning: eval loss {loss:.4f} at step {run.state.step} is "
            f"{loss / best['eval_loss']:.1f}x the best so far "
            f"({best['eval_loss']:.4f} at step {best['step']}): the run may be "
            f"diverging (--divergence_factor {run.cfg.divergence_factor})"
        )
    history.append(record)
    run.sink.log_eval(history)


@torch.no_grad()
def evaluate(engine: Any, data: TokenizedSet, batch: int, pad_id: int) -> tuple[float, int]:
    """Summed target-token loss over an eval set and its target tokens, all ranks together
    (forward is a collective)."""
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    count = 0
    for mb, real in eval_batches(data, batch, dist.world_size(), dist.rank(), pad_id):
        loss = summed_loss(engine, mb, engine.device)  # the training loss, chunked as there
        if real:
            loss_sum += loss.double()
            count += int((mb["labels"][:, 1:] != -100).sum())
    engine.train()
    total, n = dist.all_reduce_sum([float(loss_sum), count])
    return total, int(n)


def finish(run: Run) -> dict[str, Any]:
    """Wait for the final consolidation, write and print the summary, close the sinks."""
    state, cfg = run.state, run.cfg
    best = state.best
    best_model = (
        layout.checkpoint_root(cfg.output_dir) / layout.tag_for(best["step"]) / layout.CONSOLIDATED
        if best
        else None
    )
    watchdog.stop()  # every rank stops watching before any may exit (rank 0 hosts the store)
    dist.barrier()
    consolidated = run.consolidator.wait()  # rank 0 only; the other ranks are free to exit
    tps = run.tokens_per_s
    summary = dict(
        output_dir=str(run.cfg.output_dir),
        consolidated=str(consolidated) if consolidated else None,
        steps=state.step,
        wall_s=time.perf_counter() - run.wall0,
        tokens_per_s=sum(tps) / len(tps) if tps else float("nan"),
        mfu=sum(run.mfu) / len(run.mfu) if run.mfu else float("nan"),
        eval=state.eval_history,
        stopped=run.stopped,
        train_seconds=run.train_seconds,
        examples_seen=state.examples_seen,
        tokens_seen=state.tokens_seen,
        best_checkpoint=str(best_model)
        if best_model and (best_model.is_dir() or best_model == consolidated)
        else None,
        eval_data=metrics.pooled_stats(run.eval_sets),
    )
    if torch.cuda.is_available():
        summary["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    run.sink.write_summary(summary)  # also draws logs/curves.png and names it in the summary
    run.sink.end_progress()
    run.sink.message(metrics.format_summary(summary))
    run.sink.close()
    return summary
