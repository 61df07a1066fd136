"""qsft-plan: the memory planner's command line, its report and the DeepSpeed hostfile reader.

    qsft-plan --model_size 32b --num_nodes 4 --gpus_per_node 8 [--offload cpu] [--gpu_mem 80GB]

(or python -m trainer.offline.plan_cli). The arithmetic is in trainer.offline.plan. Exit 0 when
the run fits, 3 when it does not (after naming the smallest change that makes it fit), 2 on bad
input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.config import (
    DS_CONFIG_DIR,
    MODEL_SIZES,
    SIZE_DEFAULTS,
    ConfigError,
    OneLineParser,
    parse_size,
)
from trainer.ds_config import load_ds_config
from trainer.offline.plan import (
    GB,
    Estimate,
    Retention,
    Setup,
    Shape,
    estimate,
    model_shape,
    smallest_fix,
)


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """DeepSpeed hostfile lines `host slots=N` (comments and blank lines allowed)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--hostfile {path}: {e.strerror}") from None
    hosts: list[tuple[str, int]] = []
    for no, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise ConfigError(f"{path}: line {no}: expected 'HOSTNAME slots=N', got {line!r}")
        try:
            slots = int(parts[1].removeprefix("slots="))
        except ValueError:
            slots = 0
        if slots < 1:
            raise ConfigError(f"{path}: line {no}: slots must be a positive integer")
        if any(h == parts[0] for h, _ in hosts):
            raise ConfigError(f"{path}: line {no}: host {parts[0]!r} listed twice")
        hosts.append((parts[0], slots))
    if not hosts:
        raise ConfigError(f"{path}: no hosts")
    return hosts


def _gb(x: float) -> str:
    return f"{x / GB:,.1f} GB"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="plan",
        description="Per-GPU and per-node memory of a qsft "
        "ZeRO-3 run, and whether it fits; exit 0 fits, 3 does not.",
    )
    p.add_argument("--model_size", required=True, choices=MODEL_SIZES)
    p.add_argument("--base_model", type=Path, help="read the shape from DIR/config.json")
    p.add_argument("--hostfile", type=Path, help="DeepSpeed hostfile: nodes and slots")
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--ds_config", type=Path, help="default ds_configs/zero3_<size>.json")
    p.add_argument(
        "--offload", choices=("none", "cpu", "nvme"), help="default: what the DeepSpeed config says"
    )
    p.add_argument("--max_seq_length", type=int, help="default: the size's training default")
    p.add_argument("--batch_size", type=int, help="micro batch per GPU; default: the size's")
    p.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        help="default: the size's training default (on for 14b and 32b)",
    )
    p.add_argument("--gpu_mem", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB")
    p.add_argument(
        "--target_fraction",
        type=float,
        default=1.0,
        help="share of tokens that are loss targets (logits are computed only there)",
    )
    p.add_argument(
        "--overhead_gb",
        type=float,
        default=1.5,
        help="CUDA context, NCCL buffers and fragmentation per GPU",
    )
    # The run's length and retention policy, for the disk the whole run needs; defaults as in
    # launch/train.py.
    p.add_argument("--max_steps", type=int, help="default: the size's")
    p.add_argument("--save_every_n_steps", "--save_steps", type=int, help="default: the size's")
    p.add_argument("--consolidate", choices=("every", "final", "none"), help="default: the size's")
    p.add_argument(
        "--keep_last",
        type=int,
        default=2,
        help="resumable states kept (0: all), as launch/train.py",
    )
    p.add_argument(
        "--keep_consolidated",
        type=int,
        default=0,
        help="consolidated models kept (0: all), as launch/train.py",
    )
    p.add_argument("--keep_best", action=argparse.BooleanOptionalAction, default=False)
    return p


def setup_from_args(args: argparse.Namespace) -> tuple[Shape, Setup]:
    defaults = SIZE_DEFAULTS[args.model_size]  # what launch/train.py would use
    for flag in (
        "max_seq_length",
        "batch_size",
        "gradient_checkpointing",
        "max_steps",
        "save_every_n_steps",
        "consolidate",
    ):
        if getattr(args, flag) is None:
            setattr(args, flag, defaults.get(flag, False))
    for flag in ("keep_last", "keep_consolidated", "save_every_n_steps"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag} must be 0 or more")
    if args.max_steps < 1:
        raise ConfigError("--max_steps must be at least 1")
    for flag in ("num_nodes", "gpus_per_node", "max_seq_length", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1")
    if not 0 < args.target_fraction <= 1:
        raise ConfigError("--target_fraction must be in (0, 1]")
    shape = model_shape(args.model_size, args.base_model)
    ds_path = args.ds_config or DS_CONFIG_DIR / f"zero3_{args.model_size}.json"
    ds = load_ds_config(ds_path)
    zero = ds.get("zero_optimization", {})
    offload = args.offload
    if offload is None:
        devices = {
            (zero.get(k) or {}).get("device", "none")
            for k in ("offload_optimizer", "offload_param")
        }
        offload = "nvme" if "nvme" in devices else "cpu" if "cpu" in devices else "none"
    if args.hostfile is not None:
        hosts = read_hostfile(args.hostfile)
        nodes, per_node = len(hosts), max(slots for _, slots in hosts)
        total = sum(slots for _, slots in hosts) if len({n for _, n in hosts}) > 1 else None
        if total:
            print(
                f"note: {args.hostfile}: nodes have different slot counts; {total} GPUs in "
                f"all, CPU RAM planned for the fullest node ({per_node})",
                file=sys.stderr,
            )
    else:
        nodes, per_node, total = args.num_nodes, args.gpus_per_node, None
    return shape, Setup(
        num_nodes=nodes,
        gpus_per_node=per_node,
        micro_batch=args.batch_size,
        seq=args.max_seq_length,
        gradient_checkpointing=args.gradient_checkpointing,
        offload=offload,
        bf16=bool((ds.get("bf16") or {}).get("enabled", False)),
        gpu_mem=parse_size(args.gpu_mem, "--gpu_mem", bare_unit=GB),
        target_fraction=args.target_fraction,
        overhead=args.overhead_gb * GB,
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 0)),
        reduce_bucket=int(zero.get("reduce_bucket_size", 0)),
        total_gpus=total,
    )


