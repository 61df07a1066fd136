"""Benchmark: peak memory of the loss, chunked linear cross-entropy against all logits at once.

    .venv/bin/python bench/loss_memory.py [--vocab 151936] [--tokens 4096] [--hidden 1536]

One forward and backward of the loss alone — the output projection of `--tokens` loss positions
of width `--hidden` to `--vocab` logits, then summed cross-entropy — with trainer.loss's
LinearWithLoss, loss_impl "full" (the old path: every target's logits at once, fp32 CE) and
"chunked" (the new one). Each runs in its own process on the CPU in fp32, after a warm-up step
that allocates the weight's .grad; the figure is the peak of live heap memory during the step
(glibc mallinfo2, sampled every 0.2 ms: tests/scripts/activation_peak.py's method) above the
level before it, so it counts what the loss itself needs: logits, their gradient, the hidden
states' gradient and the transient weight gradient. Defaults: Qwen2.5's vocabulary and the 1.5B
model's hidden size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def child(args: argparse.Namespace) -> None:
    import torch

    from tests.scripts.activation_peak import peak_during
    from trainer.loss import LinearWithLoss

    torch.set_num_threads(2)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    head.__class__ = LinearWithLoss  # what trainer.loss.install does to the model's head
    head.loss_impl = args.method

    def step(tokens: int) -> float:
        hidden = (torch.randn(tokens, args.hidden) * 0.5).requires_grad_()
        targets = torch.randint(0, args.vocab, (tokens,))
        t0 = time.perf_counter()
        head(hidden, targets=targets).backward()
        return time.perf_counter() - t0

    step(8)  # warm-up: the weight's .grad exists from here on
    peak, seconds = peak_during(lambda: step(args.tokens))
    print(json.dumps({"method": args.method, "peak_bytes": peak, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--method", choices=("full", "chunked"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        child(args)
        return
    from trainer.loss import chunk_rows_for

    rows = {}
    for method in ("full", "chunked"):
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--method",
                method,
                "--vocab",
                str(args.vocab),
                "--tokens",
                str(args.tokens),
                "--hidden",
                str(args.hidden),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
        )
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        rows[method] = json.loads(res.stdout.strip().splitlines()[-1])
    print(
        f"\nvocab {args.vocab}, {args.tokens} loss tokens, hidden {args.hidden}, fp32, CPU; "
        f"chunked: {chunk_rows_for(args.vocab)} rows per chunk\n"
    )
    print("| loss | peak memory of forward + backward | time (s) |")
    print("|---|---:|---:|")
    for method, r in rows.items():
        print(f"| {method} | {r['peak_bytes'] / 2**20:,.0f} MiB | {r['seconds']:.1f} |")
    ratio = rows["full"]["peak_bytes"] / rows["chunked"]["peak_bytes"]
    print(f"\nfull / chunked peak memory: {ratio:.1f}x")


if __name__ == "__main__":
    main()
