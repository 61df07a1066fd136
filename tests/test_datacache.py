"""The tokenize-once cache (trainer.datacache), the mix of several files, and the fast packer.

Single-process: rundata.prepare's collectives are identities without a process group; the
launched runs (test_multirank, test_resume) exercise the builder/waiter split over 2 ranks.
"""

from __future__ import annotations

import bisect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import qwen_layout_model
from trainer import datacache, rundata
from trainer.batching import Sampler, pack_bfd, quotas
from trainer.config import ASSETS_DIR
from trainer.data import IGNORE_INDEX, encode
from trainer.model import load_tokenizer
from trainer.records import DataError, load_records
from trainer.tokenized import mix, tokenize_records

TRAIN = ASSETS_DIR / "q_sft_train.jsonl"
TEST = ASSETS_DIR / "q_sft_test.jsonl"
TINY = ASSETS_DIR / "tiny_model"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


def _prepare(
    files,
    tok,
    cache,
    fmt="raw",
    seq=512,
    overlong="drop",
    num_proc=1,
    evals=(),
    model=TINY,
    said=None,
):
    return rundata.prepare(
        [Path(f) for f in files],
        [Path(f) for f in evals],
        tok,
        model,
        fmt,
        seq,
        overlong,
        Path(cache),
        num_proc,
        60,
        say=(said.append if said is not None else lambda m: None),
    )


def _reference(records, tok, fmt, seq, overlong):
    """encode() record by record, then the drop/truncate rule: what the trainer must train on."""
    out = []
    for i, r in enumerate(records):
        e = encode(r, tok, fmt)
        ids, labels = e.input_ids[:seq], e.labels[:seq]
        if len(e.input_ids) > seq and (
            overlong == "drop" or all(x == IGNORE_INDEX for x in labels[1:])
        ):
            continue
        out.append((i, ids, labels))
    return out


@pytest.mark.parametrize(
    "fmt,seq,overlong,layout",
    [("raw", 512, "drop", False), ("chat", 256, "truncate", False), ("chat", 512, "drop", True)],
)
def test_cached_tokens_equal_encoding_record_by_record(tmp_path, tok, fmt, seq, overlong, layout):
    model = qwen_layout_model(tmp_path / "model") if layout else TINY
    tokenizer = load_tokenizer(model) if layout else tok
    (train,), _, report = _prepare(
        [TRAIN], tokenizer, tmp_path / "cache", fmt, seq, overlong, model=model
    )
    want = _reference(load_records(TRAIN), tokenizer, fmt, seq, overlong)
    assert report["entries"][str(TRAIN)]["built"] and report["prompt_format"] == fmt
    assert len(train) == len(want) and train.stats["records"] == 804
    assert (train.dropped + train.truncated) > 0  # the limit matters for this case
    for k, (i, ids, labels) in enumerate(want):
        assert train.ids[k] == i and train.input_ids[k] == ids and train.labels[k] == labels
        assert train.lengths[k] == len(ids)
        assert train.label_tokens(k) == sum(x != IGNORE_INDEX for x in labels[1:])


def test_a_second_start_reads_the_cache_and_a_damaged_entry_is_rebuilt(tmp_path, tok):
    cache = tmp_path / "cache"
    (first,), _, report = _prepare([TRAIN], tok, cache, evals=[TEST])
    entry = Path(report["entries"][str(TRAIN)]["dir"])
    assert report["entries"][str(TEST)]["built"]
    (again,), _, report = _prepare([TRAIN], tok, cache, evals=[TEST])
    assert not any(e["built"] for e in report["entries"].values())
    assert list(again.input_ids) == list(first.input_ids)
    arrow = sorted(entry.glob("*.arrow"))[0]

    def damage_and_check(damage, why):
        damage()
        said: list[str] = []
        (rebuilt,), _, rep = _prepare([TRAIN], tok, cache, evals=[TEST], said=said)
        assert rep["entries"][str(TRAIN)]["built"] and not rep["entries"][str(TEST)]["built"]
        assert said[0] == f"data cache {entry}: {why}; rebuilding it"
        assert said[1].startswith(f"tokenizing {TRAIN} (804 records, 1 process) into ")
        assert len(said) == 2
        assert list(rebuilt.input_ids) == list(first.input_ids)

    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    damage_and_check(
        lambda: arrow.write_bytes(bytes(data)), f"{arrow.name} does not match its checksum"
    )
    damage_and_check(
        lambda: arrow.write_bytes(arrow.read_bytes()[:-100]),
        f"{arrow.name} is missing or has the wrong size",
    )
    damage_and_check(
        lambda: (entry / datacache.MANIFEST).unlink(), "no manifest (an interrupted build)"
    )
    assert not list(cache.glob(".tmp-*"))  # no build left anything behind


