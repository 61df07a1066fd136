"""Peak memory of one forward+backward of the tiny model on CPU, for the planner's formula.

    python tests/scripts/activation_peak.py BATCH SEQ [gc] [vocab=N]  ->  JSON on stdout

(vocab=N: the tiny model with a larger vocabulary, so that the loss spans several chunks.)

Measures the peak of live heap memory: glibc's mallinfo2() (bytes in allocated chunks plus
mmapped blocks) sampled every 0.2 ms by a thread while the step runs (torch releases the GIL in
its kernels), minus the level before it. The model, its gradients and a small warm-up step are
allocated first, so the figure is what the step itself needed: activations, logits, backward
buffers. Live bytes rather than the resident set: RSS also holds the allocator's fragmentation,
which on CPU glibc inflates a checkpointed step (many alloc/free cycles) by 50-100% and is not
what a GPU caching allocator would do; RSS growth is reported too, for reference. Every token is
a loss target, as the planner assumes by default. Its own process: nothing else allocates.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def live() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_during(fn):
    """Run fn() while a thread samples live() every 0.2 ms (torch releases the GIL in its
    kernels); returns (peak live bytes above the level just before, fn's result)."""
    gc.collect()
    base = peak = live()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, live())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return max(peak, live()) - base, result


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer import attention
    from trainer.config import ASSETS_DIR
    from trainer.loss import summed_loss

    b, s, checkpointing = int(sys.argv[1]), int(sys.argv[2]), "gc" in sys.argv[3:]
    vocab = next((int(a.split("=")[1]) for a in sys.argv[3:] if a.startswith("vocab=")), None)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ASSETS_DIR / "tiny_model")
    if vocab:
        config.vocab_size = vocab
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=attention.register()
    ).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def batch(rows: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, config.vocab_size, (rows, length))
        pos = torch.arange(length).expand(rows, length).contiguous()
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}

    summed_loss(model, batch(1, 32), "cpu").backward()  # warm-up: gradients now allocated
    big = batch(b, s)
    gc.collect()
    base_rss = max(rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    step_peak, _ = peak_during(lambda: summed_loss(model, big, "cpu").backward())
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    print(
        json.dumps(
            {
                "batch": b,
                "seq": s,
                "gc": checkpointing,
                "step_peak_bytes": step_peak,
                "rss_growth_bytes": rss_growth,
            }
        )
    )


if __name__ == "__main__":
    main()
