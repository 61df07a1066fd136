"""Benchmark: what the base-weight checks cost next to the ZeRO-3 load itself.

    .venv/bin/python bench/load_check.py [--workdir DIR] [--ranks 2] [--reuse]
        [--hidden 896 --layers 24 --intermediate 4864 --heads 14 --kv_heads 2]

1. Saves a randomly initialised model of Qwen2.5-0.5B's shape (494M parameters, tied, vocab
   151,936) the way Qwen2.5 releases are saved: bf16 safetensors shards + an index.
2. Trains it for one step through the real launcher (2 CPU ranks, ZeRO-3, fp32 on CPU, nothing
   saved) twice: with the load check (the default) and with --no-load_check.
3. Reads from each run's log the time of `from_pretrained` under ZeRO-3 and of the check (rank 0:
   tensors compared, bytes read from the files), and the time to the first logged message, and
   prints a markdown table.

The header check before the load (names and shapes from the index and safetensors headers
against a meta-device model) is timed in-process here too, and the meta-device model of a 32B
config, its part that grows with the model.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import free_port, qwen_layout_model, run_env  # noqa: E402

LOAD_LINE = re.compile(
    r"base weights loaded in ([\d.]+)s and checked against the files on every "
    r"rank \(rank 0: (\d+) tensors, ([\d.]+) MiB read in ([\d.]+)s"
)


def make_model(dest: Path, args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    qwen_layout_model(dest)
    config = AutoConfig.from_pretrained(dest)
    config.update(
        dict(
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            intermediate_size=args.intermediate,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            vocab_size=151936,
            layer_types=["full_attention"] * args.layers,
            tie_word_embeddings=True,
        )
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, max_shard_size="400MB")
    return sum(p.numel() for p in model.parameters())


def train_once(base: Path, work: Path, ranks: int, check: bool) -> dict:
    data = work / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Sum {i} numbers.\n", "completion": "```q\nsum x\n```"}) + "\n"
            for i in range(8)
        )
    )
    out = work / ("out-check" if check else "out-nocheck")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--model_size",
        "tiny",
        "--base_model",
        str(base),
        "--train_file",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--save_every_n_steps",
        "0",
        "--max_seq_length",
        "128",
        "--no-packing",
        "--load_check" if check else "--no-load_check",
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=run_env(work), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"training failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    row = dict(check=check, wall_s=round(wall, 1))
    m = LOAD_LINE.search(res.stdout)
    if check:
        assert m, res.stdout[-3000:]
        row.update(
            load_s=float(m.group(1)),
            tensors=int(m.group(2)),
            read_mib=float(m.group(3)),
            check_s=float(m.group(4)),
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_load_check")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="keep an already saved model")
    args = ap.parse_args()
    base = args.workdir / "base"
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.reuse and (base / "model.safetensors.index.json").is_file()):
        shutil.rmtree(base, ignore_errors=True)
        n = make_model(base, args)
        print(f"saved {n / 1e6:.0f}M parameters (bf16) to {base}")
    files = sorted(base.glob("model-*.safetensors"))
    size = sum(f.stat().st_size for f in files)

    from transformers import AutoModelForCausalLM  # noqa: F401 - import time is not the check's
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

    from trainer.weights import check_files

    t0 = time.perf_counter()
    check_files(base)
    header_s = time.perf_counter() - t0
    # The part of the header check that grows with the model: the meta-device model of a 32B
    # config (Qwen2.5-32B's layer shape; its release pads the vocabulary to 152,064, kept at
    # 151,936 here: a 0.4% difference in one tensor), no weights needed.
    from trainer.weights import expected_tensors

    big = args.workdir / "config_32b"
    big.mkdir(exist_ok=True)
    config = json.loads((base / "config.json").read_text())
    config.update(
        hidden_size=5120,
        num_hidden_layers=64,
        intermediate_size=27648,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * 64,
    )
    (big / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    shapes, _ = expected_tensors(big)
    meta32_s = time.perf_counter() - t0
    print(f"meta-device model of the 32B config: {len(shapes)} tensors in {meta32_s:.2f} s")
    rows = [train_once(base, args.workdir, args.ranks, check) for check in (True, False)]
    with_check, without = rows
    print(
        f"\n{len(files)} shards, {size / 2**30:.2f} GiB bf16; {args.ranks} ranks, fp32 training\n"
    )
    print(
        "| header check | from_pretrained (ZeRO-3) | load check (rank 0) | read by rank 0 | "
        "launch to exit, check on | check off |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {header_s:.2f} s | {with_check['load_s']:.1f} s | {with_check['check_s']:.1f} s | "
        f"{with_check['read_mib']:.0f} MiB ({with_check['tensors']} tensors) | "
        f"{with_check['wall_s']:.1f} s | {without['wall_s']:.1f} s |"
    )
    (args.workdir / "load_check.json").write_text(
        json.dumps(
            dict(
                header_s=header_s,
                meta_32b_s=meta32_s,
                runs=rows,
                shard_bytes=size,
                ranks=args.ranks,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
