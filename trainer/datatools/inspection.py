"""`qsft-data inspect`: what is in a set of SFT data files before a GPU hour is spent on them.

Per file: records per task kind, token lengths (as the trainer renders and tokenizes them),
how many exceed --max_seq_length, duplicates inside the file; across files: overlap, reported as
train/test leakage when one file name says train and the other test. With --histogram, draws
the length histogram.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data import encode, resolve_prompt_format
from trainer.datatools.near_dup import THRESHOLD, near_duplicate_pairs, normalise
from trainer.records import DataError, load_records, to_messages

TASK_KINDS = ("desc2q", "py2q", "q2py")
PERCENTILES = (50, 90, 95, 99)
_FENCE = re.compile(r"```\s*([A-Za-z0-9_+-]*)")


def task_kind(rec: dict[str, Any]) -> str:
    """desc2q, py2q, q2py or other: the record's `task` field, else read off its code fences."""
    if isinstance(rec.get("task"), str) and rec["task"]:
        return rec["task"]
    msgs = to_messages(rec)
    prompt = "\n".join(m["content"] for m in msgs if m["role"] != "assistant")
    answer = "\n".join(m["content"] for m in msgs if m["role"] == "assistant")
    asked = {f.lower() for f in _FENCE.findall(prompt)}
    given = {f.lower() for f in _FENCE.findall(answer)}
    if given & {"q", "k", "kdb"}:
        return "py2q" if asked & {"python", "py"} else "desc2q"
    if given & {"python", "py"} and asked & {"q", "k", "kdb"}:
        return "q2py"
    return "other"


def _prompt_text(rec: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in to_messages(rec) if m["role"] != "assistant")


def _record_key(rec: dict[str, Any]) -> str:
    return normalise(" ".join(m["role"] + " " + m["content"] for m in to_messages(rec)))


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (a value that occurs in the data)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


@dataclass
class FileStats:
    path: Path
    records: list[dict[str, Any]] = field(repr=False)
    kinds: Counter
    lengths: list[int]  # tokens per record, sorted
    exact_dups: int  # records identical (normalised) to an earlier one in the file
    near_dup_prompts: int  # records whose prompt nearly equals another problem's
    keys: list[str] = field(repr=False)  # normalised record text, for exact matches
    prompts: dict[int, str] = field(repr=False)  # record index -> prompt text

    def over(self, max_len: int) -> int:
        return sum(n > max_len for n in self.lengths)


def file_stats(path: Path, tokenizer: Any, prompt_format: str = "auto") -> FileStats:
    records = load_records(path)  # DataError (exit 2) on anything malformed
    fmt = resolve_prompt_format(prompt_format, records)  # as the trainer would for this file
    lengths = []
    for i, r in enumerate(records):
        try:
            lengths.append(len(encode(r, tokenizer, fmt).input_ids))
        except DataError as e:
            raise DataError(f"{records.where(i)}: {e}") from None
    lengths.sort()
    keys = [_record_key(r) for r in records]
    exact = len(keys) - len(set(keys))
    prompts = {i: _prompt_text(r) for i, r in enumerate(records)}
    pid = [r.get("problem_id") for r in records]
    # One problem's prompt with and without its tests is by design, not a duplicate.
    near = {
        a
        for a, b, _ in near_duplicate_pairs(prompts, prompts)
        if pid[a] is None or pid[a] != pid[b]
    }
    return FileStats(
        Path(path),
        records,
        Counter(task_kind(r) for r in records),
        lengths,
        exact,
        len(near),
        keys,
        prompts,
    )


def _role(path: Path) -> str | None:
    """train / test from the file name, else from the nearest directory that says."""
    for part in [path.name, *(p.name for p in Path(path).resolve().parents)]:
        words = set(re.split(r"[^a-z]+", part.lower()))
        if "train" in words:
            return "train"
        if words & {"test", "eval", "valid", "validation"}:
            return "test"
    return None


def overlap(a: FileStats, b: FileStats) -> dict[str, int]:
    """Records of b that also occur in a: exactly, as near-duplicate prompts, by problem id."""
    keys_a = set(a.keys)
    near_b = {j for _, j, _ in near_duplicate_pairs(a.prompts, b.prompts)}
    pids_a = {r.get("problem_id") for r in a.records} - {None}
    pids_b = {r.get("problem_id") for r in b.records} - {None}
    return {
        "exact": sum(k in keys_a for k in b.keys),
        "near_prompts": len(near_b),
        "problems": len(pids_a & pids_b),
    }


def inspect_files(
    paths: list[Path],
    tokenizer: Any,
    max_seq_length: int,
    histogram: Path | None,
    prompt_format: str = "auto",
) -> tuple[list[str], bool]:
    """The report's lines, and whether anything suspicious (duplicates, leakage) was found."""
    stats = [file_stats(p, tokenizer, prompt_format) for p in paths]
    kinds = [k for k in TASK_KINDS if any(s.kinds[k] for s in stats)]
    kinds += sorted({k for s in stats for k in s.kinds} - set(kinds))
    head = (
        ["file", "records"]
        + kinds
        + [f"p{q}" for q in PERCENTILES]
        + ["max", f">{max_seq_length}", "dups", "near"]
    )
    rows = [
        [s.path.name, str(len(s.records))]
        + [str(s.kinds[k]) for k in kinds]
        + [str(percentile(s.lengths, q)) for q in PERCENTILES]
        + [
            str(s.lengths[-1]),
            str(s.over(max_seq_length)),
            str(s.exact_dups),
            str(s.near_dup_prompts),
        ]
        for s in stats
    ]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=False))
        )
        for r in [head] + rows
    ]
    how = {
        "auto": "--prompt_format auto per file: raw for prompt/completion records, chat for "
        "messages",
        "raw": "raw: prompt + completion + EOS",
        "chat": "chat template applied",
    }[prompt_format]
    lines.append(
        f"(lengths in tokens as trained, {how}; p50..max over records; "
        f"dups = exact duplicate records, near = prompts with a near duplicate in the "
        f"same file (another problem's, where records name theirs), Jaccard >= "
        f"{THRESHOLD} on character 5-grams)"
    )
    suspicious = any(s.exact_dups for s in stats)
    for i, a in enumerate(stats):
        for b in stats[i + 1 :]:
            roles = {_role(a.path), _role(b.path)}
            o = overlap(a, b)
            leak = roles == {"train", "test"}
            label = "train/test overlap" if leak else "overlap"
            lines.append(
                f"{label} {a.path.name} x {b.path.name}: {o['exact']} identical "
                f"records, {o['near_prompts']} near-duplicate prompts, "
                f"{o['problems']} shared problem ids"
            )
            suspicious |= leak and any(o.values())
    if histogram is not None:
        _write_histogram(histogram, [n for s in stats for n in s.lengths], max_seq_length)
        lines.append(f"length histogram: {histogram}")
    return lines, suspicious


def check_histogram_path(path: Path) -> None:
    """Fail before any work (one line, exit 2) when the PNG could not be written."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory (--histogram wants a .png file path)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise DataError(
            f"{path}: cannot write the histogram there ({parent} is not a writable directory)"
        )


def _write_histogram(path: Path, lengths: list[int], max_seq_length: int) -> None:
    from trainer.plots import draw_histogram

    try:
        draw_histogram(path, lengths, max_seq_length)
    except OSError as e:
        raise DataError(f"{path}: cannot write the histogram ({e.strerror or e})") from None
    except ImportError as e:
        raise DataError(f"{path}: cannot draw the histogram without matplotlib ({e})") from None
