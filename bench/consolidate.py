"""Benchmark: consolidating a ZeRO-3 checkpoint, ours vs DeepSpeed's zero_to_fp32.py.

    .venv/bin/python bench/consolidate.py [--workdir DIR] [--hidden 1024 --layers 24] [--reuse]

1. Trains a randomly initialised Qwen2-architecture model (426M parameters by default, tied
   embeddings, Qwen2.5's 151,936-token vocabulary) for 2 steps with 2 CPU ranks through the real
   launcher, saving a ZeRO-3 checkpoint (fp32 on CPU).
2. Runs, one after another on the same checkpoint with a warm page cache:
   (a) ours to bf16, (b) ours to fp32, (c) DeepSpeed's checkpoints/zero_to_fp32.py, first with
   --safe_serialization (which fails on tied embeddings) and then without it.
   Each is a child process; wall time and peak RSS (ru_maxrss from wait4) are measured.
3. Prints a markdown table and, last, the ratios ours / DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import free_port, run_env  # noqa: E402


def measure(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS GiB, output tail) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 2**20, out[-600:]


def build_checkpoint(work: Path, args: argparse.Namespace, env: dict[str, str]) -> Path:
    from transformers import Qwen2Config

    model = work / "model"
    shutil.copytree(REPO / "trainer" / "assets" / "tiny_model", model)
    base = json.loads((model / "config.json").read_text())
    Qwen2Config(
        vocab_size=151936,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"],
        pad_token_id=base["pad_token_id"],
    ).save_pretrained(model)
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--model_size",
        "tiny",
        "--base_model",
        str(model),
        "--train_file",
        str(REPO / "trainer/assets/q_sft_train.jsonl"),
        "--output_dir",
        str(work / "run"),
        "--max_steps",
        "2",
        "--save_steps",
        "2",
        "--max_seq_length",
        "128",
        "--batch_size",
        "1",
        "--consolidate",
        "none",
    ]
    rc, wall, _, out = measure(cmd, env)
    if rc != 0:
        sys.exit(f"training failed:\n{out}")
    print(f"built the checkpoint in {wall:.0f}s")
    return work / "run" / "checkpoints"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_consolidate")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument(
        "--reuse", action="store_true", help="keep the checkpoint a previous run built in --workdir"
    )
    args = p.parse_args()
    work = args.workdir
    root = work / "run" / "checkpoints"
    env = run_env(work)
    if args.reuse and (root / "checkpoint-2").is_dir():
        for old in ("ours_bf16", "ours_fp32", "ds_safe", "ds_bin"):
            shutil.rmtree(work / old, ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        root = build_checkpoint(work, args, env)
    tag = root / "checkpoint-2"
    ckpt_bytes = sum(f.stat().st_size for f in tag.glob("*.pt"))
    for f in tag.glob("*.pt"):  # warm the page cache so that no method pays the first read
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    py = sys.executable
    runs = {
        "qsft consolidate --dtype bf16": [
            py,
            "-m",
            "trainer.offline.consolidate",
            str(tag),
            "--out",
            str(work / "ours_bf16"),
            "--dtype",
            "bf16",
        ],
        "qsft consolidate --dtype fp32": [
            py,
            "-m",
            "trainer.offline.consolidate",
            str(tag),
            "--out",
            str(work / "ours_fp32"),
            "--dtype",
            "fp32",
        ],
        "zero_to_fp32.py --safe_serialization": [
            py,
            str(root / "zero_to_fp32.py"),
            str(root),
            str(work / "ds_safe"),
            "--tag",
            tag.name,
            "--safe_serialization",
        ],
        "zero_to_fp32.py (pickle)": [
            py,
            str(root / "zero_to_fp32.py"),
            str(root),
            str(work / "ds_bin"),
            "--tag",
            tag.name,
        ],
    }
    results = {}
    for name, cmd in runs.items():
        rc, wall, rss, out = measure(cmd, env)
        results[name] = (rc, wall, rss)
        if rc != 0:
            print(f"{name} failed (exit {rc}): {out.strip().splitlines()[-1]}")
    n_params = json.loads((work / "ours_fp32" / "manifest.json").read_text())["num_parameters"]
    print(
        f"\nmodel: {n_params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} "
        f"layers, tied); checkpoint {ckpt_bytes / 2**30:.2f} GiB on disk, 2 ranks\n"
    )
    print("| method | exit | wall (s) | peak RSS (GiB) |\n|---|---|---|---|")
    for name, (rc, wall, rss) in results.items():
        print(f"| {name} | {rc} | {wall:.1f} | {rss:.2f} |")
    ds_rc, ds_wall, ds_rss = results["zero_to_fp32.py (pickle)"]
    print()
    for name in ("qsft consolidate --dtype bf16", "qsft consolidate --dtype fp32"):
        _, wall, rss = results[name]
        print(f"{name} / zero_to_fp32.py: peak RSS {rss / ds_rss:.2f}x, wall {wall / ds_wall:.2f}x")


if __name__ == "__main__":
    main()
