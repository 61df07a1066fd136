"""The engine-driven training loop: forward, backward, step, then plain ifs for log/eval/save."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import (
    attention,
    checkpoint,
    dist,
    faults,
    preflight,
    rundata,
    versions,
    watchdog,
    weights,
)
from trainer.batching import Sampler, eval_batches
from trainer.config import ConfigError, RunConfig, resolve_ds_config
from trainer.consolidate import BackgroundConsolidator, NullConsolidator
from trainer.data import DataError
from trainer.export import Export
from trainer.export import build as build_export
from trainer.export import describe as describe_export
from trainer.flops import device_peak_flops, flops_per_token
from trainer.loss import chunk_rows_for, summed_loss
from trainer.metrics import MetricsSink, NullSink
from trainer.model import build_model, count_parameters, has_weights, load_tokenizer
from trainer.tokenized import TokenizedSet

ATTENTION_WHAT = {
    "varlen": "torch varlen_attn, one kernel per layer over the packed examples",
    "flash": "flash-attn varlen, one kernel per layer over the packed examples",
    "loop": "causal SDPA per packed example",
    "masked": "transformers' sdpa with a block mask over each packed row",
}
# Fault injection for the multi-node tests: the ranks that have it raise after this step.
RAISE_ENV = "QSFT_TEST_RAISE_AT_STEP"
# Fault injection for the non-finite test: every rank's loss of this step becomes NaN.
NAN_ENV = "QSFT_TEST_NAN_LOSS_AT_STEP"
# Fault injection for the load-check test: this rank's share of one parameter is changed after
# loading, as if transformers had left it at its initial value.
CORRUPT_ENV = "QSFT_TEST_CORRUPT_LOAD_ON_RANK"


def lr_lambda(warmup_steps: int, max_steps: int):
    """Linear warmup to the peak, then cosine decay to zero at max_steps (a factor of the peak)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32


def build_optimizer(model: Any, cfg: RunConfig, ds_config: dict[str, Any]) -> Any:
    """A client AdamW unless the DeepSpeed config names an optimizer (offload needs DeepSpeed's).

    torch's AdamW needs no JIT build (DeepSpeed's FusedAdam/CPUAdam compile for ~90 s on first
    use); on CUDA its fused kernel is as fast as FusedAdam.
    """
    if "optimizer" in ds_config:
        return None
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "bias" in name or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)


