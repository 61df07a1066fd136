"""Data loading, validation, chat formatting, prompt masking and deterministic sharding."""

from __future__ import annotations

import copy
import json

import pytest

from tests.conftest import qwen_layout_model
from trainer.batching import Sampler, collate, eval_batches
from trainer.config import ASSETS_DIR
from trainer.data import IGNORE_INDEX, encode, render, resolve_prompt_format
from trainer.model import load_tokenizer
from trainer.records import DataError, load_records, to_messages
from trainer.tokenized import tokenize_records


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSETS_DIR / "tiny_model")


def _jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = {"prompt": "Sum a list.", "completion": "solve:{sum x}"}


def _broken_files(tmp_path):
    """(path, expected message fragment) for each kind of bad input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = {}
    cases["missing file"] = (tmp_path / "nope.jsonl", "nope.jsonl: file not found")
    cases["malformed json"] = (
        _jsonl(tmp_path / "a.jsonl", [GOOD, '{"prompt": "x",']),
        "a.jsonl:line 2: invalid JSON",
    )
    cases["missing keys"] = (
        _jsonl(tmp_path / "b.jsonl", [GOOD, GOOD, {"question": "x"}]),
        "b.jsonl:line 3: record needs 'prompt' and 'completion'",
    )
    cases["empty completion"] = (
        _jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "  \n"}]),
        "c.jsonl:line 1: empty completion",
    )
    cases["wrong type"] = (
        _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": 3}]),
        "d.jsonl:line 1: 'completion' must be a string",
    )
    bad_utf8 = tmp_path / "e.jsonl"
    bad_utf8.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    cases["invalid utf-8"] = (bad_utf8, "e.jsonl:line 2: invalid UTF-8")
    cases["not an object"] = (
        _jsonl(tmp_path / "f.jsonl", ["[1, 2]"]),
        "f.jsonl:line 1: expected a JSON object",
    )
    cases["empty file"] = (_jsonl(tmp_path / "g.jsonl", []), "g.jsonl: no records")
    cases["no assistant turn"] = (
        _jsonl(tmp_path / "h.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]),
        "h.jsonl:line 1: no assistant message",
    )
    user, bot = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    system = {"role": "system", "content": "s"}
    cases["assistant first"] = (
        _jsonl(tmp_path / "m1.jsonl", [GOOD, {"messages": [system, bot, user, bot]}]),
        "m1.jsonl:line 2: messages[1] is an assistant turn before any user turn",
    )
    cases["no user turn"] = (
        _jsonl(tmp_path / "m2.jsonl", [{"messages": [system, bot]}]),
        "m2.jsonl:line 1: no user message",
    )
    cases["ends with user"] = (
        _jsonl(tmp_path / "m3.jsonl", [{"messages": [user, bot, user]}]),
        "m3.jsonl:line 1: ends with a user turn (messages[2])",
    )
    cases["bad role"] = (
        _jsonl(tmp_path / "i.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}]),
        "i.jsonl:line 1: messages[0].role",
    )
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["x", "y"]}), tmp_path / "j.parquet")
    cases["parquet missing column"] = (
        tmp_path / "j.parquet",
        "j.parquet: missing column(s) 'completion'",
    )
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1, 2]}), tmp_path / "l.parquet")
    cases["parquet wrong type"] = (
        tmp_path / "l.parquet",
        "l.parquet:row 0: 'completion' must be a string",
    )
    (tmp_path / "k.parquet").write_bytes(b"PAR1 not really")
    cases["corrupt parquet"] = (tmp_path / "k.parquet", "k.parquet: not a readable parquet")
    (tmp_path / "emptydir").mkdir()
    cases["dir without dataset"] = (tmp_path / "emptydir", "emptydir: no data files")
    return cases


CASE_NAMES = [
    "missing file",
    "malformed json",
    "missing keys",
    "empty completion",
    "wrong type",
    "invalid utf-8",
    "not an object",
    "empty file",
    "no assistant turn",
    "assistant first",
    "no user turn",
    "ends with user",
    "bad role",
    "parquet missing column",
    "parquet wrong type",
    "corrupt parquet",
    "dir without dataset",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_data_rejected_with_file_and_line(name, tmp_path):
    path, expected = _broken_files(tmp_path)[name]
    with pytest.raises(DataError) as e:
        load_records(path)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_loads_jsonl_parquet_and_dataset_dir(tmp_path):
    import datasets

    recs = [
        GOOD,
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    assert load_records(_jsonl(tmp_path / "x.jsonl", recs)) == recs
    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(tmp_path / "x.parquet"))
    assert load_records(tmp_path / "x.parquet") == [GOOD, GOOD]
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds") == [GOOD]


# Every format and masking test runs against both tokenizers: the demo's (EOS = <|im_end|>,
# the chat template's end of turn) and one with a Qwen2.5 base release's layout (EOS and pad
# <|endoftext|>, distinct from <|im_end|>; Qwen2.5's template with its default system prompt).
QWEN_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n"
)


@pytest.fixture(scope="module", params=["demo", "qwen25"])
def fmt_tok(request, tmp_path_factory):
    if request.param == "demo":
        return load_tokenizer(ASSETS_DIR / "tiny_model")
    return load_tokenizer(qwen_layout_model(tmp_path_factory.mktemp("qwen25")))


def _trained(tok, enc) -> str:
    return tok.decode(
        [t for t, y in zip(enc.input_ids, enc.labels, strict=True) if y != IGNORE_INDEX]
    )


def test_qwen_layout_fixture_is_what_it_claims(tmp_path):
    tok = load_tokenizer(qwen_layout_model(tmp_path / "m"))
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(tmp_path / "m").eos_token_id == tok.eos_token_id


def test_raw_format_is_prompt_completion_eos(fmt_tok):
    tok = fmt_tok
    rec = {"prompt": "Add one to x.\n", "completion": "```q\n{x+1}\n```"}
    enc = encode(rec, tok, "raw")
    assert tok.decode(enc.input_ids) == rec["prompt"] + rec["completion"] + tok.eos_token
    assert _trained(tok, enc) == rec["completion"] + tok.eos_token  # answer and EOS only
    # TRL 1.16's rule: the prompt tokenized alone is masked, everything after it trained.
    prompt_ids = tok(rec["prompt"])["input_ids"]
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + enc.input_ids[len(prompt_ids) :]
    assert enc.end_tokens == [tok.eos_token_id] and not enc.boundary_merged
    # A completion that already ends with EOS does not get a second one (TRL's add_eos).
    again = encode({**rec, "completion": rec["completion"] + tok.eos_token}, tok, "raw")
    assert again.input_ids == enc.input_ids


def test_raw_boundary_merge_is_detected_and_trained_as_completion(fmt_tok):
    tok = fmt_tok
    rec = {"prompt": "Translate:\n```python\nx+1\n```", "completion": "```q\n{x+1}\n```"}
    enc = encode(rec, tok, "raw")
    prompt_ids = tok(rec["prompt"])["input_ids"]
    # "``````" tokenizes across the boundary: the prompt's last token is not in the sequence.
    assert enc.boundary_merged and enc.input_ids[: len(prompt_ids)] != prompt_ids
    n = next(i for i, (a, b) in enumerate(zip(prompt_ids, enc.input_ids, strict=False)) if a != b)
    assert enc.labels[:n] == [IGNORE_INDEX] * n and enc.labels[n:] == enc.input_ids[n:]
    assert not encode({**rec, "prompt": rec["prompt"] + "\n"}, tok, "raw").boundary_merged
    counted = tokenize_records(
        [rec, {**rec, "prompt": rec["prompt"] + "\n"}], tok, 512, prompt_format="raw"
    )
    assert counted.stats["boundary_merged"] == 1


def test_chat_format_masks_prompt_and_ends_on_end_of_turn(fmt_tok):
    tok = fmt_tok
    enc = encode({"prompt": "Add one.", "completion": "1+x"}, tok, "chat")
    system = "" if tok.eos_token == "<|im_end|>" else QWEN_SYSTEM  # Qwen2.5 inserts its default
    assert tok.decode(enc.input_ids) == (
        f"{system}<|im_start|>user\nAdd one.<|im_end|>\n<|im_start|>assistant\n1+x<|im_end|>\n"
    )
    assert _trained(tok, enc) == "1+x<|im_end|>\n"  # the answer and its end-of-turn token
    assert enc.end_tokens == [tok.convert_tokens_to_ids("<|im_end|>")]
    first = enc.labels.index(next(y for y in enc.labels if y != IGNORE_INDEX))
    assert tok.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_multi_turn_trains_every_assistant_turn(fmt_tok):
    msgs = [
        {"role": "system", "content": "You write q."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "til 3"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "til 4"},
    ]
    enc = encode({"messages": msgs}, fmt_tok, "chat")
    assert _trained(fmt_tok, enc) == "til 3<|im_end|>\ntil 4<|im_end|>\n"
    assert len(enc.end_tokens) == 2
    assert "You are Qwen" not in fmt_tok.decode(enc.input_ids)  # its own system prompt


def test_fallback_template_without_chat_template(fmt_tok):
    plain = copy.deepcopy(fmt_tok)
    plain.chat_template = None
    eos = plain.eos_token
    text, spans = render(to_messages(GOOD), plain)
    assert text == f"### User:\nSum a list.\n\n### Assistant:\nsolve:{{sum x}}{eos}\n\n"
    ((a, b),) = spans
    assert text[a:b] == f"solve:{{sum x}}{eos}"
    assert encode(GOOD, plain, "chat").end_tokens == [plain.eos_token_id]


def test_prompt_format_auto_follows_the_training_records():
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert resolve_prompt_format("auto", [GOOD, GOOD]) == "raw"
    assert resolve_prompt_format("auto", [GOOD, chat]) == "chat"
    assert resolve_prompt_format("chat", [GOOD]) == "chat"


def test_messages_in_raw_format_name_file_and_line(tmp_path, fmt_tok):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(chat) + "\n")  # a blank line 2
    with pytest.raises(
        DataError,
        match=r"mixed.jsonl:line 3: a 'messages' record needs "
        r"--prompt_format chat",
    ):
        tokenize_records(load_records(path), fmt_tok, 512, prompt_format="raw")


def test_chat_template_errors_name_file_and_line(tmp_path):
    tok = load_tokenizer(ASSETS_DIR / "tiny_model")
    tok.chat_template = (
        "{%- for m in messages %}{%- if m['content'] == 'boom' %}"
        "{{ raise_exception('roles must alternate') }}{%- endif %}"
        "{{ m['content'] }}<|im_end|>{%- endfor %}"
    )
    path = _jsonl(tmp_path / "t.jsonl", [GOOD, {"prompt": "boom", "completion": "x"}])
    with pytest.raises(DataError) as e:
        tokenize_records(load_records(path), tok, 512, prompt_format="chat")
    assert "t.jsonl:line 2: the chat template failed: roles must alternate" in str(e.value)
    assert "\n" not in str(e.value)


def test_template_without_an_end_of_turn_token_is_refused(tok):
    plain_end = copy.deepcopy(tok)
    plain_end.chat_template = (
        "{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + "
        "'\n\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}assistant: {%- endif %}"
    )
    with pytest.raises(DataError, match="not a special token: generation could not stop"):
        encode(GOOD, plain_end, "chat")


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_overlong_dropped_or_truncated(fmt_tok, fmt):
    tok = fmt_tok
    recs = [GOOD, {"prompt": "p", "completion": "x " * 400}]
    dropped = tokenize_records(recs, tok, max_seq_length=64, overlong="drop", prompt_format=fmt)
    assert (len(dropped), dropped.dropped, dropped.truncated) == (1, 1, 0)
    assert dropped.stats["records"] == 2 and dropped.stats["dropped"] == 1
    cut = tokenize_records(recs, tok, max_seq_length=64, overlong="truncate", prompt_format=fmt)
    assert (len(cut), cut.dropped, cut.truncated) == (2, 0, 1)
    assert max(map(len, cut.input_ids)) == 64
    # A cut answer has lost its end token: only the whole one counts as teaching where to stop.
    assert sum(cut.end_tokens.values()) == 1
    with pytest.raises(DataError, match="every example is longer"):
        tokenize_records(recs[1:], tok, max_seq_length=64, prompt_format=fmt)


def _mine(sampler, start):
    """The source ids this rank's micro-batches hold, in order."""
    b = sampler.step(start)
    per_micro = sampler.micro
    out = []
    for j in range(sampler.accum):
        base = j * per_micro * sampler.world + sampler.rank * per_micro
        out += b.sample_ids[base : base + per_micro]
    return out


