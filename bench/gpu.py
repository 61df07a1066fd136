"""GPU throughput: a Qwen2.5-1.5B-shaped model from random init, packed Q data, ZeRO-3, one GPU.

Run through bench/gpu.sh, which installs the packages the GPU machine lacks from carried wheels.
Trains the shipped Q training set packed into sequences of --seq tokens, bf16, micro batch 1,
for --steps optimizer steps per variant, through the real launcher and trainer with checkpoints
off (--save_every_n_steps 0). The variants (VARIANTS) compare the packed-attention kernels
(varlen, the per-example loop, transformers' masked sdpa), the chunked loss against all logits at
once, and gradient checkpointing. Reports non-padding tokens/s per GPU and MFU averaged over the
logged windows after the first (warm-up), the peak GPU memory the allocator saw, and the library
versions of the machine. Prints a table and writes results.json to --workdir.

The weights are random and the vocabulary is Qwen2.5's 151,936 rows; the token ids come from the
shipped demo tokenizer (3,514 tokens), which changes what is learned, not the work per token.

    bench/gpu.sh                       # on the GPU machine
    python bench/gpu.py --shape smoke --seq 1024 --steps 6 --variants loop,masked,full-loss
                                       # a CPU check of this script with a small model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ASSETS = REPO / "trainer" / "assets"

from trainer.offline.plan import QWEN25  # noqa: E402  (the shapes of DESIGN.md's size table)
from trainer.shape import VOCAB  # noqa: E402

# Qwen2.5-1.5B's shape, plus its position range and rope base; "smoke" runs the script on a CPU.
SHAPES = {
    "1.5b": dict(
        QWEN25["1.5b"],
        vocab_size=VOCAB,
        max_position_embeddings=32768,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
    ),
    "smoke": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}


def make_model_dir(shape: str, out: Path) -> Path:
    """Config + tokenizer, no weights: the trainer initialises from the config with the seed."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ASSETS / "tiny_model", out)
    (out / "model.safetensors").unlink(missing_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(SHAPES[shape])
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def library_versions() -> dict[str, str]:
    """The GPU image may carry other versions than ours: record what actually ran."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {}
    for pkg in ("torch", "transformers", "deepspeed", "flash-attn", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["cuda"] = str(torch.version.cuda)
    try:
        out["driver"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except (OSError, IndexError, subprocess.TimeoutExpired):
        out["driver"] = "unknown"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# name -> (--attention, --loss, gradient checkpointing). "auto" is varlen on a GPU with torch
# >= 2.10, which the run's log and config.yaml confirm (results.json records it per variant).
VARIANTS = {
    "varlen": ("auto", "chunked", False),
    "varlen-gc": ("auto", "chunked", True),
    "loop": ("loop", "chunked", False),
    "masked": ("masked", "chunked", False),
    "full-loss": ("auto", "full", False),
    # checkpointing for the others too: a second call if the device time allows
    "loop-gc": ("loop", "chunked", True),
    "masked-gc": ("masked", "chunked", True),
    "full-loss-gc": ("auto", "full", True),
    # the names of earlier versions of this script
    "no-gc": ("auto", "chunked", False),
    "gc": ("auto", "chunked", True),
}


def run_variant(model_dir: Path, out: Path, args: argparse.Namespace, variant: str) -> dict:
    attn, loss, gc = VARIANTS[variant]
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "train.py"),
        "--model_size",
        args.model_size,
        "--base_model",
        str(model_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        str(args.steps),
        "--max_seq_length",
        str(args.seq),
        "--batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--logging_steps",
        str(args.log_every),
        "--save_every_n_steps",
        "0",
        "--consolidate",
        "none",
        "--resume",
        "none",
        "--learning_rate",
        "2e-5",
        "--seed",
        "42",
        "--attention",
        attn,
        "--loss",
        loss,
        "--gradient_checkpointing" if gc else "--no-gradient_checkpointing",
    ]
    if args.bf16:
        cmd.append("--bf16")
    t0 = time.perf_counter()
    # Own session: on a timeout the launcher *and* its rank are killed, freeing the GPU.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        proc.returncode = f"timeout after {args.timeout} s"
    wall = time.perf_counter() - t0
    (out.parent / f"{out.name}.log").write_text(text)
    if proc.returncode != 0:
        return dict(error=f"exit {proc.returncode}", tail=text[-3000:], wall_s=wall)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    rows = rows[1:] or rows  # the first window includes warm-up, unless it is the only one
    summary = json.loads((out / "logs" / "summary.json").read_text())
    import yaml

    kernels = yaml.safe_load((out / "config.yaml").read_text()).get("kernels", {})
    return dict(
        attention=kernels.get("attention"),
        loss=kernels.get("loss"),
        gc=gc,
        tokens_per_s=sum(r["tokens_per_s"] for r in rows) / len(rows),
        mfu=sum(r["mfu"] for r in rows) / len(rows),
        padding=sum(r["padding"] for r in rows) / len(rows),
        last_loss=rows[-1]["loss"],
        windows=len(rows),
        gpu_peak_mem_gib=summary.get("gpu_peak_mem_gib"),
        wall_s=wall,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--log_every", type=int, default=5)
    p.add_argument(
        "--variants",
        default="varlen,varlen-gc,loop,masked,full-loss",
        help=f"comma-separated, of {', '.join(VARIANTS)}",
    )
    p.add_argument("--timeout", type=int, default=180, help="seconds per variant")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_gpu")
    args = p.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    args.bf16 = cuda
    args.model_size = "1.5b" if args.shape == "1.5b" else "tiny"
    device = torch.cuda.get_device_name() if cuda else "CPU (no GPU)"
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(args.shape, args.workdir / f"model_{args.shape}")
    results = dict(
        device=device,
        shape=args.shape,
        seq=args.seq,
        steps=args.steps,
        versions=library_versions(),
        variants={},
    )
    print(f"[gpu bench] {device}; {json.dumps(results['versions'])}", flush=True)
    for name in args.variants.split(","):
        print(f"[gpu bench] {name} ...", flush=True)
        r = run_variant(model_dir, args.workdir / name, args, name)
        results["variants"][name] = r
        print(
            f"[gpu bench] {name}: {json.dumps({k: v for k, v in r.items() if k != 'tail'})}",
            flush=True,
        )
        if "error" in r:
            print(r["tail"], flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"\n{device}, {args.shape} shape, seq {args.seq}, micro batch 1, "
        f"{'bf16' if args.bf16 else 'fp32'}, ZeRO-3, {args.steps} steps; "
        f"{', '.join(f'{k} {v}' for k, v in results['versions'].items())}\n"
    )
    print(
        "| variant | attention | loss | gc | tokens/s/GPU | MFU | peak GPU mem (GiB) | "
        "padding | wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results["variants"].items():
        if "error" in r:
            print(f"| {name} | | | | {r['error']} | | | | {r['wall_s']:.0f} |")
            continue
        mem = r["gpu_peak_mem_gib"]
        print(
            f"| {name} | {r['attention']} | {r['loss']} | {'on' if r['gc'] else 'off'} | "
            f"{r['tokens_per_s']:.0f} | {r['mfu']:.1%} | "
            f"{'-' if mem is None else f'{mem:.1f}'} | {r['padding']:.1%} | "
            f"{r['wall_s']:.0f} |"
        )
    tps = {n: r["tokens_per_s"] for n, r in results["variants"].items() if "error" not in r}
    if "varlen" in tps and "loop" in tps:
        print(f"\nvarlen / loop tokens/s: {tps['varlen'] / tps['loop']:.2f}x")
    sys.exit(1 if any("error" in r for r in results["variants"].values()) else 0)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
