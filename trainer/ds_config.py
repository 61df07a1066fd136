"""The DeepSpeed JSON: its pydantic schema (DeepSpeed 0.19.x), loading, cross-checks with the
run config, and `qsft-config check` (python -m trainer.ds_config check FILE... [--world_size N]).

DeepSpeed reads its top-level keys with `dict.get`, so a misspelt key such as
"gradient_clippping" is silently ignored. Here every level forbids unknown keys. Sections for
which DeepSpeed ships its own pydantic model (zero_optimization, bf16, fp16, monitors,
comms_logger, compile) are validated by that model, so we follow DeepSpeed's own field list and
aliases instead of copying it; the rest are modelled here.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.config import ConfigError, RunConfig, one_line_error

# Keys DeepSpeed understands but this trainer does not drive (pipeline/tensor/expert
# parallelism, compression, curriculum, autotuning...). Passing them would be silently
# half-supported, so they are rejected with a clear message instead.
UNSUPPORTED_KEYS = frozenset(
    {
        "pipeline",
        "hybrid_engine",
        "expert_parallel",
        "tensor_parallel",
        "compression_training",
        "data_efficiency",
        "curriculum_learning",
        "autotuning",
        "elasticity",
        "sparse_attention",
        "nebula",
        "quantize_training",
        "torch_autocast",
        "amp",
        "sequence_parallel_size",
        "weight_quantization",
        "eigenvalue",
        "progressive_layer_drop",
        "zenflow",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerParams(_Strict):
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    bias_correction: bool = True
    amsgrad: bool = False
    adam_w_mode: bool = True
    torch_adam: bool = False
    fused: bool | None = None


class OptimizerSection(_Strict):
    # Only the Adam family: the loop's schedule and the offload variants are built around it.
    type: Literal["AdamW", "Adam", "adamw", "adam"]
    params: OptimizerParams = OptimizerParams()
    legacy_fusion: bool = False


class ActivationCheckpointing(_Strict):
    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    cpu_checkpointing: bool = False
    number_checkpoints: int | None = Field(None, gt=0)
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


class FlopsProfiler(_Strict):
    enabled: bool = False
    recompute_fwd_factor: float = Field(0.0, ge=0)
    profile_step: int = Field(1, ge=1)
    module_depth: int = -1
    top_modules: int = Field(1, ge=1)
    detailed: bool = True
    output_file: str | None = None


class ParallelWrite(_Strict):
    pipeline_stage: bool = False


class CheckpointSection(_Strict):
    tag_validation: Literal["Ignore", "Warn", "Fail", "ignore", "warn", "fail"] = "Warn"
    load_universal: bool = False
    use_node_local_storage: bool = False
    parallel_write: ParallelWrite = ParallelWrite()
    writer: dict[str, Any] | None = None


class DataTypes(_Strict):
    grad_accum_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    param_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    buffer_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    keep_in_fp32_modules: Any = None


class AIO(_Strict):
    block_size: int = Field(1048576, gt=0)
    queue_depth: int = Field(8, gt=0)
    intra_op_parallelism: int = Field(1, gt=0)
    thread_count: int | None = Field(None, gt=0)
    single_submit: bool = False
    overlap_events: bool = True
    use_gds: bool = False


class DSConfig(_Strict):
    """Top level of a DeepSpeed config as qsft accepts it."""

    train_batch_size: int | None = Field(None, gt=0)
    train_micro_batch_size_per_gpu: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int | None = Field(None, gt=0)
    gradient_clipping: float = Field(0.0, ge=0)
    steps_per_print: int | None = Field(None, gt=0)
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False
    dump_state: bool = False
    prescale_gradients: bool = False
    gradient_predivide_factor: float = Field(1.0, gt=0)
    gradient_allreduce_op: Literal["mean", "sum"] | None = None
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = None
    seq_parallel_communication_data_type: Literal["fp32", "fp16", "bf16"] | None = None
    disable_allgather: bool = False
    disable_python_gc: int | None = None
    sparse_gradients: bool = False
    zero_allow_untested_optimizer: bool = False
    zero_force_ds_cpu_optimizer: bool = True
    dataloader_drop_last: bool = False
    log_level: str | None = None
    use_data_before_expert_parallelism: bool = False
    managed_gradient_accumulation: bool | None = None
    optimizer: OptimizerSection | None = None
    scheduler: dict[str, Any] | None = None
    zero_optimization: dict[str, Any]
    bf16: dict[str, Any] | None = None
    fp16: dict[str, Any] | None = None
    activation_checkpointing: ActivationCheckpointing | None = None
    flops_profiler: FlopsProfiler | None = None
    checkpoint: CheckpointSection | None = None
    data_types: DataTypes | None = None
    aio: AIO | None = None
    compile: dict[str, Any] | None = None
    comms_logger: dict[str, Any] | None = None
    wandb: dict[str, Any] | None = None
    tensorboard: dict[str, Any] | None = None
    csv_monitor: dict[str, Any] | None = None
    comet: dict[str, Any] | None = None
    timers: dict[str, Any] | None = None

    def cross_check(self) -> None:
        """Checks across sections; raises ValueError naming the key and the fix."""
        zero = self.zero_optimization
        if zero.get("stage") != 3:
            raise ValueError(
                f"zero_optimization.stage must be 3 (got {zero.get('stage')!r}); "
                f"qsft shards parameters, gradients and optimizer states"
            )
        if zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
            raise ValueError(
                "zero_optimization.stage3_gather_16bit_weights_on_model_save must be "
                "true, or consolidated checkpoints come out empty; set it to true"
            )
        for name in ("bf16", "fp16"):
            enabled = (getattr(self, name) or {}).get("enabled", False)
            if not isinstance(enabled, bool):  # "false" would be truthy for us, false for them
                raise ValueError(f"{name}.enabled must be true or false (got {enabled!r})")
        bf16_on = (self.bf16 or {}).get("enabled", False)
        fp16_on = (self.fp16 or {}).get("enabled", False)
        if bf16_on and fp16_on:
            raise ValueError("bf16.enabled and fp16.enabled are both true; enable one of them")
        if self.scheduler is not None:
            raise ValueError(
                "scheduler: qsft builds warmup + cosine from --warmup_steps and "
                "--max_steps; remove the 'scheduler' block"
            )
        for part in ("offload_optimizer", "offload_param"):
            off = zero.get(part) or {}
            device = off.get("device", "none")
            if device == "nvme" and not off.get("nvme_path"):
                raise ValueError(
                    f"zero_optimization.{part}.device is nvme but nvme_path is not "
                    f"set; add zero_optimization.{part}.nvme_path"
                )
            if device != "none" and self.optimizer is None:
                raise ValueError(
                    f"zero_optimization.{part} needs a DeepSpeed 'optimizer' block "
                    f"(DeepSpeed rejects a client optimizer with offload); add "
                    f'"optimizer": {{"type": "AdamW"}}'
                )
        if (
            self.optimizer is not None
            and self.optimizer.params.torch_adam
            and (zero.get("offload_optimizer") or {}).get("device", "none") != "none"
        ):
            raise ValueError(
                "optimizer.params.torch_adam cannot run with offload_optimizer; remove torch_adam"
            )


# Section name -> (module, class) of DeepSpeed's own pydantic model for it; every
# DeepSpeedConfigModel forbids extra keys. Imported lazily so `--help` and config errors stay fast.
DS_SECTION_MODELS: dict[str, tuple[str, str]] = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
}


def ds_section_model(section: str) -> type[BaseModel]:
    """DeepSpeed's pydantic model class for a config section."""
    module, name = DS_SECTION_MODELS[section]
    return getattr(importlib.import_module(module), name)


