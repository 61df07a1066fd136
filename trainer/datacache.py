"""Tokenize once: an on-disk Arrow cache of each data file, built by one rank, mapped by all.

Each file is tokenized into its own cache entry, `<cache dir>/<key>/`, whose key hashes
everything the tokens depend on: the file's bytes, the tokenizer (its files and chat template),
the prompt format (for `auto`: the training files too, which decide it), --max_seq_length,
--overlong and CACHE_VERSION. An entry is built with `datasets` (records streamed into an
Arrow file, then `Dataset.map(batched=True, num_proc=N)`) in a temporary directory renamed into
place when complete; its manifest lists every file with its size and sha256, and an entry whose
files do not match is removed and rebuilt, never read. Later launches on the same inputs only
check and memory-map it (trainer.tokenized).

Who builds, and how the others wait for it, is trainer.rundata.prepare: one rank per node, or
global rank 0 alone when the cache directory is shared by every node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import faults
from trainer.records import (
    DataError,
    RecordError,
    is_messages,
    iter_records,
    jsonl_lines,
    parse_line,
    place_prefix,
    validate_record,
)
from trainer.tokenized import (
    TokenizedSet,
    from_arrow_files,
    tokenize_columns,
)

CACHE_VERSION = 1  # bump when tokenize_columns' output for the same inputs changes
MANIFEST = "manifest.json"
BATCH = 1000  # records per map batch and per Arrow record batch
MIN_RECORDS_PER_PROC = 2000  # fewer per process, and starting processes costs more than it saves


@dataclass
class Entry:
    """One cached file: where its entry is and whether this launch built it."""

    path: str  # the data file
    dir: str  # its cache entry
    built: bool
    seconds: float
    prompt_format: str


def default_num_proc() -> int:
    """The cores this process may use: while the builder tokenizes, the node's other ranks
    wait, so the whole node is its own."""
    return max(1, len(os.sched_getaffinity(0)))


def tokenizer_hash(tokenizer: Any, model_dir: Path) -> str:
    h = hashlib.sha256(
        faults.content_hash([Path(model_dir) / f for f in faults.TOKENIZER_FILES]).encode()
    )
    for part in (
        type(tokenizer).__name__,
        tokenizer.eos_token,
        getattr(tokenizer, "chat_template", None),
    ):
        h.update(b"\0" + str(part).encode())
    return h.hexdigest()[:16]


def entry_key(
    file_hash: str, tok_hash: str, fmt_key: str, max_seq_length: int, overlong: str
) -> str:
    text = json.dumps([CACHE_VERSION, file_hash, tok_hash, fmt_key, max_seq_length, overlong])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# Building one entry


def _records_arrow(path: Path, dest: Path) -> int:
    """Stream the records of `path` into an Arrow file of JSON texts and their lines (rows),
    for the map's workers to parse, validate and tokenize in parallel: this sequential pass
    only reads. Returns the number of records."""
    import pyarrow as pa

    schema = pa.schema([("json", pa.large_string()), ("place", pa.int64()), ("record", pa.int64())])
    n, rows = 0, []
    jsonl = path.is_file() and path.suffix != ".parquet"
    # JSONL lines as they are; parquet rows and saved datasets validated, as JSON of the
    # fields that are trained on (other columns may hold what JSON cannot, e.g. timestamps).
    fields = ("prompt", "completion", "messages")
    items = (
        jsonl_lines(path)
        if jsonl
        else (
            (place, json.dumps({k: rec[k] for k in fields if k in rec}))
            for place, rec in iter_records(path)
        )
    )
    with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for place, text in items:
            rows.append((text, place, n))
            n += 1
            if len(rows) == BATCH:
                writer.write_batch(_batch(rows, schema))
        if rows:
            writer.write_batch(_batch(rows, schema))
    if not n:
        raise DataError(f"{path}: no records")
    return n


def _batch(rows: list[tuple[str, int, int]], schema: Any) -> Any:
    import pyarrow as pa

    cols = list(zip(*rows, strict=True))
    rows.clear()
    return pa.RecordBatch.from_arrays(
        [pa.array(c, type=t.type) for c, t in zip(cols, schema, strict=True)], schema=schema
    )


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: Any,
    prompt_format: str,
    max_seq_length: int,
    overlong: str,
    prefix: str,
) -> dict[str, list]:
    """The map function: parse, validate and tokenize a batch (prefix: "FILE:line " or
    "FILE:row ", for messages)."""
    recs = []
    for text, place in zip(batch["json"], batch["place"], strict=True):
        rec = parse_line(text, prefix + str(place))
        validate_record(rec, prefix + str(place))
        recs.append(rec)
    try:
        return tokenize_columns(
            recs, batch["record"], tokenizer, prompt_format, max_seq_length, overlong
        )
    except RecordError as e:
        raise DataError(f"{prefix}{batch['place'][e.index]}: {e}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()  # not hashlib.file_digest: Python 3.11+, and we support 3.10
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def build_entry(
    path: Path,
    entry: Path,
    tokenizer: Any,
    prompt_format: str,
    max_seq_length: int,
    overlong: str,
    num_proc: int,
    inputs: dict[str, Any],
    say: Any = print,
) -> None:
    """Tokenize `path` into the cache entry `entry` (absent before, complete after)."""
    import datasets

    tmp = entry.parent / f".tmp-{entry.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n = _records_arrow(path, tmp / "records.arrow")
        procs = max(1, min(num_proc, n // MIN_RECORDS_PER_PROC))
        say(
            f"tokenizing {path} ({n} records, {procs} process{'es' if procs > 1 else ''}) "
            f"into {entry}"
        )
        features = datasets.Features(
            input_ids=datasets.Sequence(datasets.Value("int32")),
            labels=datasets.Sequence(datasets.Value("int32")),
            state=datasets.Value("int8"),
            n_labels=datasets.Value("int32"),
            merged=datasets.Value("int8"),
            end_tokens=datasets.Sequence(datasets.Value("int32")),
            record=datasets.Value("int64"),
        )
        records = datasets.Dataset.from_file(str(tmp / "records.arrow"))
        # Forked workers with the Rust tokenizer's own thread pool would deadlock-guard and warn;
        # with several processes the parallelism is theirs.
        env = os.environ.get("TOKENIZERS_PARALLELISM")
        if procs > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            with _quiet_datasets():
                out = records.map(
                    _tokenize_batch,
                    batched=True,
                    batch_size=BATCH,
                    num_proc=procs if procs > 1 else None,
                    remove_columns=records.column_names,
                    features=features,
                    fn_kwargs=dict(
                        tokenizer=tokenizer,
                        prompt_format=prompt_format,
                        max_seq_length=max_seq_length,
                        overlong=overlong,
                        prefix=place_prefix(path),
                    ),
                    cache_file_name=str(tmp / "tokens.arrow"),
                    load_from_cache_file=False,
                    new_fingerprint=entry.name,
                    writer_batch_size=BATCH,
                )
        finally:
            if procs > 1:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
                if env is not None:
                    os.environ["TOKENIZERS_PARALLELISM"] = env
        files = [Path(f["filename"]).name for f in out.cache_files]
        del out, records
        (tmp / "records.arrow").unlink()
        data = from_arrow_files([tmp / f for f in files], prompt_format, str(path), max_seq_length)
        manifest = dict(
            version=CACHE_VERSION,
            key=entry.name,
            inputs=inputs,
            prompt_format=prompt_format,
            processes=procs,
            files={f: dict(bytes=(tmp / f).stat().st_size, sha256=_sha256(tmp / f)) for f in files},
            end_tokens={str(k): v for k, v in data.end_tokens.items()},
            stats=data.stats,
            built=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        del data
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        try:
            tmp.rename(entry)  # atomic: an entry is complete or absent
        except OSError:  # another builder (another job, a node on the same share) was first
            if not entry.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _quiet_datasets():
    """No per-file progress bars from `datasets` (the trainer prints one line per file)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# Reading and checking an entry


