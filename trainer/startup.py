"""Building a run: check every input, then the process group, the data, the sharded model and
the engine. Everything the loop (trainer.loop) works with ends up in one :class:`Run`.

Everything that can be wrong with the input is checked before the model is loaded. Each rank
checks on its own, then the outcomes are gathered (trainer.preflight): a path that one node
cannot read fails every rank at once, with one line naming that rank.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import attention, dist, faults, metrics, preflight, rundata, watchdog, weights
from trainer.batching import Sampler
from trainer.checkpoint import layout, resume, retention
from trainer.checkpoint.consolidator import BackgroundConsolidator, NullConsolidator
from trainer.checkpoint.writer import TrainerState
from trainer.config import ConfigError, RunConfig
from trainer.ds_config import resolve_ds_config
from trainer.export import Export
from trainer.export import build as build_export
from trainer.export import describe as describe_export
from trainer.flops import device_peak_flops, flops_per_token
from trainer.loss import chunk_rows_for
from trainer.metrics import MetricsSink, NullSink
from trainer.model import build_model, count_parameters, has_weights, load_tokenizer
from trainer.tokenized import TokenizedSet

ATTENTION_WHAT = {
    "varlen": "torch varlen_attn, one kernel per layer over the packed examples",
    "flash": "flash-attn varlen, one kernel per layer over the packed examples",
    "loop": "causal SDPA per packed example",
    "masked": "transformers' sdpa with a block mask over each packed row",
}
# Fault injection for the load-check test: this rank's share of one parameter is changed after
# loading, as if transformers had left it at its initial value.
CORRUPT_ENV = "QSFT_TEST_CORRUPT_LOAD_ON_RANK"


@dataclass(kw_only=True)
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
    state: TrainerState
    sink: NullSink
    consolidator: Any  # rank 0: BackgroundConsolidator; other ranks: NullConsolidator
    num_params: int
    world: int
    wall0: float  # perf_counter at the start of setup
    train_dtype: torch.dtype
    fingerprint: dict[str, Any]  # the inputs' fingerprint, recorded in each COMPLETE
    probe_ids: torch.Tensor  # fixed batch whose logits each checkpoint records
    hf_ds_config: Any = None  # keeps transformers' ZeRO-3 hook alive for the run
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # one device
    resumed_at: int = -1  # the step this run resumed from
    mfu: list[float] = field(default_factory=list)  # per logged window
    tokens_per_s: list[float] = field(default_factory=list)
    stopped: bool = False  # stopped early on request (signal or STOP file)
    train_seconds: float = 0.0  # time in logged training windows: no setup, eval is excluded


@dataclass(kw_only=True)
class Inputs:
    """What each rank reads and checks before the process group exists."""

    ds_config: dict[str, Any]
    dtype: torch.dtype
    attention_impl: str
    tokenizer: Any
    weight_index: dict[str, Any]  # base weights' names and shapes, from the file headers


@dataclass(kw_only=True)
class Plan:
    """What the data and the output directory decide: the stream, the step count, the resume."""

    cfg: RunConfig  # with max_steps set when --num_epochs gave it
    sampler: Sampler
    export: Export
    resume_from: resume.ResumePoint | None
    fingerprint: dict[str, Any]
    changes: list[str]  # inputs changed since the checkpoint (--resume_allow_changes)


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


def check_inputs(cfg: RunConfig, world: int) -> Inputs:
    """This rank's checks of the configs, tokenizer, base weight files and data paths."""
    ds_config = resolve_ds_config(cfg, world)
    dtype = train_dtype(ds_config)
    why_not = attention.available(cfg.attention, dtype)  # e.g. varlen without a GPU
    if why_not:
        raise ConfigError(why_not)
    tokenizer = load_tokenizer(cfg.model_dir, cfg.trust_remote_code)
    # Names and shapes of the base weights against config.json, from the file headers.
    weight_index = weights.check_files(cfg.model_dir) if has_weights(cfg.model_dir) else {}
    rundata.check_files(cfg)
    return Inputs(
        ds_config=ds_config,
        dtype=dtype,
        attention_impl=attention.resolve(cfg.attention, dtype),
        tokenizer=tokenizer,
        weight_index=weight_index,
    )


