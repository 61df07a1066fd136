"""Tokenized data as flat arrays: what the sampler, the packer and eval read.

A tokenized file is a table with one row per record: `input_ids` and `labels` (lists of int32),
`state` (kept, truncated to max_seq_length, or dropped), `n_labels` (trained tokens, the first
position excluded), `merged` (raw format: prompt and completion share a token), `end_tokens`
and `record` (the record's index in its file). The same function fills it in memory (tests, the
data tools) and in the `datasets` map that writes the on-disk cache (trainer.datacache).

Token lists are never Python lists of ints at run time: a :class:`TokenColumn` keeps where
each example's tokens are (the cache's Arrow files, read on demand, see FileValues; or one
numpy array for a set tokenized in memory) and per-example offsets; lengths and label counts are
small numpy arrays. So a rank's resident memory for the data is under 100 bytes per example,
whatever the number of tokens.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import IGNORE_INDEX, encode_batch, resolve_prompt_format
from trainer.records import DataError, RecordError, Records

KEPT, TRUNCATED, DROPPED = 0, 1, 2


def tokenize_columns(
    recs: list[dict[str, Any]],
    record_index: list[int],
    tokenizer: Any,
    prompt_format: str,
    max_seq_length: int,
    overlong: str,
) -> dict[str, list]:
    """The table rows of a batch of validated records (raises RecordError for a bad one).

    Over max_seq_length: cut to it; dropped with --overlong drop, or when nothing trained is
    left in the cut; otherwise kept as truncated (prompt and the start of its answer, without
    the end token). Dropped rows keep no tokens.
    """
    cols: dict[str, list] = {
        k: []
        for k in ("input_ids", "labels", "state", "n_labels", "merged", "end_tokens", "record")
    }
    for enc, index in zip(encode_batch(recs, tokenizer, prompt_format), record_index, strict=True):
        ids, labels, state = enc.input_ids, enc.labels, KEPT
        if len(ids) > max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            dead = all(x == IGNORE_INDEX for x in labels[1:])
            state = DROPPED if overlong == "drop" or dead else TRUNCATED
        if state == DROPPED:
            ids, labels = [], []
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["state"].append(state)
        # The first position is never a target (the model shifts labels left by one).
        cols["n_labels"].append(max(0, len(labels) - 1 - labels[1:].count(IGNORE_INDEX)))
        cols["merged"].append(int(enc.boundary_merged and state != DROPPED))
        cols["end_tokens"].append(enc.end_tokens if state == KEPT else [])
        cols["record"].append(index)
    return cols


class OpenFile:
    """A read-only file descriptor, closed with the last chunk that reads through it."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)


class FileValues:
    """The int32 values of one Arrow buffer, read from its file on demand (os.pread).

    Not a memory map: pages of a mapping stay in the process's resident set once touched (with
    the kernel's fault-around, 64 KiB at a time), so over an epoch a mapped 1.6 GB cache would
    become 1.6 GB of every rank's RSS. Read this way the tokens live only in the page cache,
    shared by the node's ranks and evictable, and a rank holds the examples of its current
    micro-batch.
    """

    def __init__(self, file: OpenFile, pos: int, length: int):
        self.file, self.pos, self.length = file, pos, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, sl: slice) -> np.ndarray:
        lo, hi, _ = sl.indices(self.length)
        data = os.pread(self.file.fd, (hi - lo) * 4, self.pos + lo * 4)
        return np.frombuffer(data, dtype=np.int32)


class TokenColumn:
    """Per-example token lists over flat chunks: column[i] is a list, .array(i) an array.

    chunks: (values, offsets) pairs, an Arrow list array's buffers: values in memory (a numpy
    array) or in a file (FileValues); rows: the table row of each example (dropped rows are
    skipped).
    """

    def __init__(self, chunks: list[tuple[Any, np.ndarray]], rows: np.ndarray):
        self.chunks, self.rows = chunks, rows
        self._starts = [0]
        for _, offsets in chunks:
            self._starts.append(self._starts[-1] + len(offsets) - 1)

    @property
    def total_rows(self) -> int:
        return self._starts[-1]

    def __len__(self) -> int:
        return len(self.rows)

    def array(self, i: int) -> np.ndarray:
        row = int(self.rows[i])
        c = bisect.bisect_right(self._starts, row) - 1
        values, offsets = self.chunks[c]
        k = row - self._starts[c]
        return values[offsets[k] : offsets[k + 1]]

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self.array(k).tolist() for k in range(*i.indices(len(self)))]
        return self.array(i if i >= 0 else len(self) + i).tolist()

    def __iter__(self):
        return (self.array(k).tolist() for k in range(len(self)))


