"""Data: load records, render them as chat text, tokenize, mask prompts, batch per rank.

A record is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``;
other keys (ids, task kinds) are kept as metadata and ignored here. Loss is on assistant tokens
only. Every problem is reported as :class:`DataError` (one line naming file and line) before the
model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers) skip
ROLES = ("system", "user", "assistant")

# Used when a tokenizer has no chat template. Each turn is "### Role:\n<content>\n\n"; the
# assistant content is followed by the EOS token so the model learns where to stop.
FALLBACK_TURN = "### {role}:\n{content}"


class DataError(ValueError):
    """Bad input data; the message names the file and line (or row)."""


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_records(path: Path) -> list[dict[str, Any]]:
    """Load and validate records from a JSONL file, a parquet file or a saved HF dataset dir."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        rows, where = _load_dataset_dir(path), "row"
    elif path.suffix == ".parquet":
        rows, where = _load_parquet(path), "row"
    else:
        rows, where = _load_jsonl(path), "line"
    if not rows:
        raise DataError(f"{path}: no records")
    for i, rec in enumerate(rows):
        # JSONL lines are 1-based like an editor's; dataset rows are 0-based like `ds[i]`.
        validate_record(rec, f"{path}:{where} {i + 1 if where == 'line' else i}")
    return rows


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:line {lineno}: invalid UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:line {lineno}: expected a JSON object")
            rows.append(rec)
    return rows


def read_parquet_table(path: Path) -> Any:
    """A pyarrow Table, or DataError (one line) for an unreadable file."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__})") from None


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    table = read_parquet_table(path)
    names = table.schema.names
    # A missing column is one message about the file, not one per row.
    if "messages" not in names and not {"prompt", "completion"} <= set(names):
        need = [c for c in ("prompt", "completion") if c not in names]
        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, need))} (or "
                        f"'messages'); has {', '.join(names) or 'none'}")
    return table.to_pylist()


def _load_dataset_dir(path: Path) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".jsonl", ".parquet"))
        if found:
            hint = f"it holds {', '.join(found[:2])}{' ...' if len(found) > 2 else ''}: pass " \
                   f"the files themselves"
        else:
            hint = "pass JSONL or parquet files, or `qsft-data convert` a problem tree first"
        raise DataError(f"{path}: no data files (not a saved Hugging Face dataset: no "
                        f"dataset_info.json / state.json); {hint}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    return ds.to_list()


def validate_record(rec: dict[str, Any], where: str) -> None:
    """Raise DataError unless rec is a usable prompt/completion or messages record."""
    if "messages" in rec and rec["messages"] is not None:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] needs a string 'content'")
            if m.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{j}].role must be one of {ROLES} "
                                f"(got {m.get('role')!r})")
        assistant = [m for m in msgs if m["role"] == "assistant"]
        if not assistant:
            raise DataError(f"{where}: no assistant message to train on")
        if any(not m["content"].strip() for m in assistant):
            raise DataError(f"{where}: empty assistant message")
        return
    if "prompt" not in rec or "completion" not in rec:
        raise DataError(f"{where}: record needs 'prompt' and 'completion' or 'messages' "
                        f"(has {sorted(rec)})")
    for key in ("prompt", "completion"):
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: '{key}' must be a string (got {type(rec[key]).__name__})")
    if not rec["completion"].strip():
        raise DataError(f"{where}: empty completion")


def to_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    if rec.get("messages") is not None:
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    return [{"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["completion"]}]


# ---------------------------------------------------------------------------------------------
# Formatting and masking


def render(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans of assistant turns.

    With a chat template, the span of assistant turn i runs from the end of the rendering of
    messages[:i] with the generation prompt to the end of the rendering of messages[:i+1], so it
    covers the content and the template's end-of-turn token (the model must learn to stop).
    """
    if getattr(tokenizer, "chat_template", None):
        def apply(msgs: list[dict[str, str]], gen: bool) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        text = apply(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, upto = apply(messages[:i], True), apply(messages[: i + 1], False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise DataError("chat template is not prefix-stable; cannot locate the "
                                "assistant tokens to train on")
            spans.append((len(prefix), len(upto)))
        return text, spans
    eos = tokenizer.eos_token or ""
    text, spans = "", []
    for m in messages:
        head = FALLBACK_TURN.format(role=m["role"].capitalize(), content="")
        if m["role"] == "assistant":
            text += head
            spans.append((len(text), len(text) + len(m["content"]) + len(eos)))
            text += m["content"] + eos + "\n\n"
        else:
            text += head + m["content"] + "\n\n"
    return text, spans


def tokenize_example(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are IGNORE_INDEX outside assistant spans."""
    text, spans = render(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        # A token belongs to the answer when it overlaps an assistant span; the overlap test
        # (not "starts inside") keeps a merged boundary token such as "\n```" in the loss.
        inside = any(e > a and s < b for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return list(enc["input_ids"]), labels


@dataclass
class TokenizedSet:
    """Tokenized examples plus what was dropped or cut to fit max_seq_length."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    ids: list[int]  # index of each kept example in the source file
    dropped: int = 0
    truncated: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def label_tokens(self, i: int) -> int:
        # The first position is never a target: the model shifts labels left by one.
        return sum(1 for x in self.labels[i][1:] if x != IGNORE_INDEX)


def tokenize_records(records: list[dict[str, Any]], tokenizer: Any, max_seq_length: int,
                     overlong: str = "drop", source: str = "data") -> TokenizedSet:
    """Tokenize and mask every record; drop or truncate those over max_seq_length."""
    out = TokenizedSet([], [], [])
    for i, rec in enumerate(records):
        try:
            ids, labels = tokenize_example(to_messages(rec), tokenizer)
        except DataError as e:
            raise DataError(f"{source}: record {i}: {e}") from None
        if len(ids) > max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            if overlong == "drop" or all(x == IGNORE_INDEX for x in labels[1:]):
                out.dropped += 1
                continue
            out.truncated += 1
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.ids.append(i)
    if not out.input_ids:
        raise DataError(f"{source}: every example is longer than --max_seq_length "
                        f"{max_seq_length}; raise it or use --overlong truncate")
    out.stats = dict(examples=len(out), dropped=out.dropped, truncated=out.truncated,
                     tokens=sum(map(len, out.input_ids)),
                     label_tokens=sum(out.label_tokens(i) for i in range(len(out))))
    return out