def retention_from_args(args: argparse.Namespace) -> Retention:
    return Retention(
        args.max_steps,
        args.save_every_n_steps,
        args.consolidate,
        args.keep_last,
        args.keep_consolidated,
        args.keep_best,
    )


def report(shape: Shape, s: Setup, est: Estimate, keep: Retention | None = None) -> str:
    n = shape.total_params()
    lines = [
        f"model: {n / 1e9:.2f}B parameters (hidden {shape.hidden}, {shape.layers} layers, "
        f"vocab {shape.vocab}{', tied' if shape.tied else ''}); "
        + (
            f"{s.num_nodes} node(s), {s.gpus} GPUs in all"
            if s.total_gpus
            else f"{s.num_nodes} node(s) x {s.gpus_per_node} GPUs = {s.gpus}"
        )
        + "; micro batch "
        f"{s.micro_batch} x {s.seq} tokens; {'bf16' if s.bf16 else 'fp32'}; gradient "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}; offload {s.offload}",
        "",
        "| per GPU | memory |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_gb(v)} |" for k, v in est.rows.items()]
    lines += [
        f"| **total** | **{_gb(est.gpu_total)}** of {_gb(s.gpu_mem)} |",
        "",
        "| elsewhere | size |",
        "|---|---|",
        f"| CPU RAM per node (model states{', offload' if s.offload != 'none' else ''}) "
        f"| {_gb(est.cpu_per_node)} |",
        f"| checkpoint on disk (ZeRO shards: 2 + 12 bytes/param) | {_gb(est.checkpoint_disk)} |",
        f"| consolidated/ per checkpoint (training dtype) | {_gb(est.consolidated_disk)} |",
        f"| consolidation peak RAM (streaming; bench/consolidate.py) "
        f"| about {_gb(est.consolidation_ram)} |",
    ]
    if keep is not None and keep.saves():
        total, states, models = keep.peak_disk(est)
        everything = keep.saves() * (
            est.checkpoint_disk + est.consolidated_disk * (keep.consolidate == "every")
        ) + est.consolidated_disk * (keep.consolidate == "final")
        lines.append(
            f"| disk for the whole run: {keep.saves()} saves over {keep.max_steps} "
            f"steps; at most {states} resumable state(s) (--keep_last "
            f"{keep.keep_last}{', --keep_best' if keep.keep_best else ''}) and "
            f"{models} consolidated model(s) (--consolidate {keep.consolidate}"
            + (f", --keep_consolidated {keep.keep_consolidated}" if keep.keep_consolidated else "")
            + f") | {_gb(total)} "
            f"(keeping every state: {_gb(everything)}) |"
        )
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # bad flags raise ConfigError: one line, exit 2
        shape, s = setup_from_args(args)
        est = estimate(shape, s)
    except ConfigError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    print(report(shape, s, est, retention_from_args(args)))
    if est.fits:
        print(
            f"FITS: {_gb(est.gpu_total)} per GPU of {_gb(s.gpu_mem)} "
            f"({est.gpu_total / s.gpu_mem:.0%})."
        )
        return 0
    fix = smallest_fix(shape, s, size=args.model_size)
    print(f"DOES NOT FIT: {_gb(est.gpu_total)} per GPU > {_gb(s.gpu_mem)}.")
    if fix is None:
        print("No single change found that fits; reduce --max_seq_length.")
    else:
        text, fixed = fix
        print(f"Smallest change that fits: {text} -> {_gb(fixed.gpu_total)} per GPU.")
    return 3


if __name__ == "__main__":
    sys.exit(main())
