"""The training loss: summed cross-entropy of the target tokens, from the final hidden states,
in chunks, so the full-vocabulary logits of a micro-batch never exist at once.

Why our own: the model's loss (and our earlier one) projects every loss position to the
vocabulary at once. With Qwen2.5's 151,936 rows, 4096 target tokens hold 2.5 GB of fp32 logits
plus their bf16 copy and gradient per micro-batch — more than the 1.5B model's states per GPU
on 8 GPUs (3.4 GB). Here the hidden states at the target positions are projected `chunk_rows`
at a time, each chunk's log-sum-exp, loss and gradients computed and its logits freed: the
loss's peak memory is O(chunk_rows x vocab) (`CHUNK_ELEMENTS` logits, 256 MiB in fp32),
whatever the micro-batch.

Forward computes the loss only (evaluation costs one projection and no gradient buffers);
backward makes each chunk's logits again and turns them into gradients, scaled by the upstream
gradient in fp32 before the cast to the training dtype, as autograd does on full logits. The
recomputation costs a third more of the output projection's FLOPs; keeping the logits would
cost the memory this exists to save.

Under ZeRO-3 the output weight is partitioned: it is whole only inside the forward of the module
that owns it, and its gradient must reach it through autograd to be reduced. So the chunked loss
runs as the forward of the model's own `lm_head` (its class switched in place to
`LinearWithLoss`: same instance, parameters and DeepSpeed hooks), called from the model's
forward (`install`), and the engine's forward returns the loss. Backward finds the weight whole
again because DeepSpeed re-gathers a module's parameters before its backward, as for any Linear
that saved its weight. A tied output weight is the embedding's parameter, gathered and reduced
like any other.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import attention

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (rows x vocab): 256 MiB in fp32
LOSSES = ("chunked", "full")


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T, targets), chunk_rows rows at a time.

    hidden [N, d], weight [V, d], targets [N] (IGNORE_INDEX rows count nothing) -> fp32 scalar.
    The math is that of F.cross_entropy on fp32 logits (what transformers' loss does with
    logits.float()): per row log-sum-exp minus the target logit; gradient softmax - one-hot,
    scaled by the upstream gradient in fp32 before it is cast to the training dtype, as autograd
    does on the full logits. Forward computes the loss only (evaluation costs one projection);
    backward makes each chunk's logits again.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            t = targets[start : start + chunk_rows]
            logits = _logits(hidden[start : start + chunk_rows], weight)
            picked = logits.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
            top, sums = _exp_shifted_(logits)
            total += ((sums.log() + top - picked) * (t != IGNORE_INDEX)).sum()
            del logits  # one chunk at a time, never two
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, targets = ctx.saved_tensors
        rows = ctx.chunk_rows
        grad_h = torch.empty_like(hidden)
        # Accumulated in the weight's dtype; each chunk's matmul accumulates in fp32 inside.
        grad_w = torch.zeros_like(weight)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            probs = _logits(h, weight)
            _, sums = _exp_shifted_(probs)
            probs.div_(sums.unsqueeze(1))  # softmax, in place
            valid = (t != IGNORE_INDEX).unsqueeze(1)
            probs.scatter_add_(1, t.clamp_min(0).unsqueeze(1), -valid.to(probs.dtype))
            probs.mul_(valid * grad_out)  # fp32, before the cast
            g = probs.to(hidden.dtype)
            grad_h[start : start + rows] = g @ weight
            grad_w.addmm_(g.T, h)
            del probs, g
        return grad_h, grad_w, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One chunk's logits in fp32 (the training dtype's product is freed at once)."""
    return (h @ weight.T).float()


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits <- exp(logits - row max), in place; returns (row max, row sums), both [n].

    log-sum-exp = log(sums) + max. In place because torch.logsumexp would allocate a second
    [n, V] fp32 buffer.
    """
    top = logits.amax(dim=-1, keepdim=True)
    sums = logits.sub_(top).exp_().sum(dim=-1)
    return top.squeeze(1), sums


def chunk_rows_for(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class LinearWithLoss(nn.Linear):
    """An output projection that, given targets, returns their summed cross-entropy instead of
    logits (chunked, or all at once with loss_impl "full": the old path, for benchmarks)."""

    loss_impl = "chunked"
    chunk_rows: int | None = None  # None: chunk_rows_for(vocab)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        if self.loss_impl == "full":
            return F.cross_entropy(
                F.linear(hidden, self.weight).float(),
                targets,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        rows = self.chunk_rows or chunk_rows_for(self.weight.shape[0])
        return LinearCrossEntropy.apply(hidden, self.weight, targets, rows)


def _forward_with_loss(
    self: Any,
    *args: Any,
    loss_positions: torch.Tensor | None = None,
    loss_targets: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """The model's forward; with loss_targets, the decoder then our loss (a scalar)."""
    if loss_targets is None:
        return type(self).forward(self, *args, **kwargs)
    hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, loss_positions)
    return self.get_output_embeddings()(picked, targets=loss_targets)


def install(model: Any, loss_impl: str = "chunked") -> Any:
    """Give `model` (a transformers causal LM: decoder, then a bias-free linear head) the loss
    forward. Idempotent; before or after deepspeed.initialize (the instances stay the same)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise TypeError(f"{type(model).__name__}: the output layer is not a bias-free Linear")
    head.__class__ = LinearWithLoss
    head.loss_impl = loss_impl
    model.forward = types.MethodType(_forward_with_loss, model)
    return model


def summed_loss(model: Any, micro_batch: dict[str, torch.Tensor], device: Any) -> torch.Tensor:
    """Summed target-token cross-entropy of a micro-batch (a graph to backpropagate).

    `model` is the DeepSpeed engine (its forward is a collective under ZeRO-3) or a plain
    model (installed here if needed). The micro-batch is on the host: the target positions and
    the packed-example boundaries are found there, once, with no device sync per layer. Packed
    rows are laid end to end as one: they are independent (positions restart, every example's
    first label is ignored), so attention (per example) and the MLP (per token) see the same
    thing. Training and evaluation both use this function.
    """
    module = getattr(model, "module", model)
    if not isinstance(module.get_output_embeddings(), LinearWithLoss):
        install(module)
    extra: dict[str, Any] = {}
    if "position_ids" in micro_batch and "attention_mask" not in micro_batch:  # packed rows
        micro_batch = {k: v.reshape(1, -1) for k, v in micro_batch.items()}
        extra["packed"] = attention.Packed.from_position_ids(micro_batch["position_ids"], device)
    labels = micro_batch["labels"]
    # Position p is a loss position when its next token is a target (the usual shift by one).
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    positions = rows * labels.shape[1] + cols
    targets = labels[rows, cols + 1]
    batch = {k: v.to(device) for k, v in micro_batch.items() if k != "labels"}
    return model(
        **batch,
        **extra,
        use_cache=False,
        loss_positions=positions.to(device),
        loss_targets=targets.to(device),
    )
