"""Model FLOPs utilisation: model FLOPs per token from the config, and the device's peak rate.

FLOPs per trained token = 6·N + 6·L·d·ℓ, where N counts the parameters that take part in matrix
multiplies (everything but the input embedding lookup; the output projection counts even when
tied to it), L is the number of layers, d the hidden size and ℓ the mean example length: a
causal, block-diagonal attention scores and mixes on average ℓ/2 earlier positions per token, at
2·2·d FLOPs each forward and twice that backward (PaLM's accounting, halved for causality).
The output projection (vocab × d) counts only for the share of tokens that are loss positions:
the trainer computes logits nowhere else (trainer/loss.summed_loss), so counting it for prompt
tokens would credit work never done. Recomputation (gradient checkpointing) is not counted
either: MFU measures useful work.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def flops_per_token(
    config: Any, num_params: int, mean_example_len: float, target_fraction: float = 1.0
) -> float:
    embed = config.vocab_size * config.hidden_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    body = num_params - embed if tied else num_params - 2 * embed  # decoder layers + final norm
    attention = 6 * config.num_hidden_layers * config.hidden_size * mean_example_len
    return 6 * body + 6 * embed * target_fraction + attention


def device_peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the figure comes from.

    GPU: the datasheet bf16 figure for known cards, else a measured matmul rate. CPU: a
    measured fp32 matmul rate with this process's threads (the honest peak for this rank).
    """
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{key} datasheet bf16"
        return _measure(torch.device("cuda"), dtype), f"measured {name}"
    return _measure(torch.device("cpu"), torch.float32), "measured CPU fp32 matmul"


def _measure(
    device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3
) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)
