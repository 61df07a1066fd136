"""Memory planner: will this run fit, per GPU and per node, before anything is launched?

Needs no GPU and loads no weights: the parameter count comes from the model config (the shipped
Qwen2.5 shapes, or --base_model DIR/config.json) by arithmetic. The command line (qsft-plan) and
its report are in trainer.offline.plan_cli.

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

import json
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config import (
    ASSETS_DIR,
    DS_CONFIG_DIR,
    ConfigError,
)
from trainer.loss import chunk_rows_for
from trainer.shape import VOCAB, Shape

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