@dataclass
class TokenizedSet:
    """The kept examples of one file (or a mix of files) and what was dropped or cut."""

    input_ids: TokenColumn
    labels: TokenColumn
    ids: np.ndarray  # record index of each kept example (for a mix: over the files in order)
    lengths: np.ndarray  # tokens per example
    n_labels: np.ndarray  # trained tokens per example (the first position never is)
    prompt_format: str = "raw"
    dropped: int = 0
    truncated: int = 0
    boundary_merged: int = 0
    end_tokens: dict[int, int] = field(default_factory=dict)  # end token id -> answers it ends
    stats: dict[str, Any] = field(default_factory=dict)
    source: str = "data"  # the file, for messages
    parts: list[dict[str, Any]] = field(default_factory=list)  # a mix: its files, in order

    def __len__(self) -> int:
        return len(self.lengths)

    def label_tokens(self, i: int) -> int:
        return int(self.n_labels[i])


def _flat(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(offsets[-1]))
    return values, offsets


def from_chunks(
    ids_chunks: list[tuple[np.ndarray, np.ndarray]],
    label_chunks: list[tuple[np.ndarray, np.ndarray]],
    state: np.ndarray,
    n_labels: np.ndarray,
    record: np.ndarray,
    merged: np.ndarray,
    end_tokens: dict[int, int],
    prompt_format: str,
    source: str,
    max_seq_length: int,
) -> TokenizedSet:
    """A TokenizedSet over the rows of a table (chunked buffers + small per-row arrays)."""
    keep = np.flatnonzero(state != DROPPED)
    if not len(keep):
        raise DataError(
            f"{source}: every example is longer than --max_seq_length "
            f"{max_seq_length}; raise it or use --overlong truncate"
        )
    lengths = np.concatenate([np.diff(o) for _, o in ids_chunks]).astype(np.int32)[keep]
    data = TokenizedSet(
        TokenColumn(ids_chunks, keep),
        TokenColumn(label_chunks, keep),
        record.astype(np.int64)[keep],
        lengths,
        n_labels.astype(np.int64)[keep],
        prompt_format=prompt_format,
        dropped=int((state == DROPPED).sum()),
        truncated=int((state == TRUNCATED).sum()),
        boundary_merged=int(merged.sum()),
        end_tokens=dict(end_tokens),
        source=source,
    )
    data.stats = dict(
        records=len(state),
        examples=len(data),
        dropped=data.dropped,
        truncated=data.truncated,
        tokens=int(lengths.sum()),
        label_tokens=int(data.n_labels.sum()),
    )
    if prompt_format == "raw":
        data.stats["boundary_merged"] = data.boundary_merged
    return data


