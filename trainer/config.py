"""Typed configuration: the run config (the command line) and the DeepSpeed JSON.

Everything here is validated before a model, tokenizer or process group is touched, so a typo costs
seconds rather than a twenty-minute weight load. Errors surface as :class:`ConfigError`, a one-line
message that names the flag or JSON key and the fix; entry points turn it into exit status 2.

The DeepSpeed JSON's schema and checks are in trainer.ds_config.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

ModelSize = Literal["tiny", "1.5b", "3b", "7b", "14b", "32b"]
MODEL_SIZES: tuple[str, ...] = ("tiny", "1.5b", "3b", "7b", "14b", "32b")

# Per-size defaults, from the original experiments: 2e-5 for the small sizes, 4e-6 for 14b/32b,
# 1000 steps, a checkpoint every 100 steps (50 for the large ones), micro 1 x GA 8 for 14b/32b.
# `tiny` trains a randomly initialised demo model from scratch, hence its high learning rate.
# Every checkpoint is consolidated, as the original pipeline did for 14b/32b: users pick the best
# SFT checkpoint for RL among them, and retention (--keep_last) keeps every consolidated model
# while removing older resumable states.
_SMALL = dict(
    learning_rate=2e-5,
    max_steps=1000,
    save_every_n_steps=100,
    eval_steps=50,
    max_seq_length=4096,
    logging_steps=10,
    consolidate="every",
)
# They also checkpoint activations: without it neither fits 80 GB GPUs at 4096 tokens
# (launch/plan.py: 14b needs 90 GB per GPU on 8 GPUs, 42 GB with it).
_LARGE = dict(
    _SMALL,
    learning_rate=4e-6,
    save_every_n_steps=50,
    batch_size=1,
    gradient_accumulation_steps=8,
    consolidate="every",
    gradient_checkpointing=True,
)
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    # 1024 tokens: the longest shipped record (a with-tests one) is 856.
    "tiny": dict(
        learning_rate=2e-3,
        max_steps=150,
        save_every_n_steps=100,
        eval_steps=25,
        max_seq_length=1024,
        batch_size=1,
        gradient_accumulation_steps=1,
        logging_steps=10,
        consolidate="final",
    ),
    "1.5b": dict(_SMALL, batch_size=2, gradient_accumulation_steps=4),
    "3b": dict(_SMALL, batch_size=2, gradient_accumulation_steps=4),
    "7b": dict(_SMALL, batch_size=1, gradient_accumulation_steps=8),
    "14b": _LARGE,
    "32b": _LARGE,
}


class ConfigError(ValueError):
    """A bad flag, value or config file; the message is one line naming the culprit and the fix."""


class RunConfig(BaseModel):
    """The run, one field per command-line flag (see DESIGN.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model_size: ModelSize = Field(description="picks ds_configs/zero3_<size>.json and defaults")
    base_model: Path | None = Field(None, description="HF model dir; tiny without it = demo model")
    train_file: list[Path] | None = Field(
        None, description="one or more JSONL / parquet files or saved HF dataset dirs"
    )
    train_weights: list[float] | None = Field(
        None,
        description="one weight per --train_file: each file's share of an epoch (default: "
        "its size, i.e. every example once per epoch)",
    )
    eval_file: list[Path] | None = Field(
        None, description="held-out data, one or more files (reported per file and pooled)"
    )
    output_dir: Path = Field(description="where config.yaml, logs/ and checkpoints/ go")
    experiment_name: str = Field("q-sft", min_length=1, description="wandb run name prefix")
    learning_rate: float = Field(gt=0, le=1, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    max_steps: int | None = Field(
        None, gt=0, description="optimizer steps to train (or --num_epochs)"
    )
    num_epochs: float | None = Field(
        None,
        gt=0,
        description="train this many passes over the "
        "data instead of --max_steps; the steps are printed",
    )
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup; default 3% of steps")
    save_every_n_steps: int = Field(
        ge=0,
        description="checkpoint interval in optimizer steps; "
        "0 = never save (throughput benchmarks only)",
    )
    eval_steps: int = Field(
        ge=0,
        description="eval interval in optimizer steps; 0 = no "
        "periodic eval (the last step is still evaluated)",
    )
    eval_at_start: bool = Field(
        True,
        description="evaluate before the first step (the baseline later evals are compared with)",
    )
    logging_steps: int = Field(gt=0, description="log interval in optimizer steps")
    max_seq_length: int = Field(ge=16, le=131072, description="tokens per training sequence")
    overlong: Literal["drop", "truncate"] = Field(
        "drop",
        description="training and eval examples over max_seq_length: drop them or cut "
        "the completion",
    )
    prompt_format: Literal["auto", "raw", "chat"] = Field(
        "auto",
        description="raw: prompt + completion + EOS as plain text (the original "
        "pipeline); chat: the tokenizer's chat template; auto: raw for prompt/completion data, "
        "chat when the training data has messages records",
    )
    batch_size: int = Field(gt=0, description="micro batch per GPU (sequences)")
    gradient_accumulation_steps: int = Field(gt=0, description="micro batches per optimizer step")
    bf16: bool | None = Field(None, description="bf16 on/off; None keeps the ds_config's value")
    consolidate: Literal["every", "final", "none"] = Field(
        description="write checkpoint-N/consolidated/ after every save, the last one, or never"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    packing: bool = Field(True, description="pack examples into max_seq_length sequences")
    attention: Literal["auto", "varlen", "flash", "loop", "masked"] = Field(
        "auto",
        description="attention over packed examples: auto = varlen on CUDA (torch "
        ">= 2.10), else flash where flash-attn is installed, else loop (the CPU path); masked = "
        "transformers' sdpa with a block mask (benchmarks, debugging)",
    )
    loss: Literal["chunked", "full"] = Field(
        "chunked",
        description="chunked: cross-entropy from the hidden states in vocabulary "
        "chunks; full: all target logits at once (the old path, for benchmarks)",
    )
    load_check: bool = Field(
        True,
        description="after loading --base_model, compare every "
        "rank's share of the weights with the files (catches parameters "
        "left at their initial values)",
    )
    wandb: bool = Field(False, description="log to Weights & Biases (offline without network)")
    seed: int = Field(42, ge=0, description="seeds init, data order and dropout")
    resume: str = Field("auto", min_length=1, description="auto | none | path to a checkpoint tag")
    overwrite: bool = Field(False, description="with --resume none: replace an existing run")
    resume_allow_changes: bool = Field(
        False,
        description="resume although the training data, tokenizer, seed, sequence "
        "length, packing, global batch or schedule differ from the checkpoint's (logged)",
    )
    keep_last: int = Field(
        2,
        ge=0,
        description="keep the resumable state (ZeRO shards) of only "
        "the newest K checkpoints; 0 keeps all. Consolidated models stay",
    )
    keep_best: bool = Field(False, description="also keep the best-eval checkpoint's state")
    keep_consolidated: int = Field(
        0,
        ge=0,
        description="keep only the newest K consolidated "
        "models (and the best with --keep_best); 0 keeps all",
    )
    divergence_factor: float = Field(
        1.5,
        ge=0,
        description="warn when an eval loss exceeds this many times the best so far; 0 never warns",
    )
    trust_remote_code: bool = Field(
        False,
        description="allow a --base_model whose config names "
        "custom Python code (auto_map); off: only transformers' "
        "own classes",
    )
    data_cache_dir: Path | None = Field(
        None,
        description="where tokenized data is cached "
        "(default OUTPUT_DIR/data_cache); share it between runs "
        "on the same data",
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        description="processes that tokenize a file not "
        "yet cached (default: the cores of the node)",
    )
    data_timeout_s: int = Field(
        10800,
        gt=0,
        description="how long ranks wait for the data to be tokenized by their node's first rank",
    )
    ds_config: Path | None = Field(None, description="override ds_configs/zero3_<size>.json")
    dist_timeout_s: int = Field(1800, gt=0, description="collective timeout before a rank fails")
    rank_timeout_s: int = Field(
        60,
        gt=0,
        description="a rank with no heartbeat this long (died, node lost) stops the whole job",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_size_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model_size") in SIZE_DEFAULTS:
            defaults = dict(SIZE_DEFAULTS[data["model_size"]])
            if data.get("num_epochs") is not None:
                if data.get("max_steps") is not None:
                    raise ValueError("give --max_steps or --num_epochs, not both")
                defaults.pop("max_steps")
            data = {**defaults, **data}
        for key in ("train_file", "eval_file", "train_weights"):  # one value given as such
            if isinstance(data, dict) and isinstance(data.get(key), str | Path | float | int):
                data = {**data, key: [data[key]]}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("--max_steps or --num_epochs is required")
        if self.train_weights is not None:
            if self.train_file is None or len(self.train_weights) != len(self.train_file):
                raise ValueError(
                    f"--train_weights: {len(self.train_weights)} weight(s) for "
                    f"{len(self.train_file or [])} --train_file(s); give one per "
                    f"file, in the same order"
                )
            if min(self.train_weights) <= 0:
                raise ValueError(
                    "--train_weights: every weight must be above 0 (leave a file out instead)"
                )
        for flag in ("train_file", "eval_file"):
            paths = getattr(self, flag) or []
            if len(set(paths)) < len(paths):
                raise ValueError(
                    f"--{flag}: {next(p for p in paths if paths.count(p) > 1)} "
                    f"is given twice (use --train_weights to weight a file)"
                )
        if (
            self.warmup_steps is not None
            and self.max_steps is not None
            and self.warmup_steps >= self.max_steps
        ):
            raise ValueError(
                f"--warmup_steps {self.warmup_steps} must be below --max_steps {self.max_steps}"
            )
        if self.model_size != "tiny" and self.base_model is None:
            raise ValueError(f"--base_model is required for --model_size {self.model_size}")
        if self.base_model is not None and not (self.base_model / "config.json").is_file():
            raise ValueError(f"--base_model {self.base_model}: no config.json there")
        if self.ds_config is not None and not self.ds_config.is_file():
            raise ValueError(f"--ds_config {self.ds_config}: file not found")
        if self.overwrite and self.resume != "none":
            raise ValueError(
                "--overwrite only applies with --resume none (start over); drop "
                "it to continue the run"
            )
        retention = {"keep_last", "keep_best", "keep_consolidated"} & self.model_fields_set
        if self.save_every_n_steps == 0 and retention:
            raise ValueError(
                f"--{sorted(retention)[0]} needs checkpoints; --save_every_n_steps 0 saves none"
            )
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise ValueError(f"--resume {self.resume}: expected auto, none or a checkpoint dir")
        return self

    @property
    def ds_config_path(self) -> Path:
        return self.ds_config or DS_CONFIG_DIR / f"zero3_{self.model_size}.json"

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, round(0.03 * self.max_steps)) if self.max_steps > 1 else 0

    @property
    def model_dir(self) -> Path:
        return self.base_model or ASSETS_DIR / "tiny_model"

    @property
    def train_paths(self) -> list[Path]:
        return list(self.train_file or [ASSETS_DIR / "q_sft_train.jsonl"])

    @property
    def eval_paths(self) -> list[Path]:
        if self.eval_file is not None:
            return list(self.eval_file)
        return [ASSETS_DIR / "q_sft_test.jsonl"] if self.train_file is None else []

    @property
    def cache_dir(self) -> Path:
        return self.data_cache_dir or Path(self.output_dir) / "data_cache"


# ---------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error on two lines; we want exactly one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message.replace("unrecognized arguments", "unknown flag"))


def _help(field: Any) -> str:
    return (field.description or "").replace("%", "%%")  # argparse formats help with %


def build_parser() -> argparse.ArgumentParser:
    """The training command line; only flags the user gives reach the pydantic model."""
    p = OneLineParser(
        prog="train.py",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        description="DeepSpeed ZeRO-3 SFT of Qwen2.5-family models on Q data.",
    )
    for name, field in RunConfig.model_fields.items():
        flag = f"--{name}"
        if name in (
            "bf16",
            "packing",
            "gradient_checkpointing",
            "wandb",
            "overwrite",
            "keep_best",
            "load_check",
            "resume_allow_changes",
            "trust_remote_code",
            "eval_at_start",
        ):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=_help(field))
        elif name in ("train_file", "eval_file", "train_weights"):
            p.add_argument(flag, nargs="+", help=_help(field))
        elif name == "save_every_n_steps":
            p.add_argument(flag, "--save_steps", dest=name, help=_help(field))
        else:
            p.add_argument(flag, help=_help(field))
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", type=int, dest="_local_rank", help=argparse.SUPPRESS)
    return p


def parse_run_config(argv: list[str]) -> RunConfig:
    """Parse and validate the command line; raises ConfigError with a one-line message."""
    ns = vars(build_parser().parse_args(argv))
    ns.pop("_local_rank", None)
    try:
        return RunConfig.model_validate(ns)
    except ValidationError as e:
        raise ConfigError(one_line_error(e, prefix="--")) from None


def one_line_error(err: ValidationError, prefix: str = "", source: str = "") -> str:
    """First pydantic error as 'SOURCE: KEY: message (got VALUE)' on one line."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    where = f"{source}: " if source else ""
    if not loc:
        return f"{where}{msg}"
    got = "" if first["type"] == "missing" else f" (got {first.get('input')!r})"
    if first["type"] == "extra_forbidden":
        return f"{where}{prefix}{loc}: unknown {'flag' if prefix else 'key'}"
    return f"{where}{prefix}{loc}: {msg}{got}"


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON


def parse_size(text: str, flag: str, bare_unit: int = 1) -> int:
    """A size flag in bytes: '5GB' and '500MB' are decimal, '4GiB' binary; K, M, G, T prefixes;
    a bare number counts in bare_unit (bytes unless said, 1e9 for --gpu_mem's GB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I?)B?|(B?))\s*", text.upper())
    if not m:
        raise ConfigError(f"{flag} {text!r}: expected a size such as 80GB, 141GiB or 500MB")
    value = float(m.group(1))
    if m.group(2):
        value *= (1024 if m.group(3) else 1000) ** " KMGT".index(m.group(2))
    elif not m.group(4):
        value *= bare_unit
    if value <= 0:
        raise ConfigError(f"{flag} {text!r}: must be positive")
    return int(value)
