"""Batching: the deterministic data stream, sharding over ranks, padding and exact packing.

The stream is a sequence of *units*: single examples, or with packing, bins of examples that
fill one sequence of max_seq_length tokens. An optimizer step takes the next
micro x accum x world units, starting at the number of units consumed so far; micro-batch j of
rank r takes a contiguous slice of that global batch. So the same units are seen whatever the
split between ranks and accumulation, and a resumed run (even on another number of ranks)
continues the stream exactly where it stopped: nothing skipped or repeated.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data import IGNORE_INDEX, DataError, TokenizedSet


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step for this rank, and the step's global token count.

    `num_label_tokens` counts target tokens over all micro-batches of all ranks in the step; every
    rank computes it locally from the shared order, so no collective is needed to normalise.
    """

    micro_batches: list[dict[str, torch.Tensor]]
    num_label_tokens: int
    sample_ids: list[int]  # source-file indices of the whole global batch, all ranks
    tokens: int  # non-padding tokens in this rank's micro-batches
    padded_tokens: int  # positions in this rank's micro-batches, padding included


def pack_bfd(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of examples into sequences of `capacity` tokens.

    Examples go in decreasing length (ties in `order`'s order, so a new permutation gives new
    bins), each into the bin with the least room that still fits it.
    """
    rank_in_order = {ex: i for i, ex in enumerate(order)}
    items = sorted(order, key=lambda ex: (-lengths[ex], rank_in_order[ex]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    for ex in items:
        k = bisect.bisect_left(free, (lengths[ex], -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(ex)
        if room - lengths[ex] > 0:
            bisect.insort(free, (room - lengths[ex], b))
    return bins


class Sampler:
    """Deterministic global-batch sampler sharded over data-parallel ranks (see module doc).

    Epoch e's units come from a permutation drawn from (seed, e); with packing the permuted
    examples are bin-packed and the bins shuffled again, so bins differ between epochs.
    """

    def __init__(self, data: TokenizedSet, micro: int, accum: int, world: int, rank: int,
                 seed: int, pad_id: int, pack_to: int | None = None):
        self.data, self.micro, self.accum, self.world, self.rank = data, micro, accum, world, rank
        self.seed, self.pad_id, self.pack_to = seed, pad_id, pack_to
        self.global_batch = micro * accum * world
        self._cached: tuple[int, list[list[int]]] | None = None
        self._epoch_sizes: list[int] = []
        if len(self.units(0)) < self.global_batch:
            what = "packed sequences" if pack_to else "training examples"
            raise DataError(f"{len(self.units(0))} {what} are fewer than one global batch "
                            f"(batch_size {micro} x grad_accum {accum} x world {world}); "
                            f"lower the batch flags")

    @property
    def steps_per_epoch(self) -> float:
        return len(self.units(0)) / self.global_batch

    def units(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            if self.pack_to is None:
                units = [[int(i)] for i in perm]
            else:
                lengths = [len(x) for x in self.data.input_ids]
                bins = pack_bfd(lengths, [int(i) for i in perm], self.pack_to)
                shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(bins))
                units = [bins[int(i)] for i in shuffle]
            self._cached = (epoch, units)
        return self._cached[1]

    def _epoch_start(self, epoch: int) -> int:
        while len(self._epoch_sizes) < epoch:
            self._epoch_sizes.append(len(self.units(len(self._epoch_sizes))))
        return sum(self._epoch_sizes[:epoch])

    def global_units(self, start: int) -> list[list[int]]:
        """The units at stream positions [start, start + global_batch)."""
        out, pos, epoch = [], start, 0
        while self._epoch_start(epoch + 1) <= pos:
            epoch += 1
        while len(out) < self.global_batch:
            k = pos - self._epoch_start(epoch)
            units = self.units(epoch)
            take = min(self.global_batch - len(out), len(units) - k)
            out += units[k:k + take]
            pos += take
            epoch += 1
        return out

    def step(self, start: int) -> StepBatches:
        """The batches of the optimizer step that begins at stream position `start`
        (the units consumed before it, over all ranks)."""
        chosen = self.global_units(start)
        n_tokens = sum(self.data.label_tokens(i) for unit in chosen for i in unit)
        micro_batches, tokens, padded = [], 0, 0
        for j in range(self.accum):
            base = j * self.micro * self.world + self.rank * self.micro
            units = chosen[base:base + self.micro]
            if self.pack_to is None:
                mb = collate([self.data.input_ids[u[0]] for u in units],
                             [self.data.labels[u[0]] for u in units], self.pad_id)
            else:
                mb = collate_packed(units, self.data, self.pad_id)
            micro_batches.append(mb)
            tokens += sum(len(self.data.input_ids[i]) for u in units for i in u)
            padded += mb["input_ids"].numel()
        ids = [self.data.ids[i] for unit in chosen for i in unit]
        return StepBatches(micro_batches, n_tokens, ids, tokens, padded)


def collate(input_ids: list[list[int]], labels: list[list[int]], pad_id: int
            ) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; pad positions are masked and ignored by the loss."""
    width = max(map(len, input_ids))
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        ids[row, : len(x)] = torch.tensor(x)
        lab[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def collate_packed(units: list[list[int]], data: TokenizedSet, pad_id: int
                   ) -> dict[str, torch.Tensor]:
    """One row per bin: its examples back to back, position_ids restarting at 0 for each.

    No attention_mask is passed: transformers (5.x, sdpa/eager/flex via create_causal_mask and
    flash-attention via cu_seqlens) then reads example boundaries from the position_ids and
    makes attention block-diagonal, so examples never see each other — but only without a KV
    cache, hence use_cache=False in the model config and in every training forward. Each
    example's first label is IGNORE_INDEX, so the last token of one example is never trained to
    predict the first of the next. Tail padding is one more "example" whose labels are all
    ignored.
    """
    width = max(sum(len(data.input_ids[i]) for i in unit) for unit in units)
    ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    lab = torch.full((len(units), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(units), width), dtype=torch.long)
    for row, examples in enumerate(units):
        at = 0
        for i in examples:
            x, y = data.input_ids[i], data.labels[i]
            ids[row, at:at + len(x)] = torch.tensor(x)
            lab[row, at + 1:at + len(y)] = torch.tensor(y[1:])
            pos[row, at:at + len(x)] = torch.arange(len(x))
            at += len(x)
        pos[row, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": lab, "position_ids": pos}


def eval_batches(data: TokenizedSet, batch: int, world: int, rank: int, pad_id: int
                 ) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's eval micro-batches, padded so that every rank runs the same number.

    Under ZeRO-3 a forward pass is a collective, so a rank with fewer examples still runs the
    forward; the flag says whether its result counts.
    """
    per_rank = math.ceil(len(data) / world)
    n_batches = math.ceil(per_rank / batch)
    mine = list(range(rank, len(data), world))
    for b in range(n_batches):
        idx = mine[b * batch:(b + 1) * batch]
        real = bool(idx)
        idx = idx or [0]
        yield collate([data.input_ids[i] for i in idx], [data.labels[i] for i in idx],
                      pad_id), real
