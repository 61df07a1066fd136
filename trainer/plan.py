"""Memory planner: will this run fit, per GPU and per node, before anything is launched?

    plan --model_size 32b --num_nodes 4 --gpus_per_node 8 [--offload cpu] [--gpu_mem 80GB] ...

Needs no GPU and loads no weights: the parameter count comes from the model config (the shipped
Qwen2.5 shapes, or --base_model DIR/config.json) by arithmetic. Exit 0 when it fits, 3 when it
does not (after naming the smallest change that makes it fit), 2 on bad input.

The model states (parameters, gradients, optimizer states, the gather buffer) are DeepSpeed's
own ZeRO-3 accounting, `estimate_zero3_model_states_mem_needs`, split into its parts; a test
holds our numbers equal to DeepSpeed's. Everything else is ours, stated here:

activations, per GPU, bytes = micro_batch x seq x (layers x A + final norm) + logits, where A, the
bytes one Qwen2 decoder layer saves for backward per token (e = bytes per element of the
training dtype, h hidden, kv = key/value width, i intermediate, a heads), is

    A = 8h + e(9h + 4kv + 4i) + 4a

  - each RMSNorm (two per layer) saves its input upcast to fp32 (4h), the normalised value and
    the output in the training dtype (2eh);                                     -> 8h + 4eh
  - attention saves q and k before and after rotary plus their rotate_half copies, v, the SDPA
    output and the o_proj input (5h + 4kv elements) and SDPA's log-sum-exp (4a);  -> e(5h+4kv)+4a
  - the SwiGLU MLP saves gate, silu(gate), up and their product (4i elements).    -> 4ei

The loss term: our loss (trainer/loss.py) projects only the positions whose next token is
trained on (--target_fraction of the tokens, 1.0 to be safe), and only one chunk of them at a
time: a chunk of r = min(loss tokens, 2^26 / vocab) rows holds its fp32 logits, turned into the
softmax in place, and their gradient in the training dtype (the same buffer in fp32), r x vocab
x (4 + e, or 4 in fp32) bytes; beside it the hidden states picked at the loss positions and their
gradient (2e·h per loss token) and the output weight's full gradient (e·vocab·h), all made
during the loss's forward. One layer's backward holds e(3i + 2h) bytes per token of gradient
buffers; the chunk is gone by then, so the larger of the two counts. With gradient
checkpointing a layer keeps only its input (e·h per token), and the larger of the loss term and
one recomputed layer (A plus its backward buffers) counts on top. Tested against the peak of
live memory measured on CPU for the tiny model (tests/scripts/activation_peak.py), with and
without checkpointing.

Working memory beyond that: DeepSpeed's prefetch and reduce buckets from the DeepSpeed config,
and a fixed allowance for the CUDA context, NCCL and allocator fragmentation (--overhead_gb).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainer.config import (
    ASSETS_DIR,
    DS_CONFIG_DIR,
    MODEL_SIZES,
    SIZE_DEFAULTS,
    ConfigError,
    _OneLineParser,
    load_ds_config,
)
from trainer.loss import chunk_rows_for

LOGITS_ROW = "logits + loss (or one layer's backward)"
GB = 1e9  # decimal, as GPU datasheets count (an "80GB" card)

# Qwen2.5 public configs (DESIGN.md's table); vocab 151,936 for all.
QWEN25 = {
    "1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        tie_word_embeddings=True,
    ),
    "3b": dict(
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        tie_word_embeddings=False,
    ),
    "14b": dict(
        hidden_size=5120,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=13824,
        tie_word_embeddings=False,
    ),
    "32b": dict(
        hidden_size=5120,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=27648,
        tie_word_embeddings=False,
    ),
}
VOCAB = 151936


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Shape:
        try:
            return cls(
                hidden=int(c["hidden_size"]),
                layers=int(c["num_hidden_layers"]),
                heads=int(c["num_attention_heads"]),
                kv_heads=int(c.get("num_key_value_heads", c["num_attention_heads"])),
                intermediate=int(c["intermediate_size"]),
                vocab=int(c.get("vocab_size", VOCAB)),
                tied=bool(c.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ConfigError(f"model config: missing key {e.args[0]!r}") from None

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o
        return attention + 3 * h * i + 2 * h  # gate, up, down; two RMSNorm weights

    def total_params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def largest_layer_params(self) -> int:
        """The most parameters one module holds directly (DeepSpeed's 'largest layer')."""
        h = self.hidden
        return max(self.vocab * h, h * self.intermediate, h * h + h)

    def activation_bytes_per_token_layer(self, e: int) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return 8 * h + e * (9 * h + 4 * kv + 4 * i) + 4 * self.heads


@dataclass(frozen=True)
class Setup:
    num_nodes: int
    gpus_per_node: int
    micro_batch: int
    seq: int
    gradient_checkpointing: bool
    offload: str  # none | cpu | nvme
    bf16: bool
    gpu_mem: float  # bytes
    target_fraction: float = 1.0
    total_gpus: int | None = None  # a hostfile's slots summed, when nodes differ
    overhead: float = 1.5 * GB
    prefetch_bucket: int = 0  # elements, from the DeepSpeed config
    reduce_bucket: int = 0

    @property
    def gpus(self) -> int:
        return self.total_gpus or self.num_nodes * self.gpus_per_node


@dataclass
class Estimate:
    rows: dict[str, float]  # per-GPU bytes by part
    gpu_total: float
    cpu_per_node: float
    checkpoint_disk: float
    consolidated_disk: float
    consolidation_ram: float
    fits: bool


def estimate(shape: Shape, s: Setup) -> Estimate:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    n, w = shape.total_params(), s.gpus
    e = 2 if s.bf16 else 4
    largest = shape.largest_layer_params()
    offload_opt = s.offload in ("cpu", "nvme")
    offload_params = s.offload == "nvme"  # nvme: parameters and optimizer states both leave GPU
    cpu_ds, _, gather = estimate_zero3_model_states_mem_needs(
        total_params=n,
        largest_layer_params=largest,
        num_gpus_per_node=s.gpus_per_node,
        num_nodes=s.num_nodes,
        cpu_offload=offload_opt,
        cpu_offload_params=offload_params,
    )
    # DeepSpeed's 18 bytes/param: bf16 parameter shard 2, fp32 gradient shard 4, fp32 master
    # weights + Adam moments 12. Offload moves the last two (and, for nvme, the first) off GPU.
    params = 0.0 if offload_params else 2 * n / w
    grads = 0.0 if offload_opt else 4 * n / w
    optim = 0.0 if offload_opt else 12 * n / w

    tokens = s.micro_batch * s.seq
    per_layer = shape.activation_bytes_per_token_layer(e)
    norm = 4 * shape.hidden + 2 * e * shape.hidden  # the final RMSNorm
    loss_tokens = int(tokens * s.target_fraction)
    # fp32 logits per chunk, plus the gradient in the training dtype (in place in fp32)
    chunk = min(loss_tokens, chunk_rows_for(shape.vocab)) * shape.vocab * (4 if e == 4 else 4 + e)
    logits = chunk + 2 * e * shape.hidden * loss_tokens + e * shape.vocab * shape.hidden
    # One layer's backward also holds gradients of its MLP intermediates and hidden states.
    backward = tokens * e * (3 * shape.intermediate + 2 * shape.hidden)
    if s.gradient_checkpointing:
        # Saved: each layer's input. On top, never together: the loss's logits (before the
        # layers' backward) or one layer's recomputed activations and its backward buffers.
        activations = tokens * (shape.layers * e * shape.hidden + norm)
        peak_extra = max(logits, tokens * per_layer + backward)
    else:
        activations = tokens * (shape.layers * per_layer + norm)
        peak_extra = max(logits, backward)
    buckets = s.prefetch_bucket * e + s.reduce_bucket * 4
    rows = {
        "parameters": params,
        "gradients": grads,
        "optimizer states": optim,
        "ZeRO-3 gather buffer (largest layer)": gather,
        "activations": activations,
        LOGITS_ROW: peak_extra,
        "prefetch/reduce buckets": buckets,
        "CUDA context, NCCL, fragmentation": s.overhead,
    }
    gpu_total = float(sum(rows.values()))
    # CPU per node: DeepSpeed's figure for offload (it includes its 1.5x pinned-buffer factor);
    # without offload it is the model-loading peak it reports. nvme: the states live on disk and
    # the CPU holds staging buffers, about the offloaded parameters' working set.
    cpu = float(cpu_ds) if s.offload != "nvme" else 1.5 * 4 * largest * s.gpus_per_node
    return Estimate(
        rows=rows,
        gpu_total=gpu_total,
        cpu_per_node=cpu,
        checkpoint_disk=float(14 * n),
        consolidated_disk=float(e * n),
        consolidation_ram=0.5 * GB,
        fits=gpu_total <= s.gpu_mem,
    )


def smallest_fix(
    shape: Shape, s: Setup, max_nodes: int = 256, size: str = "7b"
) -> tuple[str, Estimate] | None:
    """The least disruptive change that fits, in the order a user would try them: one change
    (checkpointing, a smaller micro batch, the fewest extra nodes, offload), then gradient
    checkpointing together with each of the others."""
    shipped = DS_CONFIG_DIR / f"zero3_{size}_offload.json"
    offload_hint = (
        f"--ds_config {shipped.relative_to(DS_CONFIG_DIR.parent)}"
        if shipped.exists()
        else 'a --ds_config with offload_optimizer device "cpu" and a DeepSpeed '
        "optimizer block, like ds_configs/zero3_14b_offload.json"
    )

    def changes(base: Setup) -> list[tuple[str, Setup]]:
        out: list[tuple[str, Setup]] = []
        mb = base.micro_batch // 2
        while mb >= 1:
            out.append(
                (
                    f"--batch_size {mb} (raise --gradient_accumulation_steps to keep the "
                    f"global batch)",
                    replace(base, micro_batch=mb),
                )
            )
            mb //= 2
        for nodes in range(base.num_nodes + 1, max_nodes + 1):
            out.append(
                (
                    f"{nodes} nodes x {base.gpus_per_node} GPUs ({nodes * base.gpus_per_node}"
                    f" GPUs)",
                    replace(base, num_nodes=nodes, total_gpus=None),
                )
            )
        if base.offload == "none":
            out.append(
                (
                    f"CPU offload of the optimizer ({offload_hint}; plan it with --offload cpu)",
                    replace(base, offload="cpu"),
                )
            )
        if base.offload != "nvme":
            out.append(
                (
                    "NVMe offload of parameters and optimizer (a --ds_config with "
                    'offload_param/offload_optimizer device "nvme"; plan it with --offload '
                    "nvme)",
                    replace(base, offload="nvme"),
                )
            )
        return out

    candidates = []
    if not s.gradient_checkpointing:
        gc = replace(s, gradient_checkpointing=True)
        candidates.append(("--gradient_checkpointing", gc))
    candidates += changes(s)
    if not s.gradient_checkpointing:
        candidates += [(f"--gradient_checkpointing and {text}", cand) for text, cand in changes(gc)]
    for text, cand in candidates:
        est = estimate(shape, cand)
        if est.fits:
            return text, est
    return None


def parse_size(text: str) -> float:
    """'80GB', '80GiB', '80' (GB) -> bytes."""
    t = text.strip().upper()
    for suffix, mult in (("GIB", 2**30), ("GB", GB), ("G", GB), ("TB", 1e12)):
        if t.endswith(suffix):
            t, factor = t[: -len(suffix)], mult
            break
    else:
        factor = GB
    try:
        value = float(t)
    except ValueError:
        raise ConfigError(f"--gpu_mem {text!r}: expected a size like 80GB or 141GiB") from None
    if value <= 0:
        raise ConfigError(f"--gpu_mem {text!r}: must be positive")
    return value * factor


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


def model_shape(size: str, base_model: Path | None) -> Shape:
    if base_model is not None:
        path = Path(base_model) / "config.json"
        try:
            return Shape.from_config(json.loads(path.read_text()))
        except OSError as e:
            raise ConfigError(f"--base_model {base_model}: {e.strerror}: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    if size == "tiny":
        return Shape.from_config(
            json.loads((ASSETS_DIR / "tiny_model" / "config.json").read_text())
        )
    return Shape.from_config({**QWEN25[size], "vocab_size": VOCAB})


def _gb(x: float) -> str:
    return f"{x / GB:,.1f} GB"


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
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


@dataclass(frozen=True)
class Retention:
    max_steps: int
    save_every: int
    consolidate: str
    keep_last: int
    keep_consolidated: int
    keep_best: bool

    def saves(self) -> int:
        if self.save_every <= 0:
            return 0
        return len(
            set(range(self.save_every, self.max_steps + 1, self.save_every)) | {self.max_steps}
        )

    def peak_disk(self, est: Estimate) -> tuple[float, int, int]:
        """(bytes, resumable states, consolidated models) at the run's fullest moment: the end,
        with a new checkpoint written before retention removes an older state."""
        n = self.saves()
        extra = 1 if self.keep_best else 0
        states = n if self.keep_last <= 0 else min(n, self.keep_last + 1 + extra)
        models = {"every": n, "final": min(n, 1), "none": 0}[self.consolidate]
        if self.keep_consolidated > 0:
            models = min(models, self.keep_consolidated + extra)
        return (states * est.checkpoint_disk + models * est.consolidated_disk, states, models)


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
        gpu_mem=parse_size(args.gpu_mem),
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