def test_the_key_follows_every_input_and_content_not_the_path(tmp_path, tok):
    cache = tmp_path / "cache"
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(TRAIN, moved)

    def entry(path=TRAIN, **kw):
        args = dict(fmt="raw", seq=512, overlong="drop") | kw
        _, _, rep = _prepare([path], tok, cache, **args)
        return rep["entries"][str(path)]["dir"]

    base = entry()
    assert entry(moved) == base  # the same bytes elsewhere: the same tokens
    others = {entry(seq=256), entry(overlong="truncate"), entry(fmt="chat"), entry(fmt="auto")}
    assert len(others) == 4 and base not in others
    moved.write_text(moved.read_text() + "\n")  # other bytes, the same records
    assert entry(moved) not in {base, *others}


def _many(tmp_path: Path, n: int, bad_line: int | None = None) -> Path:
    base = TRAIN.read_text().splitlines()
    lines = [base[i % len(base)] for i in range(n)]
    if bad_line is not None:
        rec = json.loads(lines[bad_line - 1])
        lines[bad_line - 1] = json.dumps({**rec, "completion": "  "})
    path = tmp_path / f"many-{n}-{bad_line}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_processes_write_what_one_does_and_a_bad_record_names_its_line(tmp_path, tok):
    n = 2 * datacache.MIN_RECORDS_PER_PROC + 10  # enough for the map to start 2 processes
    path = _many(tmp_path, n)
    (one,), _, _ = _prepare([path], tok, tmp_path / "c1", num_proc=1)
    (two,), _, rep = _prepare([path], tok, tmp_path / "c2", num_proc=2)
    manifest = json.loads((Path(rep["entries"][str(path)]["dir"]) / "manifest.json").read_text())
    assert manifest["processes"] == 2 and len(manifest["files"]) == 2
    assert one.stats == two.stats and (one.ids == two.ids).all()
    # Rows spread over several Arrow record batches (and files) are found by row.
    assert len(one.input_ids.chunks) > 4 and len(two.input_ids.chunks) > 4
    mem = tokenize_records(load_records(path), tok, 512, prompt_format="raw")
    for k in range(0, len(one), 97):
        assert one.input_ids[k] == two.input_ids[k] == mem.input_ids[k]
        assert one.labels[k] == two.labels[k] == mem.labels[k]
    bad = _many(tmp_path, n, bad_line=n - 5)  # in the second process's half
    with pytest.raises(DataError, match=f"^{bad}:line {n - 5}: empty completion$"):
        _prepare([bad], tok, tmp_path / "c3", num_proc=2)
    assert not list((tmp_path / "c3").iterdir())  # nothing half-written is left


def test_tokens_are_read_from_the_cache_files_not_held(tmp_path, tok):
    from trainer.tokenized import FileValues

    (train,), _, _ = _prepare([TRAIN], tok, tmp_path / "cache")
    for values, offsets in train.input_ids.chunks + train.labels.chunks:
        # Read per example from the file (bench/data.py measures the resident memory of a
        # million records); what a rank holds is per-row offsets and small per-example arrays.
        assert isinstance(values, FileValues) and isinstance(offsets, np.ndarray)
    for small in (train.lengths, train.n_labels, train.ids):
        assert isinstance(small, np.ndarray) and small.dtype.itemsize <= 8
    last = len(train) - 1
    assert train.input_ids[last] == train.input_ids.array(last).tolist() != []