def test_sampler_is_deterministic_and_partitions_the_global_batch(tok):
    data = tokenize_records(load_records(ASSETS_DIR / "q_sft_train.jsonl"), tok, 512)
    one = Sampler(data, micro=2, accum=4, world=1, rank=0, seed=7, pad_id=0)
    two = [Sampler(data, micro=2, accum=2, world=2, rank=r, seed=7, pad_id=0) for r in (0, 1)]
    for start in (0, 24, 160, 320):  # crosses into the next epoch (162 examples)
        a = one.step(start)
        b0, b1 = two[0].step(start), two[1].step(start)
        assert a.sample_ids == b0.sample_ids == b1.sample_ids  # the same global batch
        assert sorted(_mine(two[0], start) + _mine(two[1], start)) == sorted(a.sample_ids)
        assert not set(_mine(two[0], start)) & set(_mine(two[1], start))
        assert a.num_label_tokens == b0.num_label_tokens == b1.num_label_tokens
        assert a.sample_ids == Sampler(data, 2, 4, 1, 0, 7, 0).step(start).sample_ids
    assert one.step(0).sample_ids != Sampler(data, 2, 4, 1, 0, 8, 0).step(0).sample_ids
    # Each epoch visits every example exactly once, across batch boundaries.
    stream = [i for s in range(0, 2 * len(data), 8) for i in one.step(s).sample_ids]
    assert (
        sorted(stream[: len(data)]) == sorted(stream[len(data) : 2 * len(data)]) == sorted(data.ids)
    )


def test_collate_pads_and_masks():
    batch = collate([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_eval_batches_same_count_on_every_rank(tok):
    data = tokenize_records([GOOD] * 5, tok, 512)
    per_rank = [list(eval_batches(data, batch=2, world=2, rank=r, pad_id=0)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    real = sum(int(b["input_ids"].shape[0]) for rank in per_rank for b, ok in rank if ok)
    assert real == 5