def plan_run(cfg: RunConfig, data: rundata.RunData, inputs: Inputs, world: int) -> Plan:
    """This rank's view of the stream, the step count and the checkpoint to resume from."""
    tokenizer = inputs.tokenizer
    sampler = Sampler(
        data.train,
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
    export = build_export(cfg.model_dir, tokenizer, data.train, cfg.prompt_format)
    resume_from = resume.find_resume_point(cfg)
    fingerprint = faults.fingerprint(cfg, sampler.global_batch, data.train_hash)
    changes: list[str] = []
    if resume_from is not None:
        resume.check_format(resume_from, export.info, cfg.prompt_format)
        changes = resume.check_inputs(resume_from, fingerprint, cfg.resume_allow_changes)
    retention.check_disk_at_start(
        cfg, inputs.dtype, resume_from.marker.get("step") if resume_from else None
    )
    return Plan(
        cfg=cfg,
        sampler=sampler,
        export=export,
        resume_from=resume_from,
        fingerprint=fingerprint,
        changes=changes,
    )


def setup(cfg: RunConfig) -> Run:
    """Validate everything, then create the process group, the sharded model and the engine."""
    import deepspeed

    wall0 = time.perf_counter()
    world = dist.env_world_size()
    inputs, error = preflight.attempt(lambda: check_inputs(cfg, world))
    dist.init(cfg.dist_timeout_s)
    preflight.gather_errors(error)
    preflight.check_output_dir(cfg.output_dir)
    # Tokenized once per node (or once, on a shared cache) and read in place by every rank;
    # bad data is a DataError on every rank.
    data = rundata.load(cfg, inputs.tokenizer)
    plan, error = preflight.attempt(lambda: plan_run(cfg, data, inputs, world))
    preflight.gather_errors(error)
    cfg, resume_from = plan.cfg, plan.resume_from
    preflight.agree("resume point", str(resume_from.tag_dir) if resume_from else "none (start)")
    # A node with another copy of the base model (or none: it would start from random weights)
    # would build a different model and hang or corrupt the first collective.
    preflight.agree("base model weight files", weights.signature(cfg.model_dir))
    if world > 1:
        watchdog.start(cfg.rank_timeout_s)
    ds_config = inputs.ds_config
    if resume_from is not None and resume_from.world_size != world:
        # Another number of ranks: DeepSpeed loads the universal copy of the checkpoint.
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    ds_config_as_given = json.loads(json.dumps(ds_config))  # DeepSpeed mutates its dict

    if cfg.resume == "none" and cfg.overwrite:
        retention.clear_previous_run(cfg.output_dir)
    t_load = time.perf_counter()
    model, hf_ds_config = build_model(
        cfg.model_dir,
        ds_config,
        inputs.dtype,
        cfg.gradient_checkpointing,
        cfg.seed,
        inputs.attention_impl,
        cfg.loss,
        cfg.trust_remote_code,
    )
    t_load = time.perf_counter() - t_load
    load_check = None
    # Every rank its own partition, the outcome gathered. Not on resume: the checkpoint's weights
    # replace the base weights, and DeepSpeed's loader checks its own files.
    if inputs.weight_index and cfg.load_check and resume_from is None:
        if os.environ.get(CORRUPT_ENV) == str(dist.rank()):  # fault injection for the tests
            weights.corrupt_for_test(model)
        load_check = weights.verify_loaded(model, inputs.weight_index, cfg.model_dir)
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
    state = TrainerState()
    if resume_from is not None:
        resume.load(engine, resume_from, state)

    probe_set = data.evals[0] if data.evals else data.train
    run = Run(
        cfg=cfg,
        engine=engine,
        scheduler=scheduler,
        tokenizer=inputs.tokenizer,
        export=plan.export,
        train_set=data.train,
        eval_sets=data.evals,
        sampler=plan.sampler,
        state=state,
        sink=NullSink(),
        consolidator=NullConsolidator(),
        num_params=num_params,
        world=world,
        wall0=wall0,
        train_dtype=inputs.dtype,
        fingerprint=plan.fingerprint,
        probe_ids=torch.tensor([probe_set.input_ids[0][:64]]),
        hf_ds_config=hf_ds_config,
        resumed_at=state.step if resume_from is not None else -1,
        flops_per_token=flops_per_token(
            model.config,
            num_params,
            data.train.stats["tokens"] / len(data.train),
            data.train.stats["label_tokens"] / max(1, data.train.stats["tokens"]),
        ),
    )
    with torch.random.fork_rng():  # measuring must not consume the restored random streams
        run.peak_flops, peak_source = device_peak_flops(inputs.dtype)
    if dist.is_main():
        open_logs(run, ds_config_as_given, data, inputs, plan)
        say_loaded(run, plan, inputs, t_load, load_check)
        catch_up_consolidations(run)
    run.sink.message(
        f"MFU basis: {run.flops_per_token / 1e6:.1f} MFLOP per token, peak "
        f"{run.peak_flops / 1e12:.3g} TFLOP/s per device ({peak_source})"
    )
    return run


def open_logs(
    run: Run, ds_config: dict[str, Any], data: rundata.RunData, inputs: Inputs, plan: Plan
) -> None:
    """Rank 0: the sink (logs, wandb, progress bar), config.yaml and the start messages."""
    cfg, state = run.cfg, run.state
    wandb_cfg = metrics.wandb_config(cfg, ds_config, state.wandb_run_id) if cfg.wandb else None
    run.sink = MetricsSink(cfg.output_dir, cfg.max_steps, state.step, wandb_cfg=wandb_cfg)
    state.wandb_run_id = run.sink.wandb_run_id
    kernels = dict(
        attention=inputs.attention_impl,
        loss=cfg.loss,
        loss_chunk_rows=chunk_rows_for(run.engine.module.config.vocab_size),
    )
    metrics.write_run_config(
        cfg,
        ds_config,
        run.world,
        run.num_params,
        dict(plan.export.info, **rundata.config_section(data, cfg, run.sampler)),
        kernels,
    )
    how = (
        f"{kernels['loss_chunk_rows']} target tokens per vocabulary chunk"
        if cfg.loss == "chunked"
        else "all target logits at once"
    )
    run.sink.message(
        f"attention {inputs.attention_impl} ({ATTENTION_WHAT[inputs.attention_impl]}), "
        f"loss {cfg.loss} ({how})"
    )
    run.sink.eval_data = metrics.pooled_stats(run.eval_sets)
    run.sink.message(
        f"model {cfg.model_dir} ({run.num_params / 1e6:.2f}M params, {run.train_dtype}), world "
        f"{run.world}, global batch {run.sampler.global_batch}, "
        f"{run.sampler.steps_per_epoch:.1f} steps/epoch"
    )
    if cfg.num_epochs is not None:
        run.sink.message(
            f"--num_epochs {cfg.num_epochs:g}: {len(run.sampler.units(0))} "
            f"{'packed sequences' if cfg.packing else 'examples'} per epoch / "
            f"global batch {run.sampler.global_batch} -> {cfg.max_steps} steps"
        )
    run.sink.message(describe_export(plan.export.info))
    for line in rundata.describe_all(data, cfg, run.sampler):
        run.sink.message(line)


def say_loaded(run: Run, plan: Plan, inputs: Inputs, t_load: float, load_check: Any) -> None:
    """Rank 0: how the base weights were loaded and checked, and what was resumed."""
    sink, resume_from = run.sink, plan.resume_from
    if inputs.weight_index and resume_from is not None:
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
    if resume_from is None:
        return
    for tag in resume_from.skipped:
        sink.message(f"ignoring {tag}: incomplete (a save was interrupted)")
    for line in resume_from.damaged:
        sink.message(f"ignoring {line}; falling back to {resume_from.tag_dir.name}")
    for change in plan.changes:
        sink.message(f"resuming with changed inputs (--resume_allow_changes): {change}")
    if plan.changes:
        sink.log_event(dict(event="resume_changes", step=run.state.step, changes=plan.changes))
    how = (
        ""
        if resume_from.world_size == run.world
        else f", converted to a universal checkpoint: saved by {resume_from.world_size} "
        f"ranks, now {run.world}"
    )
    sink.message(f"resumed from {resume_from.tag_dir} at step {run.state.step}{how}")
    sink.log_event(
        dict(
            event="resume", step=run.state.step, tag=resume_from.tag_dir.name, world_size=run.world
        )
    )


def catch_up_consolidations(run: Run) -> None:
    """Rank 0: start the background consolidator and redo the consolidations lost with a killed
    job (the child dies with it)."""
    cfg = run.cfg
    run.consolidator = BackgroundConsolidator(Path(cfg.output_dir) / "logs", run.sink.message)
    for tag_dir in layout.complete_checkpoints(layout.checkpoint_root(cfg.output_dir)):
        if (
            retention.wants_consolidation(cfg, layout.step_of(tag_dir.name))
            and not (tag_dir / layout.CONSOLIDATED).is_dir()
        ):
            run.sink.message(
                f"{tag_dir.name} was never consolidated (the job stopped first): "
                f"consolidating it now"
            )
            run.consolidator.start(tag_dir)
