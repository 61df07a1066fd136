"""Benchmark: the data path at scale, before (every rank tokenizes into Python lists) and after
(tokenize once into the Arrow cache, memory-map it).

    .venv/bin/python bench/data.py [--records 1000000] [--old_records 20000]
                                   [--rate_records 100000] [--max_seq_length 4096] [--work DIR]

1. Generates WORK/synthetic-N.jsonl: the shipped training records cycled, each made distinct
   (its prompt starts "Problem <i>:" and a comment with i ends its completion).
2. Today's path (trainer.records.load_records, then encode() per record into lists of ints, as
   tokenize_records did before the cache) on the first --old_records records: records/s and
   resident bytes per token of the result; the 1M-record figures are extrapolated from them.
3. First tokenization into the cache (trainer.datacache.ensure_entries, a fresh cache dir) of
   the first --rate_records records with --num_proc 1 and 2: records/s.
4. The whole set with --num_proc 2: the build every later launch skips.
5. A cached start in a fresh process, as rank 0 of an 8-rank node: check the entry (sizes and
   sha256), open it, and build the sampler with the packing plan of epoch 0 (--max_seq_length);
   then 500 steps' batches of this rank, then every example read once. Time, and the process's
   resident memory above its level before (after imports and the tokenizer), at each point:
   total, anonymous and file-backed.

Each measurement runs in its own process; nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ASSETS = REPO / "trainer" / "assets"


def rss() -> dict[str, int]:
    """This process's resident memory in bytes (total, anonymous, file-backed)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def generate(n: int, dest: Path) -> Path:
    if dest.is_file() and dest.with_suffix(".done").is_file():
        return dest
    base = [json.loads(line) for line in (ASSETS / "q_sft_train.jsonl").open()]
    tmp = dest.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            r = base[i % len(base)]
            f.write(
                json.dumps(
                    {
                        "prompt": f"Problem {i}: {r['prompt']}",
                        "completion": f"{r['completion']}\n/ variant {i}",
                    }
                )
                + "\n"
            )
    tmp.rename(dest)
    dest.with_suffix(".done").touch()
    return dest


def head(src: Path, n: int, dest: Path) -> Path:
    if not dest.is_file():
        with open(src) as f, open(dest, "w") as out:
            for _, line in zip(range(n), f, strict=False):
                out.write(line)
    return dest


def tokenizer():
    from trainer.model import load_tokenizer

    return load_tokenizer(ASSETS / "tiny_model")


def child_old(args: argparse.Namespace) -> dict:
    import gc

    from trainer.data import encode
    from trainer.records import load_records

    tok = tokenizer()
    encode({"prompt": "a", "completion": "b"}, tok, "raw")
    gc.collect()
    before = rss()
    t0 = time.perf_counter()
    records = load_records(Path(args.file))
    ids, labels = [], []
    for r in records:
        e = encode(r, tok, "raw")
        ids.append(e.input_ids[: args.max_seq_length])
        labels.append(e.labels[: args.max_seq_length])
    seconds = time.perf_counter() - t0
    del records
    gc.collect()
    after = rss()
    tokens = sum(map(len, ids))
    return dict(
        records=len(ids),
        seconds=seconds,
        tokens=tokens,
        bytes_per_token=(after["RssAnon"] - before["RssAnon"]) / tokens,
    )


def child_build(args: argparse.Namespace) -> dict:
    from trainer import datacache

    tok = tokenizer()
    cache = Path(args.cache)
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    report = datacache.ensure_entries(
        [Path(args.file)],
        [],
        tok,
        ASSETS / "tiny_model",
        "raw",
        args.max_seq_length,
        "drop",
        cache,
        args.num_proc,
        say=lambda m: None,
    )
    seconds = time.perf_counter() - t0
    entry = Path(next(iter(report["entries"].values()))["dir"])
    manifest = json.loads((entry / datacache.MANIFEST).read_text())
    return dict(
        records=manifest["stats"]["records"],
        tokens=manifest["stats"]["tokens"],
        seconds=seconds,
        processes=manifest["processes"],
        cache_bytes=sum(f["bytes"] for f in manifest["files"].values()),
    )


