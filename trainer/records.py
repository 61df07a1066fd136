"""Records: read JSONL, parquet and saved Hugging Face dataset directories, one record at a time,
and validate each one (errors name the file and line).

A record is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``;
other keys (ids, task kinds) are kept as metadata. How a record becomes tokens is trainer.data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the file and line (or row)."""


class RecordError(DataError):
    """A DataError about record `index` of a batch (the caller names its file and line)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


ROLES = ("system", "user", "assistant")


class Records(list):
    """The validated records of one file (a plain list), and where each one came from."""

    def __init__(self, rows: list[dict[str, Any]], path: Path, lines: list[int] | None = None):
        super().__init__(rows)
        self.path, self._lines = Path(path), lines  # JSONL: the line of each record

    def where(self, i: int) -> str:
        """'FILE:line N' (JSONL, 1-based like an editor) or 'FILE:row N' (0-based like ds[i])."""
        if self._lines is not None:
            return f"{self.path}:line {self._lines[i]}"
        return f"{self.path}:row {i}"


def load_records(path: Path) -> Records:
    """Load and validate every record of a JSONL file, a parquet file or a saved HF dataset dir.

    In memory: for the data tools and small sets. The trainer streams (see iter_records).
    """
    rows, places = [], []
    for place, rec in iter_records(path):
        rows.append(rec)
        places.append(place)
    path = Path(path)
    return Records(rows, path, places if _kind(path) == "jsonl" else None)


def _kind(path: Path) -> str:
    return "dir" if path.is_dir() else "parquet" if path.suffix == ".parquet" else "jsonl"


def place_prefix(path: Path) -> str:
    """'FILE:line ' for JSONL (lines 1-based, as an editor), 'FILE:row ' otherwise (0-based)."""
    return f"{path}:{'line' if _kind(Path(path)) == 'jsonl' else 'row'} "


def where(path: Path, place: int) -> str:
    return place_prefix(path) + str(place)


def iter_records(path: Path, batch_rows: int = 4096) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row, record) for each validated record, streamed: memory does not grow with
    the file. Raises DataError naming the file and line (or row) of the first bad record."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    kind = _kind(path)
    rows = (
        _iter_jsonl(path)
        if kind == "jsonl"
        else _iter_parquet(path, batch_rows)
        if kind == "parquet"
        else _iter_dataset_dir(path, batch_rows)
    )
    prefix = place_prefix(path)  # once per file, not per record
    n = 0
    for place, rec in rows:
        validate_record(rec, prefix + str(place))
        n += 1
        yield place, rec
    if not n:
        raise DataError(f"{path}: no records")


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a JSONL file, not parsed yet."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:line {lineno}: invalid UTF-8") from None
            if line.strip():
                yield lineno, line


def parse_line(line: str, where: str) -> dict[str, Any]:
    """One JSONL line as a record (not validated yet); DataError naming `where`."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    return rec


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in jsonl_lines(path):
        yield lineno, parse_line(line, f"{path}:line {lineno}")


def read_parquet_table(path: Path) -> Any:
    """A pyarrow Table, or DataError (one line) for an unreadable file."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__})") from None


def _iter_parquet(path: Path, batch_rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    # A missing column is one message about the file, not one per row.
    if "messages" not in names and not {"prompt", "completion"} <= set(names):
        need = [c for c in ("prompt", "completion") if c not in names]
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, need))} (or "
            f"'messages'); has {', '.join(names) or 'none'}"
        )
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for rec in batch.to_pylist():
                yield row, rec
                row += 1
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged row group
        raise DataError(f"{path}:row {row}: not readable ({type(e).__name__})") from None


def _iter_dataset_dir(path: Path, batch_rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".jsonl", ".parquet"))
        if found:
            hint = (
                f"it holds {', '.join(found[:2])}{' ...' if len(found) > 2 else ''}: pass "
                f"the files themselves"
            )
        else:
            hint = "pass JSONL or parquet files, or `qsft-data convert` a problem tree first"
        raise DataError(
            f"{path}: no data files (not a saved Hugging Face dataset: no "
            f"dataset_info.json / state.json); {hint}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    row = 0
    for batch in ds.iter(batch_size=batch_rows):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            yield row, dict(zip(keys, values, strict=True))
            row += 1


def validate_record(rec: dict[str, Any], where: str) -> None:
    """Raise DataError unless rec is a usable prompt/completion or messages record."""
    if "messages" in rec and rec["messages"] is not None:
        _validate_messages(rec["messages"], where)
        return
    if "prompt" not in rec or "completion" not in rec:
        raise DataError(
            f"{where}: record needs 'prompt' and 'completion' or 'messages' (has {sorted(rec)})"
        )
    for key in ("prompt", "completion"):
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: '{key}' must be a string (got {type(rec[key]).__name__})")
    if not rec["completion"].strip():
        raise DataError(f"{where}: empty completion")


def _validate_messages(msgs: Any, where: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{j}] needs a string 'content'")
        if m.get("role") not in ROLES:
            raise DataError(
                f"{where}: messages[{j}].role must be one of {ROLES} (got {m.get('role')!r})"
            )
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles:
        raise DataError(f"{where}: no assistant message to train on")
    if "user" not in roles:
        raise DataError(
            f"{where}: no user message: an answer needs a question (chat templates "
            f"and the RL stage both start from a user turn)"
        )
    # The conversation a model is trained on must be one it can be asked: after the system
    # prompt(s), a user turn first; and an assistant turn last, or the tail trains nothing.
    first = next(j for j, r in enumerate(roles) if r != "system")
    if roles[first] != "user":
        raise DataError(
            f"{where}: messages[{first}] is an assistant turn before any user turn; "
            f"a conversation starts with the user (after an optional system prompt)"
        )
    if roles[-1] != "assistant":
        raise DataError(
            f"{where}: ends with a {roles[-1]} turn (messages[{len(roles) - 1}]); "
            f"the last turn must be the assistant's answer"
        )
    if any(not m["content"].strip() for m in msgs if m["role"] == "assistant"):
        raise DataError(f"{where}: empty assistant message")


def is_messages(rec: dict[str, Any]) -> bool:
    return rec.get("messages") is not None


def to_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    if is_messages(rec):
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    return [
        {"role": "user", "content": rec["prompt"]},
        {"role": "assistant", "content": rec["completion"]},
    ]
