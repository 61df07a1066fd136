"""Data loading, validation, chat formatting, prompt masking and deterministic sharding."""

from __future__ import annotations

import json

import pytest

from trainer.batching import Sampler, collate, eval_batches
from trainer.config import ASSETS_DIR
from trainer.data import (
    IGNORE_INDEX,
    DataError,
    load_records,
    render,
    to_messages,
    tokenize_example,
    tokenize_records,
)
from trainer.model import load_tokenizer


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
    cases["malformed json"] = (_jsonl(tmp_path / "a.jsonl", [GOOD, '{"prompt": "x",']),
                               "a.jsonl:line 2: invalid JSON")
    cases["missing keys"] = (_jsonl(tmp_path / "b.jsonl", [GOOD, GOOD, {"question": "x"}]),
                             "b.jsonl:line 3: record needs 'prompt' and 'completion'")
    cases["empty completion"] = (_jsonl(tmp_path / "c.jsonl", [{"prompt": "p",
                                                                "completion": "  \n"}]),
                                 "c.jsonl:line 1: empty completion")
    cases["wrong type"] = (_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": 3}]),
                           "d.jsonl:line 1: 'completion' must be a string")
    bad_utf8 = tmp_path / "e.jsonl"
    bad_utf8.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    cases["invalid utf-8"] = (bad_utf8, "e.jsonl:line 2: invalid UTF-8")
    cases["not an object"] = (_jsonl(tmp_path / "f.jsonl", ["[1, 2]"]),
                              "f.jsonl:line 1: expected a JSON object")
    cases["empty file"] = (_jsonl(tmp_path / "g.jsonl", []), "g.jsonl: no records")
    cases["no assistant turn"] = (
        _jsonl(tmp_path / "h.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]),
        "h.jsonl:line 1: no assistant message")
    cases["bad role"] = (
        _jsonl(tmp_path / "i.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}]),
        "i.jsonl:line 1: messages[0].role")
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["x", "y"]}), tmp_path / "j.parquet")
    cases["parquet missing column"] = (tmp_path / "j.parquet",
                                       "j.parquet: missing column(s) 'completion'")
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1, 2]}), tmp_path / "l.parquet")
    cases["parquet wrong type"] = (tmp_path / "l.parquet",
                                   "l.parquet:row 0: 'completion' must be a string")
    (tmp_path / "k.parquet").write_bytes(b"PAR1 not really")
    cases["corrupt parquet"] = (tmp_path / "k.parquet", "k.parquet: not a readable parquet")
    (tmp_path / "emptydir").mkdir()
    cases["dir without dataset"] = (tmp_path / "emptydir", "emptydir: no data files")
    return cases


CASE_NAMES = ["missing file", "malformed json", "missing keys", "empty completion", "wrong type",
              "invalid utf-8", "not an object", "empty file", "no assistant turn", "bad role",
              "parquet missing column", "parquet wrong type", "corrupt parquet",
              "dir without dataset"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_data_rejected_with_file_and_line(name, tmp_path):
    path, expected = _broken_files(tmp_path)[name]
    with pytest.raises(DataError) as e:
        load_records(path)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_loads_jsonl_parquet_and_dataset_dir(tmp_path):
    import datasets

    recs = [GOOD, {"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]}]
    assert load_records(_jsonl(tmp_path / "x.jsonl", recs)) == recs
    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(tmp_path / "x.parquet"))
    assert load_records(tmp_path / "x.parquet") == [GOOD, GOOD]
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds") == [GOOD]


def test_chat_template_masks_prompt(tok):
    ids, labels = tokenize_example(to_messages({"prompt": "Add one.", "completion": "1+x"}), tok)
    text = tok.decode(ids)
    assert text == ("<|im_start|>user\nAdd one.<|im_end|>\n"
                    "<|im_start|>assistant\n1+x<|im_end|>\n")
    trained = tok.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX])
    assert trained == "1+x<|im_end|>\n"  # the answer and its end-of-turn token, nothing else
    first = labels.index(next(y for y in labels if y != IGNORE_INDEX))
    assert "assistant" in tok.decode(ids[:first])


def test_multi_turn_trains_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "You write q."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "til 3"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "til 4"}]
    ids, labels = tokenize_example(msgs, tok)
    trained = tok.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX])
    assert trained == "til 3<|im_end|>\ntil 4<|im_end|>\n"


def test_fallback_template_without_chat_template(tok):
    plain = load_tokenizer(ASSETS_DIR / "tiny_model")
    plain.chat_template = None
    text, spans = render(to_messages(GOOD), plain)
    assert text == ("### User:\nSum a list.\n\n### Assistant:\nsolve:{sum x}<|im_end|>\n\n")
    (a, b), = spans
    assert text[a:b] == "solve:{sum x}<|im_end|>"


def test_overlong_dropped_or_truncated(tok):
    recs = [GOOD, {"prompt": "p", "completion": "x " * 400}]
    dropped = tokenize_records(recs, tok, max_seq_length=64, overlong="drop")
    assert (len(dropped), dropped.dropped, dropped.truncated) == (1, 1, 0)
    cut = tokenize_records(recs, tok, max_seq_length=64, overlong="truncate")
    assert (len(cut), cut.dropped, cut.truncated) == (2, 0, 1)
    assert max(map(len, cut.input_ids)) == 64
    with pytest.raises(DataError, match="every example is longer"):
        tokenize_records(recs[1:], tok, max_seq_length=64)


def _mine(sampler, start):
    """The source ids this rank's micro-batches hold, in order."""
    b = sampler.step(start)
    per_micro = sampler.micro
    out = []
    for j in range(sampler.accum):
        base = j * per_micro * sampler.world + sampler.rank * per_micro
        out += b.sample_ids[base:base + per_micro]
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
    assert sorted(stream[: len(data)]) == sorted(stream[len(data): 2 * len(data)]) == sorted(
        data.ids)


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