def load_ds_config(path: Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON file and validate it completely (unknown keys at any level fail)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    validate_ds_dict(raw, source=str(path))
    return raw


def validate_ds_dict(raw: dict[str, Any], source: str = "ds_config") -> DSConfig:
    """Schema + cross-field checks on a DeepSpeed config dict; raises ConfigError."""
    _reject_auto(raw, source, "")
    unsupported = sorted(set(raw) & UNSUPPORTED_KEYS)
    if unsupported:
        raise ConfigError(
            f"{source}: '{unsupported[0]}' is a DeepSpeed feature qsft does not drive; remove it"
        )
    unknown = sorted(set(raw) - set(DSConfig.model_fields))
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, DSConfig.model_fields, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else "; remove it (DeepSpeed would ignore it)"
        raise ConfigError(f"{source}: unknown top-level key '{key}'{hint}")
    try:
        cfg = DSConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(one_line_error(e, source=source)) from None
    for section in DS_SECTION_MODELS:
        if raw.get(section) is not None:
            _validate_section(section, raw[section], source)
    try:
        cfg.cross_check()
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _validate_section(section: str, value: Any, source: str) -> None:
    model = ds_section_model(section)
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {section}: must be a JSON object (got {value!r})")
    try:
        model(**value)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in (section, *err["loc"]))
        if err["type"] == "extra_forbidden":
            known = [f.alias or n for n, f in model.model_fields.items()]
            near = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near and len(err["loc"]) == 1 else ""
            raise ConfigError(f"{source}: unknown key '{loc}'{hint}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {loc}: {msg} (got {err.get('input')!r})") from None
    except (ValueError, TypeError, AssertionError) as e:  # DeepSpeed's own validators
        raise ConfigError(f"{source}: {section}: {str(e).splitlines()[0]}") from None