def count_end_tokens(end_tokens: list[list[int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for ends in end_tokens:
        for t in ends:
            out[int(t)] = out.get(int(t), 0) + 1
    return out


def tokenize_records(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    overlong: str = "drop",
    source: str = "data",
    prompt_format: str = "auto",
) -> TokenizedSet:
    """Tokenize and mask validated records in memory (small sets, tests, the data tools).

    `auto` resolves on these records (the trainer resolves it on the training set and passes
    the result for every set). The trainer's cached path fills the same table with the same
    function (trainer.datacache).
    """
    prompt_format = resolve_prompt_format(prompt_format, records)
    where = records.where if isinstance(records, Records) else (lambda i: f"{source}: record {i}")
    try:
        cols = tokenize_columns(
            list(records),
            list(range(len(records))),
            tokenizer,
            prompt_format,
            max_seq_length,
            overlong,
        )
    except RecordError as e:
        raise DataError(f"{where(e.index)}: {e}") from None
    return from_chunks(
        [_flat(cols["input_ids"])],
        [_flat(cols["labels"])],
        np.array(cols["state"], dtype=np.int8),
        np.array(cols["n_labels"]),
        np.array(cols["record"]),
        np.array(cols["merged"]),
        count_end_tokens(cols["end_tokens"]),
        prompt_format,
        source,
        max_seq_length,
    )


def mix(sets: list[TokenizedSet], weights: list[float] | None) -> TokenizedSet:
    """Several files as one set: examples in file order, record ids continued over the files.

    `parts` says which examples came from which file and the weight each gets in the epoch
    (trainer.batching.Sampler draws them). A single file with no weight is returned unchanged.
    """
    if len(sets) == 1 and weights is None:
        return sets[0]
    ids_chunks, label_chunks, rows, label_rows, ids, parts = [], [], [], [], [], []
    row0 = record0 = example0 = 0
    for k, s in enumerate(sets):
        ids_chunks += s.input_ids.chunks
        label_chunks += s.labels.chunks
        rows.append(s.input_ids.rows + row0)
        label_rows.append(s.labels.rows + row0)
        ids.append(s.ids + record0)
        parts.append(
            dict(
                path=s.source,
                examples=len(s),
                first_example=example0,
                first_record=record0,
                weight=weights[k] if weights else None,
            )
        )
        row0 += s.input_ids.total_rows
        record0 += s.stats["records"]
        example0 += len(s)
    end_tokens: dict[int, int] = {}
    for s in sets:
        for t, n in s.end_tokens.items():
            end_tokens[t] = end_tokens.get(t, 0) + n
    out = TokenizedSet(
        TokenColumn(ids_chunks, np.concatenate(rows)),
        TokenColumn(label_chunks, np.concatenate(label_rows)),
        np.concatenate(ids),
        np.concatenate([s.lengths for s in sets]),
        np.concatenate([s.n_labels for s in sets]),
        prompt_format=sets[0].prompt_format,
        dropped=sum(s.dropped for s in sets),
        truncated=sum(s.truncated for s in sets),
        boundary_merged=sum(s.boundary_merged for s in sets),
        end_tokens=end_tokens,
        source=" + ".join(s.source for s in sets),
        parts=parts,
    )
    out.stats = {
        k: sum(s.stats.get(k, 0) for s in sets)
        for k in (
            "records",
            "examples",
            "dropped",
            "truncated",
            "tokens",
            "label_tokens",
            "boundary_merged",
        )
        if k in sets[0].stats
    }
    return out


def from_arrow_files(
    files: list[Path],
    prompt_format: str,
    source: str,
    max_seq_length: int,
    end_tokens: dict[int, int] | None = None,
) -> TokenizedSet:
    """Arrow IPC files of token columns (a cache entry's, trainer.datacache) as one
    TokenizedSet: the files are memory-mapped only to read their
    layout and the small columns; token values stay in the files, read per example (see
    trainer.tokenized.FileValues); per-row offsets, lengths and counts are copied (~30 bytes
    per example)."""
    import pyarrow as pa

    ids_chunks, label_chunks, small = (
        [],
        [],
        {k: [] for k in ("state", "n_labels", "record", "merged")},
    )
    ends: list[list[int]] = []
    for name in files:
        path = str(name)
        mapped = pa.memory_map(path)
        base = mapped.read_buffer(1).address  # where the file starts in the mapping
        mapped.seek(0)
        table = pa.ipc.open_stream(mapped).read_all()
        file = OpenFile(path)
        for col, out in (("input_ids", ids_chunks), ("labels", label_chunks)):
            for chunk in table.column(col).chunks:
                values = chunk.values
                pos = values.buffers()[1].address - base + values.offset * 4
                out.append(
                    (
                        FileValues(file, pos, len(values)),
                        np.array(chunk.offsets.to_numpy(zero_copy_only=True)),
                    )
                )
        for k, parts in small.items():
            parts.append(np.array(table.column(k).to_numpy()))
        if end_tokens is None:
            ends += table.column("end_tokens").to_pylist()
        del table
        mapped.close()
    cols = {k: np.concatenate(v) for k, v in small.items()}
    return from_chunks(
        ids_chunks,
        label_chunks,
        cols["state"],
        cols["n_labels"],
        cols["record"],
        cols["merged"],
        count_end_tokens(ends) if end_tokens is None else end_tokens,
        prompt_format,
        source,
        max_seq_length,
    )