def _sets(tok, sizes):
    records = load_records(TRAIN)
    out, at = [], 0
    for n in sizes:
        s = tokenize_records(records[at : at + n], tok, 1024, source=f"part{len(out)}")
        assert len(s) == n
        out.append(s)
        at += n
    return out


def _epoch(sampler, epoch):
    return [u[0] for u in sampler.units(epoch)]


def test_weighted_mix_draws_each_files_share_per_epoch(tok):
    a, b = _sets(tok, [40, 20])
    data = mix([a, b], [1.0, 3.0])
    assert quotas([1.0, 3.0], [40, 20]) == [15, 45]
    sampler = Sampler(data, 1, 1, 1, 0, seed=7, pad_id=0)
    seen = np.zeros(60, dtype=int)
    for epoch in range(8):
        units = _epoch(sampler, epoch)
        assert len(units) == 60 and sum(u < 40 for u in units) == 15  # the rest from B
        np.add.at(seen, units, 1)
    # Each file is drawn from its own stream of permutations, one pass after another: over
    # 8 epochs A (8 x 15 = 3 x 40 draws) shows every example 3 times, B (8 x 45) 18 times.
    assert set(seen[:40]) == {3} and set(seen[40:]) == {18}
    # A record id says which file (ids continue over the files) and is the same every run.
    again = Sampler(mix([a, b], [1.0, 3.0]), 1, 1, 1, 0, seed=7, pad_id=0)
    assert _epoch(again, 3) == _epoch(sampler, 3)
    assert _epoch(Sampler(data, 1, 1, 1, 0, seed=8, pad_id=0), 0) != _epoch(sampler, 0)
    assert data.ids[45] == a.stats["records"] + b.ids[5]


def test_weights_in_proportion_to_size_are_the_plain_concatenation(tok):
    a, b = _sets(tok, [40, 20])
    plain = Sampler(mix([a, b], None), 2, 1, 2, 0, seed=3, pad_id=0, pack_to=512)
    weighted = Sampler(mix([a, b], [2.0, 1.0]), 2, 1, 2, 0, seed=3, pad_id=0, pack_to=512)
    for epoch in (0, 1):
        assert list(plain.units(epoch)) == list(weighted.units(epoch))
        assert sorted(i for u in plain.units(epoch) for i in u) == list(range(60))
    assert mix([a], None) is a  # one file: the set itself, the stream of earlier versions


def _reference_bfd(lengths, order, capacity):
    """The packer as it was before the cache (bisect over a sorted list of free bins)."""
    rank = {ex: i for i, ex in enumerate(order)}
    bins, free = [], []
    for ex in sorted(order, key=lambda ex: (-lengths[ex], rank[ex])):
        k = bisect.bisect_left(free, (lengths[ex], -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(ex)
        if room - lengths[ex] > 0:
            bisect.insort(free, (room - lengths[ex], b))
    return bins


@pytest.mark.parametrize("capacity", [64, 512, 4096])
def test_fast_packer_makes_the_bins_of_the_reference(capacity):
    rng = np.random.default_rng(capacity)
    lengths = rng.integers(1, capacity + 1, 3000) // rng.integers(1, 6, 3000) + 1
    lengths = np.minimum(lengths, capacity)
    order = rng.permutation(3000).tolist()
    assert pack_bfd(lengths, order, capacity) == _reference_bfd(lengths.tolist(), order, capacity)


def test_parquet_with_other_columns_tokenizes_as_its_jsonl(tmp_path, tok):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    records = load_records(TRAIN)[:50]
    table = pa.Table.from_pylist([{**r, "when": datetime.datetime(2026, 1, 1)} for r in records])
    pq.write_table(table, tmp_path / "part.parquet")
    (tmp_path / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (pq_set, js_set), _, _ = _prepare(
        [tmp_path / "part.parquet", tmp_path / "part.jsonl"], tok, tmp_path / "cache"
    )
    assert list(pq_set.input_ids) == list(js_set.input_ids)
    assert list(pq_set.labels) == list(js_set.labels) and len(pq_set) == 50