@dataclass
class Run:
    """Everything the loop works with, built once by :func:`setup`."""

    cfg: RunConfig
    engine: Any
    scheduler: Any
    tokenizer: Any
    export: Export  # what each checkpoint's hf/ holds besides the weights
    train_set: TokenizedSet
    eval_sets: list[TokenizedSet]
    sampler: Sampler
    state: checkpoint.TrainerState
    sink: NullSink
    num_params: int
    world: int
    wall0: float
    probe_ids: torch.Tensor | None = None  # fixed batch whose logits each checkpoint records
    consolidator: Any = None
    hf_ds_config: Any = None  # keeps transformers' ZeRO-3 hook alive for the run
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # one device
    mfu: list[float] = field(default_factory=list)  # per logged window
    tokens_per_s: list[float] = field(default_factory=list)
    stopped: bool = False  # stopped early on request (signal or STOP file)
    train_seconds: float = 0.0  # time in logged training windows: no setup, eval is excluded
    resumed_at: int = -1  # the step this run resumed from
    fingerprint: dict[str, Any] = field(default_factory=dict)  # recorded in each COMPLETE
    train_dtype: torch.dtype = torch.float32


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run training to cfg.max_steps; returns the summary (also printed by rank 0)."""
    run = setup(cfg)
    try:
        fit(run)
    except faults.RunError as e:
        run.sink.log_event(dict(event="error", step=run.state.step, message=str(e)))
        run.sink.note(f"error: {e}")  # the log file; launch/train.py prints it
        raise
    return finish(run)


def setup(cfg: RunConfig) -> Run:
    """Validate everything, then create the process group, the sharded model and the engine."""
    import deepspeed

    wall0 = time.perf_counter()
    world = dist.env_world_size()
    # Everything that can be wrong with the input is checked before the model is loaded. Each
    # rank checks on its own, then the outcomes are gathered (trainer.preflight): a path that
    # one node cannot read fails every rank at once, with one line naming that rank.
    local_error: Exception | None = None
    try:
        ds_config = resolve_ds_config(cfg, world)
        dtype = train_dtype(ds_config)
        why_not = attention.available(cfg.attention, dtype)  # e.g. varlen without a GPU
        if why_not:
            raise ConfigError(why_not)
        attention_impl = attention.resolve(cfg.attention, dtype)
        tokenizer = load_tokenizer(cfg.model_dir, cfg.trust_remote_code)
        # Names and shapes of the base weights against config.json, from the file headers.
        weight_index = weights.check_files(cfg.model_dir) if has_weights(cfg.model_dir) else {}
        rundata.check_files(cfg)
    except (ConfigError, DataError) as e:
        local_error = e
    except OSError as e:  # e.g. a permission error on one node's copy of a path
        local_error = ConfigError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
    dist.init(cfg.dist_timeout_s)
    preflight.gather_errors(local_error)
    preflight.check_output_dir(cfg.output_dir)
    # Tokenized once per node (or once, on a shared cache) and memory-mapped by every rank;
    # bad data is a DataError on every rank.
    data = rundata.load(cfg, tokenizer)
    train_set, eval_sets = data.train, data.evals
    local_error = None
    try:
        sampler = Sampler(
            train_set,
            cfg.batch_size,
            cfg.gradient_accumulation_steps,
            world,
            dist.rank(),
            cfg.seed,
            tokenizer.pad_token_id,
            pack_to=cfg.max_seq_length if cfg.packing else None,
        )
        if cfg.num_epochs is not None:
            steps = rundata.steps_for_epochs(
                cfg.num_epochs, len(sampler.units(0)), sampler.global_batch
            )
            if cfg.warmup_steps is not None and cfg.warmup_steps >= steps:
                raise ConfigError(
                    f"--warmup_steps {cfg.warmup_steps} must be below the "
                    f"{steps} steps of --num_epochs {cfg.num_epochs:g}"
                )
            cfg = cfg.model_copy(update=dict(max_steps=steps))
        export = build_export(cfg.model_dir, tokenizer, train_set, cfg.prompt_format)
        resume_from = checkpoint.find_resume_point(cfg)
        fingerprint = faults.fingerprint(
            cfg, cfg.batch_size * cfg.gradient_accumulation_steps * world, data.train_hash
        )
        changes: list[str] = []
        if resume_from is not None:
            checkpoint.check_format(resume_from, export.info, cfg.prompt_format)
            changes = checkpoint.check_inputs(resume_from, fingerprint, cfg.resume_allow_changes)
        checkpoint.check_disk_at_start(
            cfg, dtype, resume_from.marker.get("step") if resume_from else None
        )
    except (ConfigError, DataError) as e:
        local_error = e
    except OSError as e:
        local_error = ConfigError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
    preflight.gather_errors(local_error)
    preflight.agree("resume point", str(resume_from.tag_dir) if resume_from else "none (start)")
    # A node with another copy of the base model (or none: it would start from random weights)
    # would build a different model and hang or corrupt the first collective.
    preflight.agree("base model weight files", weights.signature(cfg.model_dir))
    if world > 1:
        watchdog.start(cfg.rank_timeout_s)
    if resume_from is not None and resume_from.world_size != world:
        # Another number of ranks: DeepSpeed loads the universal copy of the checkpoint.
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    ds_config_file = json.loads(json.dumps(ds_config))  # DeepSpeed mutates the dict it is given

    if cfg.resume == "none" and cfg.overwrite:
        checkpoint.clear_previous_run(cfg.output_dir)
    t_load = time.perf_counter()
    model, hf_ds_config = build_model(
        cfg.model_dir,
        ds_config,
        dtype,
        cfg.gradient_checkpointing,
        cfg.seed,
        attention_impl,
        cfg.loss,
        cfg.trust_remote_code,
    )
    t_load = time.perf_counter() - t_load
    load_check = None
    # Every rank its own partition, the outcome gathered. Not on resume: the checkpoint's weights
    # replace the base weights, and DeepSpeed's loader checks its own files.
    if weight_index and cfg.load_check and resume_from is None:
        if os.environ.get(CORRUPT_ENV) == str(dist.rank()):  # fault injection for the tests
            weights.corrupt_for_test(model)
        load_check = weights.verify_loaded(model, weight_index, cfg.model_dir)
        preflight.gather_errors(ConfigError(load_check.error) if load_check.error else None)
    num_params = count_parameters(model)
    schedule = lr_lambda(cfg.resolved_warmup_steps, cfg.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg, ds_config),
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        # A callable: DeepSpeed wraps the optimizer, and LambdaLR must see the wrapped one.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )

    state = checkpoint.TrainerState()
    if resume_from is not None:
        checkpoint.load(engine, resume_from, state)
    sink, consolidator = NullSink(), NullConsolidator()
    if dist.is_main():
        sink = MetricsSink(
            cfg.output_dir,
            cfg.max_steps,
            state.step,
            wandb_cfg=_wandb_cfg(cfg, ds_config_file, state) if cfg.wandb else None,
        )
        state.wandb_run_id = sink.wandb_run_id
        kernels = dict(
            attention=attention_impl,
            loss=cfg.loss,
            loss_chunk_rows=chunk_rows_for(model.config.vocab_size),
        )
        write_run_config(
            cfg,
            ds_config_file,
            world,
            num_params,
            export.info,
            rundata.config_section(data, cfg, sampler),
            kernels,
        )
        how = (
            f"{kernels['loss_chunk_rows']} target tokens per vocabulary chunk"
            if cfg.loss == "chunked"
            else "all target logits at once"
        )
        sink.message(
            f"attention {attention_impl} ({ATTENTION_WHAT[attention_impl]}), "
            f"loss {cfg.loss} ({how})"
        )
        sink.eval_data = pooled_stats(eval_sets)
        sink.message(
            f"model {cfg.model_dir} ({num_params / 1e6:.2f}M params, {dtype}), world "
            f"{world}, global batch {sampler.global_batch}, "
            f"{sampler.steps_per_epoch:.1f} steps/epoch"
        )
        if cfg.num_epochs is not None:
            sink.message(
                f"--num_epochs {cfg.num_epochs:g}: {len(sampler.units(0))} "
                f"{'packed sequences' if cfg.packing else 'examples'} per epoch / "
                f"global batch {sampler.global_batch} -> {cfg.max_steps} steps"
            )
        if weight_index and resume_from is not None:
            sink.message(
                f"base weights loaded in {t_load:.1f}s, not compared with the files: "
                f"resuming replaces them with {resume_from.tag_dir.name}"
            )
        if load_check is not None:
            sink.message(
                f"base weights loaded in {t_load:.1f}s and checked against the files "
                f"on every rank (rank 0: {load_check.tensors} tensors, "
                f"{load_check.bytes_read / 2**20:.1f} MiB read in "
                f"{load_check.seconds:.1f}s"
                + (f", {load_check.skipped} on NVMe not checked" if load_check.skipped else "")
                + ")"
            )
        sink.message(describe_export(export.info))
        for line in rundata.describe_all(data, cfg, sampler):
            sink.message(line)
        if resume_from is not None:
            for tag in resume_from.skipped:
                sink.message(f"ignoring {tag}: incomplete (a save was interrupted)")
            for line in resume_from.damaged:
                sink.message(f"ignoring {line}; falling back to {resume_from.tag_dir.name}")
            for change in changes:
                sink.message(f"resuming with changed inputs (--resume_allow_changes): {change}")
            if changes:
                sink.log_event(dict(event="resume_changes", step=state.step, changes=changes))
            how = (
                ""
                if resume_from.world_size == world
                else f", converted to a universal checkpoint: saved by {resume_from.world_size} "
                f"ranks, now {world}"
            )
            sink.message(f"resumed from {resume_from.tag_dir} at step {state.step}{how}")
            sink.log_event(
                dict(
                    event="resume", step=state.step, tag=resume_from.tag_dir.name, world_size=world
                )
            )
        consolidator = BackgroundConsolidator(Path(cfg.output_dir) / "logs", sink.message)
        # Consolidations lost with a killed job (the child dies with it): redo them.
        for tag_dir in checkpoint.complete_checkpoints(checkpoint.checkpoint_root(cfg.output_dir)):
            if (
                checkpoint.wants_consolidation(cfg, checkpoint.step_of(tag_dir.name))
                and not (tag_dir / checkpoint.CONSOLIDATED).is_dir()
            ):
                sink.message(
                    f"{tag_dir.name} was never consolidated (the job stopped first): "
                    f"consolidating it now"
                )
                consolidator.start(tag_dir)
    probe_set = eval_sets[0] if eval_sets else train_set
    probe_ids = torch.tensor([probe_set.input_ids[0][:64]])
    run = Run(
        cfg,
        engine,
        scheduler,
        tokenizer,
        export,
        train_set,
        eval_sets,
        sampler,
        state,
        sink,
        num_params,
        world,
        wall0,
        probe_ids,
        consolidator,
        hf_ds_config,
        fingerprint=fingerprint,
        train_dtype=dtype,
    )
    run.flops_per_token = flops_per_token(
        model.config,
        num_params,
        train_set.stats["tokens"] / len(train_set),
        train_set.stats["label_tokens"] / max(1, train_set.stats["tokens"]),
    )
    with torch.random.fork_rng():  # measuring must not consume the restored random streams
        run.peak_flops, source = device_peak_flops(dtype)
    run.resumed_at = state.step if resume_from is not None else -1
    sink.message(
        f"MFU basis: {run.flops_per_token / 1e6:.1f} MFLOP per token, peak "
        f"{run.peak_flops / 1e12:.3g} TFLOP/s per device ({source})"
    )
    return run


def forward_backward(
    engine: Any, micro_batch: dict[str, torch.Tensor], num_items: float
) -> torch.Tensor:
    """One micro-batch: forward and backward; returns its summed token CE (detached, float64).

    The loss is sum(token CE) / num_items. DeepSpeed's backward then divides by the accumulation
    steps and its gradient reduction averages over ranks, so passing
    num_items = (target tokens of the whole optimizer step, all ranks) / (world x accum) makes
    the step's gradient that of the mean over ALL its target tokens — not a mean of
    per-micro-batch means, which would overweight short examples.
    """
    loss_sum = summed_loss(engine, micro_batch, engine.device)
    engine.backward(loss_sum / num_items)
    return loss_sum.detach().double()


def fit(run: Run) -> None:
    """The training loop: micro-batches -> forward/backward/step, then log, eval, save."""
    cfg, engine, state, sink = run.cfg, run.engine, run.state, run.sink
    accum = cfg.gradient_accumulation_steps
    stop = StopRequest(Path(cfg.output_dir) / "STOP")
    if run.eval_sets and state.step == 0 and not state.eval_history and cfg.eval_at_start:
        run_eval(run)  # the step-0 baseline that later evals are compared with
    window = new_window()
    while state.step < cfg.max_steps:
        batches = run.sampler.step(state.consumed_samples)
        num_items = batches.num_label_tokens / (run.world * accum)
        lr = run.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        window["tokens"] += batches.tokens
        window["padded"] += batches.padded_tokens
        for mb in batches.micro_batches:
            loss_sum += forward_backward(engine, mb, num_items)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            state.micro_step += 1
        state.step += 1
        if os.environ.get(RAISE_ENV) == str(state.step):  # fault injection for the tests
            raise RuntimeError(f"injected failure at step {state.step} ({RAISE_ENV})")
        if os.environ.get(NAN_ENV) == str(state.step):  # fault injection: a non-finite loss
            loss_sum = loss_sum * float("nan")
        state.consumed_samples += run.sampler.global_batch
        state.examples_seen += len(batches.sample_ids)
        sink.log_samples(state.step, batches.sample_ids)
        window["loss_sum"] += loss_sum  # stays on the device until the step's one collective
        window["label_tokens"] += batches.num_label_tokens
        window["lr"] = lr

        # One collective per step: stop together (so no rank leaves a collective hanging), and
        # stop at once on a non-finite loss or gradient norm, before anything is saved.
        stop_votes, step_loss = dist.all_reduce_sum([float(stop.requested()), float(loss_sum)])
        stopping = stop_votes > 0
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        fp16 = run.train_dtype == torch.float16  # DeepSpeed skips overflowing fp16 steps itself
        bad = faults.non_finite(
            state.step,
            step_loss / max(batches.num_label_tokens, 1),
            None if fp16 else grad_norm,
            checkpoint.last_checkpoint(cfg),
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
        consumed_samples=state.consumed_samples,
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
    tag_dir = checkpoint.checkpoint_root(cfg.output_dir) / checkpoint.tag_for(state.step)
    if state.step == run.resumed_at and checkpoint.read_marker(tag_dir):
        return  # resumed here and stopped before another step: this checkpoint is the state
    # Never write weights that are no longer finite (a loss can stay finite for a step after
    # an update made them Inf): every rank checks its own partition, then all agree.
    if dist.any_rank(not faults.local_weights_finite(run.engine)):
        raise faults.RunError(
            f"step {state.step}: the weights are no longer finite; not saved. "
            f"Last complete checkpoint: {checkpoint.last_checkpoint(cfg)}"
        )
    needed = checkpoint.checkpoint_needs(cfg, run.train_dtype, state.step)
    free = faults.free_bytes(cfg.output_dir)
    if dist.any_rank(free < needed):
        raise faults.RunError(
            faults.space_error(
                cfg.output_dir,
                needed,
                free,
                f"not enough disk to save {checkpoint.tag_for(state.step)}",
                f"stopped before writing it; "
                f"{checkpoint.last_checkpoint(cfg)} is the checkpoint --resume auto continues from "
                f"once space is freed",
            )
        )
    info = checkpoint.SaveInfo(
        run.export, run.probe_ids, {"fingerprint": run.fingerprint}, needed, eval_summary(run)
    )
    path, seconds, size = checkpoint.save(run.engine, cfg.output_dir, state, info)
    sink.message(f"saved {path} in {seconds:.1f}s ({size / 2**20:.1f} MiB)")
    # A checkpoint still (or not yet) being consolidated has no consolidated/: prune keeps its
    # state, so nothing waits for the background consolidations here.
    for line in checkpoint.prune(
        cfg.output_dir,
        cfg.keep_last,
        cfg.keep_best,
        state,
        cfg.keep_consolidated,
        lambda step: checkpoint.wants_consolidation(cfg, step),
    ):
        sink.message(
            f"{line} (--keep_last {cfg.keep_last}"
            + (f", --keep_consolidated {cfg.keep_consolidated}" if cfg.keep_consolidated else "")
            + ")"
        )
    if checkpoint.wants_consolidation(cfg, state.step):
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


class StopRequest:
    """SIGTERM / SIGINT (what SLURM and Kubernetes send to every process of a job) or a STOP
    file in the output directory ask the run to stop after the current optimizer step.

    The handler only sets a flag: the loop saves and exits 0 at the next step boundary. A second
    SIGINT restores the default behaviour and re-raises it, for a user who wants out now.
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
        if not self.reason and dist.is_main() and self.stop_file.exists():
            self.reason = f"{self.stop_file} exists"
        return bool(self.reason)

    def clear(self) -> None:
        if dist.is_main():
            self.stop_file.unlink(missing_ok=True)  # or the restart would stop at once

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
            f"diverging "
            f"(--divergence_factor {run.cfg.divergence_factor})"
        )
    history.append(record)
    run.sink.log_eval(history)


