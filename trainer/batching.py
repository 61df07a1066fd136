"""Batching: the deterministic data stream, sharding over ranks, padding and exact packing.

The stream is a sequence of *units*: single examples, or with packing, bins of examples that
fill one sequence of max_seq_length tokens. An optimizer step takes the next
micro x accum x world units, starting at the number of units consumed so far; micro-batch j of
rank r takes a contiguous slice of that global batch. So the same units are seen whatever the
split between ranks and accumulation, and a resumed run (even on another number of ranks)
continues the stream exactly where it stopped: nothing skipped or repeated.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.data import IGNORE_INDEX
from trainer.records import DataError
from trainer.tokenized import TokenizedSet


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


def pack_bfd(
    lengths: list[int] | np.ndarray, order: list[int] | np.ndarray, capacity: int
) -> list[list[int]]:
    """Best-fit-decreasing bin packing of examples into sequences of `capacity` tokens.

    Examples go in decreasing length (ties in `order`'s order, so a new permutation gives new
    bins), each into the bin with the least room that still fits it (the oldest such bin).
    """
    items, starts = pack_bfd_flat(np.asarray(lengths), np.asarray(order, dtype=np.int64), capacity)
    return [items[starts[b] : starts[b + 1]].tolist() for b in range(len(starts) - 1)]


def pack_bfd_flat(
    lengths: np.ndarray, order: np.ndarray, capacity: int
) -> tuple[np.ndarray, np.ndarray]:
    """pack_bfd as flat arrays: bin b holds items[starts[b]:starts[b + 1]], bins in the order
    they were opened, each bin's examples in the order they went in.

    Our own rather than a sorted list of free bins (bisect.insort moves the list on every
    insert: minutes for a million examples): bins with the same room sit in one heap (oldest
    first), and one Python int is a bitset of the room values that have a bin, so "least room
    >= n" is a shift and a lowest-set-bit; ~1 s per million examples.
    """
    ranked = order[np.argsort(-lengths[order], kind="stable")]
    sizes = lengths[ranked].tolist()
    bin_of = np.empty(len(ranked), dtype=np.int64)
    heaps: dict[int, list[int]] = {}
    rooms = 0  # bit r set: some bin has exactly r tokens of room
    n_bins = 0
    for j, n in enumerate(sizes):
        fits = rooms >> n
        if fits:
            room = n + (fits & -fits).bit_length() - 1
            heap = heaps[room]
            b = heapq.heappop(heap)
            if not heap:
                rooms ^= 1 << room
        else:
            room, b = capacity, n_bins
            n_bins += 1
        bin_of[j] = b
        left = room - n
        if left > 0:
            heap = heaps.setdefault(left, [])
            if not heap:
                rooms |= 1 << left
            heapq.heappush(heap, b)
    grouped = np.argsort(bin_of, kind="stable")
    starts = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bin_of, minlength=n_bins), out=starts[1:])
    return ranked[grouped], starts


class Units:
    """An epoch's units as flat arrays: unit u is the examples items[starts[u]:starts[u + 1]]
    (16 bytes per example instead of a Python list per unit)."""

    def __init__(self, items: np.ndarray, starts: np.ndarray):
        self.items, self.starts = items, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, u: int | slice) -> Any:
        if isinstance(u, slice):
            return [self[k] for k in range(*u.indices(len(self)))]
        u = u if u >= 0 else len(self) + u
        return self.items[self.starts[u] : self.starts[u + 1]].tolist()

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def reordered(self, order: np.ndarray) -> Units:
        """The units in the given order."""
        sizes = np.diff(self.starts)[order]
        starts = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        gather = np.repeat(self.starts[:-1][order] - starts[:-1], sizes) + np.arange(starts[-1])
        return Units(self.items[gather], starts)


def quotas(weights: list[float], sizes: list[int]) -> list[int]:
    """Examples each file contributes to an epoch of sum(sizes) examples, in proportion to its
    weight (largest remainder, so they add up exactly; sizes themselves for weights proportional
    to the sizes)."""
    total, wsum = sum(sizes), sum(weights)
    exact = [w / wsum * total for w in weights]
    out = [int(x + 1e-9) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


class Sampler:
    """Deterministic global-batch sampler sharded over data-parallel ranks (see module doc).

    Epoch e's units come from a permutation drawn from (seed, e); with packing the permuted
    examples are bin-packed and the bins shuffled again, so bins differ between epochs. For a
    mix of files with weights, an epoch first draws each file's quota (see quotas) from that
    file's own seeded stream of permutations: a file with less weight than its size shows
    different examples each epoch, one with more repeats some.
    """

    def __init__(
        self,
        data: TokenizedSet,
        micro: int,
        accum: int,
        world: int,
        rank: int,
        seed: int,
        pad_id: int,
        pack_to: int | None = None,
    ):
        self.data, self.micro, self.accum, self.world, self.rank = data, micro, accum, world, rank
        self.seed, self.pad_id, self.pack_to = seed, pad_id, pack_to
        self.global_batch = micro * accum * world
        self._cached: tuple[int, Units] | None = None
        self._epoch_sizes: list[int] = []
        parts = [p for p in data.parts if p.get("weight") is not None]
        self.quotas = (
            quotas([p["weight"] for p in parts], [p["examples"] for p in parts]) if parts else None
        )
        if len(self.units(0)) < self.global_batch:
            what = "packed sequences" if pack_to else "training examples"
            raise DataError(
                f"{len(self.units(0))} {what} are fewer than one global batch "
                f"(batch_size {micro} x grad_accum {accum} x world {world}); "
                f"lower the batch flags"
            )

    @property
    def steps_per_epoch(self) -> float:
        return len(self.units(0)) / self.global_batch

    def epoch_examples(self, epoch: int) -> np.ndarray:
        """The examples of an epoch before shuffling: every one once, or each file's quota."""
        if self.quotas is None:
            return np.arange(len(self.data), dtype=np.int64)
        picks = []
        for k, (part, quota) in enumerate(zip(self.data.parts, self.quotas, strict=True)):
            n, first = part["examples"], part["first_example"]
            if quota == n:
                picks.append(first + np.arange(n, dtype=np.int64))
                continue
            # Positions [epoch * quota, (epoch + 1) * quota) of the file's stream: one seeded
            # permutation of its examples after another.
            lo, hi = epoch * quota, (epoch + 1) * quota
            cycles = (
                [
                    np.random.default_rng([self.seed, 1, k, c]).permutation(n)
                    for c in range(lo // n, (hi - 1) // n + 1)
                ]
                if quota
                else []
            )
            stream = np.concatenate(cycles) if cycles else np.zeros(0, dtype=np.int64)
            picks.append(first + stream[lo - (lo // n) * n : hi - (lo // n) * n])
        return np.concatenate(picks)

    def units(self, epoch: int) -> Units:
        if self._cached is None or self._cached[0] != epoch:
            examples = self.epoch_examples(epoch)
            order = examples[np.random.default_rng([self.seed, epoch]).permutation(len(examples))]
            if self.pack_to is None:
                units = Units(order, np.arange(len(order) + 1, dtype=np.int64))
            else:
                bins = Units(*pack_bfd_flat(self.data.lengths, order, self.pack_to))
                shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(bins))
                units = bins.reordered(shuffle)
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
            out += units[k : k + take]
            pos += take
            epoch += 1
        return out

    def step(self, start: int) -> StepBatches:
        """The batches of the optimizer step that begins at stream position `start`
        (the units consumed before it, over all ranks)."""
        chosen = self.global_units(start)
        flat = [i for unit in chosen for i in unit]
        n_tokens = int(self.data.n_labels[flat].sum())
        micro_batches, tokens, padded = [], 0, 0
        column = self.data.input_ids
        for j in range(self.accum):
            base = j * self.micro * self.world + self.rank * self.micro
            units = chosen[base : base + self.micro]
            if self.pack_to is None:
                mb = collate(
                    [column.array(u[0]) for u in units],
                    [self.data.labels.array(u[0]) for u in units],
                    self.pad_id,
                )
            else:
                mb = collate_packed(units, self.data, self.pad_id)
            micro_batches.append(mb)
            tokens += int(sum(self.data.lengths[i] for u in units for i in u))
            padded += mb["input_ids"].numel()
        ids = [int(x) for x in self.data.ids[flat]]
        return StepBatches(micro_batches, n_tokens, ids, tokens, padded)


def _long(tokens: Any) -> torch.Tensor:
    # A copy: the memory-mapped buffers are read-only, and int32 on disk.
    return torch.from_numpy(np.array(tokens, dtype=np.int64))


def collate(input_ids: list[Any], labels: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; pad positions are masked and ignored by the loss."""
    width = max(map(len, input_ids))
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        ids[row, : len(x)] = _long(x)
        lab[row, : len(y)] = _long(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def collate_packed(
    units: list[list[int]], data: TokenizedSet, pad_id: int
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
    width = max(int(sum(data.lengths[i] for i in unit)) for unit in units)
    ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    lab = torch.full((len(units), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(units), width), dtype=torch.long)
    for row, examples in enumerate(units):
        at = 0
        for i in examples:
            x, y = data.input_ids.array(i), data.labels.array(i)
            ids[row, at : at + len(x)] = _long(x)
            lab[row, at + 1 : at + len(y)] = _long(y[1:])
            pos[row, at : at + len(x)] = torch.arange(len(x))
            at += len(x)
        pos[row, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": lab, "position_ids": pos}


def eval_batches(
    data: TokenizedSet, batch: int, world: int, rank: int, pad_id: int
) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's eval micro-batches, padded so that every rank runs the same number.

    Under ZeRO-3 a forward pass is a collective, so a rank with fewer examples still runs the
    forward; the flag says whether its result counts.
    """
    per_rank = math.ceil(len(data) / world)
    n_batches = math.ceil(per_rank / batch)
    mine = list(range(rank, len(data), world))
    for b in range(n_batches):
        idx = mine[b * batch : (b + 1) * batch]
        real = bool(idx)
        idx = idx or [0]
        yield (
            collate(
                [data.input_ids.array(i) for i in idx], [data.labels.array(i) for i in idx], pad_id
            ),
            real,
        )