def child_start(args: argparse.Namespace) -> dict:
    import gc

    import datasets  # noqa: F401 - imported before measuring: libraries are not data
    import pyarrow  # noqa: F401
    import torch.distributed  # noqa: F401

    from trainer import rundata
    from trainer.batching import Sampler
    from trainer.tokenized import mix

    tok = tokenizer()
    gc.collect()
    before = rss()
    t0 = time.perf_counter()
    train, _, _ = rundata.prepare(
        [Path(args.file)],
        [],
        tok,
        ASSETS / "tiny_model",
        "raw",
        args.max_seq_length,
        "drop",
        Path(args.cache),
        1,
        60,
        say=lambda m: None,
    )
    data = mix(train, None)
    sampler = Sampler(data, 1, 1, 8, 0, 42, tok.pad_token_id, pack_to=args.max_seq_length)
    start_s = time.perf_counter() - t0
    ready = rss()
    t1 = time.perf_counter()
    for step in range(500):
        sampler.step(step * sampler.global_batch)
    steps_s = time.perf_counter() - t1
    gc.collect()
    stepped = rss()
    t2 = time.perf_counter()
    for i in range(len(data)):  # every token of the set read once, as over an epoch
        data.input_ids.array(i)
        data.labels.array(i)
    read_all_s = time.perf_counter() - t2
    gc.collect()
    after = rss()
    return dict(
        examples=len(data),
        units=len(sampler.units(0)),
        start_s=start_s,
        steps_500_s=steps_s,
        read_every_example_s=read_all_s,
        rss_mib={k: (ready[k] - before[k]) / 2**20 for k in before},
        rss_after_500_steps_mib={k: (stepped[k] - before[k]) / 2**20 for k in before},
        rss_after_reading_all_mib={k: (after[k] - before[k]) / 2**20 for k in before},
    )


def run_child(kind: str, **kw) -> dict:
    argv = [sys.executable, __file__, "--child", kind]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--old_records", type=int, default=20_000)
    p.add_argument("--rate_records", type=int, default=100_000)
    p.add_argument("--max_seq_length", type=int, default=4096)
    p.add_argument("--work", default="/tmp/qsft-bench-data")
    p.add_argument("--child")
    p.add_argument("--file")
    p.add_argument("--cache")
    p.add_argument("--num_proc", type=int, default=1)
    args = p.parse_args()
    if args.child:
        fn = {"old": child_old, "build": child_build, "start": child_start}[args.child]
        print(json.dumps(fn(args)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    full = generate(args.records, work / f"synthetic-{args.records}.jsonl")
    print(
        f"generated {full} ({full.stat().st_size / 2**20:.0f} MiB) in "
        f"{time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    seq = dict(max_seq_length=args.max_seq_length)
    old_file = head(full, args.old_records, work / f"head-{args.old_records}.jsonl")
    old = run_child("old", file=old_file, **seq)
    print("today's path", old, flush=True)
    rate_file = head(full, args.rate_records, work / f"head-{args.rate_records}.jsonl")
    rates = {
        n: run_child("build", file=rate_file, cache=work / f"cache-rate-{n}", num_proc=n, **seq)
        for n in (1, 2)
    }
    print("first tokenization", rates, flush=True)
    built = run_child("build", file=full, cache=work / "cache", num_proc=2, **seq)
    print("whole set", built, flush=True)
    start = run_child("start", file=full, cache=work / "cache", **seq)
    print("cached start", start, flush=True)
    old_rate = old["records"] / old["seconds"]
    result = dict(
        records=built["records"],
        tokens=built["tokens"],
        max_seq_length=args.max_seq_length,
        today=dict(
            records_per_s=old_rate,
            measured_on=old["records"],
            bytes_per_token=old["bytes_per_token"],
            est_start_s=built["records"] / old_rate,
            est_rss_gib=old["bytes_per_token"] * built["tokens"] / 2**30,
        ),
        first_tokenization={n: r["records"] / r["seconds"] for n, r in rates.items()},
        speedup_num_proc_2=rates[2]["records"] / rates[2]["seconds"] / old_rate,
        whole_set_build_s=built["seconds"],
        cache_gib=built["cache_bytes"] / 2**30,
        cached_start=start,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