def finish(run: Run) -> dict[str, Any]:
    """Wait for the final consolidation, print the summary, close the sinks."""
    state, cfg = run.state, run.cfg
    best = state.best
    best_model = (
        (
            checkpoint.checkpoint_root(cfg.output_dir)
            / checkpoint.tag_for(best["step"])
            / checkpoint.CONSOLIDATED
        )
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
        eval_data=pooled_stats(run.eval_sets),
    )
    if torch.cuda.is_available():
        summary["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    run.sink.write_summary(summary)
    run.sink.message(format_summary(summary))
    run.sink.close()
    return summary


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


def pooled_stats(sets: list[TokenizedSet]) -> dict[str, Any] | None:
    """The eval files' counts added up (kept, dropped, cut), for the summary."""
    if not sets:
        return None
    return {k: sum(s.stats[k] for s in sets) for k in sets[0].stats}


def write_run_config(
    cfg: RunConfig,
    ds_config: dict[str, Any],
    world: int,
    num_params: int,
    data_format: dict[str, Any],
    data_section: dict[str, Any],
    kernels: dict[str, Any],
) -> None:
    import yaml

    data = dict(data_format, **data_section)
    resolved = dict(
        run=cfg.model_dump(mode="json"),
        deepspeed=ds_config,
        world_size=world,
        num_parameters=num_params,
        warmup_steps=cfg.resolved_warmup_steps,
        data=data,
        kernels=kernels,
        versions=versions(),
    )
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))


