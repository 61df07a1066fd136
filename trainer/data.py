"""Data: format records (raw or chat), tokenize, mask prompts (records are read by
trainer.records). Two prompt formats:

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

from dataclasses import dataclass
from typing import Any

from trainer.records import DataError, RecordError, is_messages, to_messages

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers) skip
PROMPT_FORMATS = ("raw", "chat")

# Used when a tokenizer has no chat template. Each turn is "### Role:\n<content>\n\n"; the
# assistant content is followed by the EOS token so the model learns where to stop.
FALLBACK_TURN = "### {role}:\n{content}"


# ---------------------------------------------------------------------------------------------
# Loading and validation


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