def check_entry(entry: Path, key: str) -> str | None:
    """None when the entry is complete and intact, else why not (it is then rebuilt)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (an interrupted build)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    if manifest.get("version") != CACHE_VERSION or manifest.get("key") != key:
        return "written by another version"
    for name, meta in manifest.get("files", {}).items():
        f = entry / name
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            return f"{name} is missing or has the wrong size"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def load_entry(entry: Path, source: str, max_seq_length: int) -> TokenizedSet:
    manifest = json.loads((Path(entry) / MANIFEST).read_text())
    return from_arrow_files(
        [Path(entry) / f for f in manifest["files"]],
        manifest["prompt_format"],
        source,
        max_seq_length,
        {int(k): v for k, v in manifest["end_tokens"].items()},
    )


# ---------------------------------------------------------------------------------------------
# Every file of the run, built where needed (trainer.rundata.prepare picks the rank)


def ensure_entries(
    train: list[Path],
    evals: list[Path],
    tokenizer: Any,
    model_dir: Path,
    requested_format: str,
    max_seq_length: int,
    overlong: str,
    cache_dir: Path,
    num_proc: int,
    say: Any = print,
) -> dict[str, Any]:
    """Check or build the entries of every file (the builder rank). Raises DataError."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_hash(tokenizer, model_dir)
    hashes = {str(p): faults.content_hash([p]) for p in [*train, *evals] if Path(p).exists()}
    for p in [*train, *evals]:
        if str(p) not in hashes:
            raise DataError(f"{p}: file not found")
    fmt_key = requested_format
    if requested_format == "auto":  # decided by the training files: part of every key
        fmt_key = "auto:" + ",".join(hashes[str(p)] for p in train)
    entries: dict[str, Entry] = {}
    fmt = None if requested_format == "auto" else requested_format
    for p in [*train, *evals]:
        key = entry_key(hashes[str(p)], tok, fmt_key, max_seq_length, overlong)
        entry = cache_dir / key
        why = check_entry(entry, key) if entry.exists() else "absent"
        if why is None:
            got = json.loads((entry / MANIFEST).read_text())["prompt_format"]
            fmt = fmt or got
            entries[str(p)] = Entry(str(p), str(entry), False, 0.0, got)
            continue
        if why != "absent":
            say(f"data cache {entry}: {why}; rebuilding it")
            shutil.rmtree(entry, ignore_errors=True)
        if fmt is None:  # auto, and nothing cached yet: any messages record in training data
            fmt = "chat" if any(_has_messages(t) for t in train) else "raw"
        t0 = time.perf_counter()
        inputs = dict(
            file=str(p),
            file_sha256=hashes[str(p)],
            tokenizer=tok,
            prompt_format=fmt_key,
            max_seq_length=max_seq_length,
            overlong=overlong,
        )
        build_entry(Path(p), entry, tokenizer, fmt, max_seq_length, overlong, num_proc, inputs, say)
        entries[str(p)] = Entry(str(p), str(entry), True, time.perf_counter() - t0, fmt)
    return dict(
        entries={k: vars(v) for k, v in entries.items()},
        prompt_format=fmt,
        # One file: its hash above (the same as content_hash([file]), so the
        # checkpoint fingerprints of earlier versions still match); several: all in one.
        train_hash=hashes[str(train[0])] if len(train) == 1 else faults.content_hash(train),
    )


def _has_messages(path: Path) -> bool:
    """Whether any record is a messages record (decides --prompt_format auto). A JSONL line
    is parsed only when it mentions "messages"; the first one found ends the scan."""
    if not (path.is_file() and path.suffix != ".parquet"):
        return any(is_messages(rec) for _, rec in iter_records(path))
    for lineno, line in jsonl_lines(path):
        if '"messages"' in line and is_messages(parse_line(line, f"{path}:line {lineno}")):
            return True
    return False