def _wandb_cfg(cfg: RunConfig, ds_config: dict[str, Any], state: Any) -> dict[str, Any]:
    wandb_dir = Path(cfg.output_dir) / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return dict(
        project="qsft",
        name=f"{cfg.experiment_name}-{cfg.model_size}",
        config=dict(run=cfg.model_dump(mode="json"), deepspeed=ds_config),
        dir=str(wandb_dir),
        run_id=state.wandb_run_id,
    )


def format_summary(s: dict[str, Any]) -> str:
    title = "stopped early (resume with --resume auto)" if s.get("stopped") else "training complete"
    lines = [
        "",
        f"== qsft: {title} ==",
        f"steps {s['steps']} in {s['wall_s'] / 60:.1f} min, mean {s['tokens_per_s']:.0f} "
        f"tokens/s (non-padding, all ranks)",
    ]
    if s["eval"]:
        first, last = s["eval"][0], s["eval"][-1]
        best = min(s["eval"], key=lambda r: r["eval_loss"])
        lines.append(
            f"eval loss {first['eval_loss']:.4f} (step {first['step']}) -> "
            f"{last['eval_loss']:.4f} (step {last['step']}); best "
            f"{best['eval_loss']:.4f} at step {best['step']}"
        )
        data = s.get("eval_data") or {}
        if data.get("dropped") or data.get("truncated"):
            lines.append(
                f"eval over {data['examples']} of {data['records']} records: "
                f"{data['dropped']} longer than --max_seq_length left out, "
                f"{data['truncated']} cut to it"
            )
    if s.get("best_checkpoint") and s["eval"]:
        best = min(s["eval"], key=lambda r: r["eval_loss"])
        lines.append(f"best checkpoint by eval loss (step {best['step']}): {s['best_checkpoint']}")
    c = s["consolidated"]
    if c:
        lines += [
            f"consolidated checkpoint: {c}",
            "load it: from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"AutoModelForCausalLM.from_pretrained('{c}'); "
            f"AutoTokenizer.from_pretrained('{c}')",
        ]
    return "\n".join(lines)
