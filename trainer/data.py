"""Data: load records, format them (raw or chat), tokenize, mask prompts.

A record is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``;
other keys (ids, task kinds) are kept as metadata and ignored here. Two prompt formats:

- ``raw``: the prompt text, the completion text, then the tokenizer's EOS; no template. What the
  original pipeline trained (TRL's SFTTrainer on prompt/completion strings), and the default for
  prompt/completion records.
- ``chat``: the tokenizer's chat template; required for ``messages`` records.

Loss is on the answer only: the completion and its EOS (raw), every assistant turn and its
end-of-turn token (chat). The token that ends each answer is recorded, because generation must
stop on it downstream. Every problem is reported as :class:`DataError` (one line naming file and
line) before the model loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers) skip
ROLES = ("system", "user", "assistant")
PROMPT_FORMATS = ("raw", "chat")

# Used when a tokenizer has no chat template. Each turn is "### Role:\n<content>\n\n"; the
# assistant content is followed by the EOS token so the model learns where to stop.
FALLBACK_TURN = "### {role}:\n{content}"


class DataError(ValueError):
    """Bad input data; the message names the file and line (or row)."""


# ---------------------------------------------------------------------------------------------
# Loading and validation


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


def resolve_prompt_format(requested: str, records: list[dict[str, Any]]) -> str:
    """--prompt_format auto -> raw when every (training) record is prompt/completion, else chat."""
    if requested != "auto":
        return requested
    return "chat" if any(is_messages(r) for r in records) else "raw"


# ---------------------------------------------------------------------------------------------
# Formatting and masking


@dataclass
class Encoded:
    """One tokenized example: ids, labels (IGNORE_INDEX outside the answer), and what ends it."""

    input_ids: list[int]
    labels: list[int]
    end_tokens: list[int]  # the token that closes each trained answer (EOS / end of turn)
    boundary_merged: bool = False  # raw: prompt and completion share a token (see encode_raw)


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: EOS, pad, and added control tokens (<|im_end|>)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    return ids


def encode(rec: dict[str, Any], tokenizer: Any, prompt_format: str) -> Encoded:
    """Tokenize one validated record in the given prompt format."""
    if prompt_format == "raw":
        if is_messages(rec):
            raise DataError(
                "a 'messages' record needs --prompt_format chat (raw format is "
                "for prompt/completion records)"
            )
        return encode_raw(rec["prompt"], rec["completion"], tokenizer)
    return encode_chat(to_messages(rec), tokenizer)


def encode_raw(prompt: str, completion: str, tokenizer: Any) -> Encoded:
    """prompt + completion + EOS as plain text; loss on the completion and the EOS.

    Exactly TRL's SFTTrainer for non-conversational prompt/completion data (checked against TRL
    1.16.0, sft_trainer.py `add_eos` / `tokenize_fn` and data_utils.common_prefix_length): EOS is
    appended unless the completion already ends with it; the prompt and prompt+completion are
    tokenized separately, with the tokenizer's own special tokens (`tokenizer(text)`); the
    completion starts where the two token sequences diverge. When prompt and completion merge
    into one token at the boundary (a prompt ending mid-word or in punctuation followed by a
    completion starting with punctuation), that token is trained as completion and the model
    sees, in training, a prompt ending that inference never produces; we count those records
    (`boundary_merged`) and say so at start, where TRL warns once.
    """
    text = raw_text(prompt, completion, tokenizer)
    return raw_encoded(
        list(tokenizer(prompt)["input_ids"]),
        list(tokenizer(text)["input_ids"]),
        tokenizer.eos_token_id,
    )


def raw_text(prompt: str, completion: str, tokenizer: Any) -> str:
    eos = tokenizer.eos_token
    if not eos:
        raise DataError(
            "the tokenizer has no EOS token, which --prompt_format raw appends to "
            "every completion; use --prompt_format chat or set eos_token"
        )
    return prompt + (completion if completion.endswith(eos) else completion + eos)


def raw_encoded(prompt_ids: list[int], ids: list[int], eos_id: int | None) -> Encoded:
    """Labels from the token ids of the prompt alone and of the whole text (see encode_raw)."""
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:  # the usual case is one C-level comparison; else find where
        n = 0
        for a, b in zip(prompt_ids, ids, strict=False):
            if a != b:
                break
            n += 1
    labels = [IGNORE_INDEX] * n + ids[n:]
    ends = [ids[-1]] if ids and ids[-1] == eos_id else []
    return Encoded(ids, labels, ends, boundary_merged=n < len(prompt_ids))


def render(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans of assistant turns.

    With a chat template, the span of assistant turn i runs from the end of the rendering of
    messages[:i] with the generation prompt to the end of the rendering of messages[:i+1], so it
    covers the content and the template's end-of-turn token (the model must learn to stop).
    """
    if getattr(tokenizer, "chat_template", None):

        def apply(msgs: list[dict[str, str]], gen: bool) -> str:
            try:
                return tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=gen
                )
            except Exception as e:  # noqa: BLE001 - jinja's TemplateError, or raise_exception()
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise DataError(f"the chat template failed: {first}") from None

        text = apply(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, upto = apply(messages[:i], True), apply(messages[: i + 1], False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise DataError(
                    "chat template is not prefix-stable; cannot locate the "
                    "assistant tokens to train on"
                )
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


def encode_chat(messages: list[dict[str, str]], tokenizer: Any) -> Encoded:
    """The chat rendering; loss on every assistant turn and its end-of-turn token.

    For a single-turn record this trains exactly what TRL 1.16 trains for conversational
    prompt/completion data (everything after the prompt rendered with the generation prompt:
    the answer, <|im_end|> and the template's newline); for several turns every assistant turn
    is trained, which TRL does only with templates carrying {% generation %} markers. The end
    of an answer is the last special token of its span (<|im_end|> for ChatML, EOS for the
    fallback template); a template that ends turns with plain text is refused, since
    generation could not stop on it.
    """
    text, spans = render(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return chat_encoded(
        text, spans, list(enc["input_ids"]), enc["offset_mapping"], special_token_ids(tokenizer)
    )


def chat_encoded(
    text: str,
    spans: list[tuple[int, int]],
    ids: list[int],
    offsets: list[tuple[int, int]],
    special: set[int],
) -> Encoded:
    """Labels of a rendered conversation from its tokens' character offsets (see encode_chat)."""
    labels = [IGNORE_INDEX] * len(ids)
    ends = []
    for a, b in spans:
        last_special = None
        for k, (s, e) in enumerate(offsets):
            # A token belongs to the answer when it overlaps an assistant span; the overlap test
            # (not "starts inside") keeps a merged boundary token such as "\n```" in the loss.
            if e > a and s < b:
                labels[k] = ids[k]
                if ids[k] in special:
                    last_special = ids[k]
        if last_special is None:
            raise DataError(
                f"the chat template ends an assistant turn with {text[a:b][-12:]!r}, "
                f"not a special token: generation could not stop there; use "
                f"--prompt_format raw or a template with an end-of-turn token"
            )
        ends.append(last_special)
    return Encoded(ids, labels, ends)


class RecordError(DataError):
    """A DataError about record `index` of a batch (the caller names its file and line)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """tokenizer(texts)["input_ids"], straight from the Rust tokenizer when there is one:
    transformers' per-encoding conversion costs as much as a third of the tokenizing
    (transformers 5.x); the ids are the same (the tests compare with encode())."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [list(x) for x in tokenizer(texts)["input_ids"]]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]


def encode_batch(recs: list[dict[str, Any]], tokenizer: Any, prompt_format: str) -> list[Encoded]:
    """encode() of each record, with one batched tokenizer call per kind of text (the fast
    tokenizers run a batch in Rust, without a Python round trip per text). Same results as
    encode() record by record; raises RecordError naming the record that failed."""
    if prompt_format == "raw":
        for i, rec in enumerate(recs):
            if is_messages(rec):
                raise RecordError(
                    i,
                    "a 'messages' record needs --prompt_format chat (raw "
                    "format is for prompt/completion records)",
                )
        texts = [raw_text(r["prompt"], r["completion"], tokenizer) for r in recs]
        prompts = _token_ids(tokenizer, [r["prompt"] for r in recs])
        full = _token_ids(tokenizer, texts)
        return [
            raw_encoded(a, b, tokenizer.eos_token_id) for a, b in zip(prompts, full, strict=True)
        ]
    rendered = []
    for i, rec in enumerate(recs):
        try:
            rendered.append(render(to_messages(rec), tokenizer))
        except DataError as e:
            raise RecordError(i, str(e)) from None
    texts = [t for t, _ in rendered]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # see _token_ids
        encs = backend.encode_batch(texts, add_special_tokens=False)
        pairs = [(e.ids, e.offsets) for e in encs]
    else:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        pairs = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
    special, out = special_token_ids(tokenizer), []
    for i, ((text, spans), (ids, offsets)) in enumerate(zip(rendered, pairs, strict=True)):
        try:
            out.append(chat_encoded(text, spans, list(ids), offsets, special))
        except DataError as e:
            raise RecordError(i, str(e)) from None
    return out