def _reject_auto(node: Any, source: str, path: str) -> None:
    # "auto" is resolved only by the HF Trainer integration; handed to DeepSpeed directly it is a
    # string where a number belongs. Our configs pin numbers, derived in ds_configs/README.md.
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_auto(v, source, f"{path}.{k}" if path else k)
    elif node == "auto":
        raise ConfigError(
            f'{source}: {path}: "auto" is not supported; pin a number (see ds_configs/README.md)'
        )


def resolve_ds_config(run: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed dict the engine gets: the file, validated, with the run's batch and precision.

    Batch keys present in the file must agree with the flags and the launcher's real world size.
    """
    source = str(run.ds_config_path)
    ds = load_ds_config(run.ds_config_path)
    micro, accum = run.batch_size, run.gradient_accumulation_steps
    if ds.get("train_micro_batch_size_per_gpu", micro) != micro:
        raise ConfigError(
            f"{source}: train_micro_batch_size_per_gpu "
            f"{ds['train_micro_batch_size_per_gpu']} != --batch_size {micro}; "
            f"drop the key or make them equal"
        )
    if ds.get("gradient_accumulation_steps", accum) != accum:
        raise ConfigError(
            f"{source}: gradient_accumulation_steps "
            f"{ds['gradient_accumulation_steps']} != --gradient_accumulation_steps "
            f"{accum}; drop the key or make them equal"
        )
    check_batch(ds.get("train_batch_size"), micro, accum, world_size, source)
    ds.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        train_batch_size=micro * accum * world_size,
    )
    if run.bf16 is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": run.bf16}
        if run.bf16:
            ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    if "optimizer" in ds:  # a DeepSpeed optimizer (needed for offload): the flags own lr and wd
        params = ds["optimizer"].setdefault("params", {})
        params.update(lr=run.learning_rate, weight_decay=run.weight_decay)
    validate_ds_dict(ds, source=source)
    return ds


def check_batch(train_batch: int | None, micro: int, accum: int, world: int, source: str) -> None:
    """train_batch_size must equal micro x grad_accum x world, or DeepSpeed asserts much later."""
    if train_batch is None or train_batch == micro * accum * world:
        return
    fix = (
        f"set gradient_accumulation_steps to {train_batch // (micro * world)}"
        if train_batch % (micro * world) == 0
        else "change the batch flags"
    )
    raise ConfigError(
        f"{source}: train_batch_size {train_batch} != micro {micro} x grad_accum "
        f"{accum} x world {world} = {micro * accum * world}; {fix} or drop "
        f"train_batch_size"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qsft-config")
    sub = p.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate DeepSpeed JSON configs")
    check.add_argument("files", nargs="+", type=Path)
    check.add_argument(
        "--world_size",
        type=int,
        default=None,
        help="also check train_batch_size against this many ranks",
    )
    args = p.parse_args(argv)
    failed = 0
    for f in args.files:
        try:
            ds = load_ds_config(f)
            micro = ds.get("train_micro_batch_size_per_gpu")
            accum = ds.get("gradient_accumulation_steps", 1)
            if args.world_size and micro:
                check_batch(ds.get("train_batch_size"), micro, accum, args.world_size, str(f))
            print(f"ok {f}")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
