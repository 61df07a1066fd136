"""Packed attention: each example of a packed row attends only to itself, in one kernel per layer.

Why our own: transformers' `sdpa` path, given packed position_ids, builds a block-diagonal mask
over the whole row ([B, 1, T, T] booleans: 32 MiB at 2 x 4096) and SDPA then scores every pair of
positions in it, masked or not: a row of n examples of length l costs (n·l)² instead of n·l², and
a mask rules out SDPA's flash kernel. The implementations here compute exactly block-diagonal
causal attention from the example boundaries, which the trainer computes once per micro-batch
on the host (`Packed`: spans, cumulative lengths on the device, the longest example), so no
layer syncs with the device:

- `varlen` (CUDA): `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10), one flash-attention
  call per layer over all examples of the micro-batch;
- `flash` (CUDA): `flash_attn.flash_attn_varlen_func`, where the flash-attn package is installed;
- `loop` (any device, the CPU default): causal SDPA once per example, from a Python loop —
  exact, but one launch per example and layer, which on a GPU costs more than the work;
- `masked`: transformers' own `sdpa` with the block mask (for benchmarks and debugging).

For packed rows no mask is built at all (our mask function returns None when there is no
padding). Called without boundaries — evaluation of padded batches, probe logits, generation,
anyone calling the model directly — the function is plain `sdpa` with transformers' mask, or,
for an unpadded row, boundaries derived from its position_ids, so it is always correct. The name
is registered with transformers' attention and mask interfaces; it never reaches a saved
config.json (transformers does not serialise the attention implementation).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

NAME = "qsft_packed"
CHOICES = ("auto", "varlen", "flash", "loop", "masked")
_impl = "loop"  # the packed kernel this process uses; set by register()


@dataclass(frozen=True)
class Packed:
    """Example boundaries of a packed micro-batch, computed once on the host.

    `rows[r]` lists the [start, end) spans of row r (where its position_ids restart at 0; tail
    padding is one more span). `cu_seqlens` are the same boundaries over all rows end to end
    (int32, on the compute device), `max_len` the longest span: what varlen kernels take.
    """

    rows: list[list[tuple[int, int]]]
    cu_seqlens: torch.Tensor
    max_len: int

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, device: Any = "cpu") -> Packed:
        rows = packed_segments(position_ids)
        width = position_ids.shape[-1]
        bounds = [r * width + s for r, spans in enumerate(rows) for s, _ in spans]
        bounds.append(len(rows) * width)
        cu = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
        return cls(rows, cu, max(e - s for spans in rows for s, e in spans))


def packed_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans where position_ids restart at 0 (tail padding included).

    A row whose positions never restart is one span: plain causal attention over it.
    """
    rows = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0 or i == 0]
        rows.append(list(zip(starts, starts[1:] + [len(row)], strict=True)))
    return rows


# ---------------------------------------------------------------------------------------------
# Choosing an implementation


def available(choice: str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if `choice` can run in this process at `dtype`, else why not (one line)."""
    if choice in ("loop", "masked", "auto"):
        return None
    if not torch.cuda.is_available():
        return f"--attention {choice}: runs on CUDA GPUs only, and this rank has none"
    if dtype not in (torch.bfloat16, torch.float16):
        return (
            f"--attention {choice}: flash kernels need bf16 or fp16, the run is {dtype}; "
            f"pass --bf16 or --attention loop"
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 8:  # FlashAttention-2 kernels (torch's varlen and flash-attn): Ampere or newer
        return (
            f"--attention {choice}: flash kernels need an sm80+ GPU (A100, H100, ...); "
            f"{torch.cuda.get_device_name()} is sm{major}{minor}: use --attention loop"
        )
    if choice == "varlen" and _varlen_fn() is None:
        return (
            f"--attention varlen: this torch ({torch.__version__}) has no "
            f"torch.nn.attention.varlen.varlen_attn (torch >= 2.10)"
        )
    if choice == "flash":
        try:
            import flash_attn  # noqa: F401 - installed, and built against this torch
        except Exception as e:  # noqa: BLE001 - ImportError, or an undefined symbol (OSError)
            return f"--attention flash: flash-attn does not import ({type(e).__name__})"
    return None


def resolve(choice: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """auto -> varlen on CUDA where torch has it, else flash where installed, else loop."""
    if choice != "auto":
        return choice
    for candidate in ("varlen", "flash"):
        if available(candidate, dtype) is None:
            return candidate
    return "loop"


def _varlen_fn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def register(choice: str = "loop") -> str:
    """Make NAME a valid attn_implementation using `choice` for packed rows (idempotent).

    Returns the attn_implementation to build the model with: "sdpa" for `masked`, else NAME.
    """
    global _impl
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    choice = resolve(choice)
    if choice == "masked":
        return "sdpa"
    _impl = choice
    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, packed_mask)
    return NAME


def packed_mask(
    *,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """No mask for unpadded rows, packed or not (the attention knows the boundaries); else
    transformers' sdpa mask (padded batches, generation with a cache)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not kv_offset:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# The attention function


def packed_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed: Packed | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None) like `sdpa`."""
    if packed is None:
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        # A direct call on unpadded rows (no mask was built): boundaries from the positions,
        # once per forward (every layer gets the same position_ids tensor).
        packed = _derived(position_ids, query.shape[0], query.device)
    if _impl == "loop":
        out = _loop(query, key, value, packed, scaling, dropout)
    else:
        out = _varlen(query, key, value, packed, scaling, dropout, _impl)
    return out, None


_last_derived: tuple[Any, int, Packed] | None = None


def _derived(position_ids: torch.Tensor, rows: int, device: Any) -> Packed:
    """Boundaries from position_ids, remembered for the same tensor object (a weak reference:
    a new tensor at a reused address is not mistaken for it)."""
    global _last_derived
    last = _last_derived
    if last is None or last[0]() is not position_ids or last[1] != rows:
        packed = Packed.from_position_ids(position_ids.expand(rows, -1).cpu(), device)
        _last_derived = last = (weakref.ref(position_ids), rows, packed)
    return last[2]


def _loop(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed: Packed,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]
    rows = []
    # unbind + split, not slicing: their backward is one stack/cat, where each slice's backward
    # would write a zero-filled full-size gradient per example and layer.
    for q, k, v, spans in zip(
        query.unbind(0), key.unbind(0), value.unbind(0), packed.rows, strict=True
    ):
        lengths = [e - s for s, e in spans]
        parts = [
            F.scaled_dot_product_attention(
                qs.unsqueeze(0),
                ks.unsqueeze(0),
                vs.unsqueeze(0),
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for qs, ks, vs in zip(
                q.split(lengths, dim=1),
                k.split(lengths, dim=1),
                v.split(lengths, dim=1),
                strict=True,
            )
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous()


def _varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed: Packed,
    scaling: float | None,
    dropout: float,
    impl: str,
) -> torch.Tensor:
    """One varlen kernel over every example of the micro-batch: [B, H, T, D] -> [B, T, H, D]."""
    b, hq, t, d = query.shape
    # [B, H, T, D] -> [B·T, H, D]: the tokens of all rows end to end, as cu_seqlens counts them.
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    cu, n = packed.cu_seqlens, packed.max_len
    if impl == "flash":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(
            q, k, v, cu, cu, n, n, dropout_p=dropout, softmax_scale=scaling, causal=True
        )
    else:
        if dropout:
            raise ValueError("--attention varlen has no attention dropout; use flash or loop")
        out = varlen_call(_varlen_fn(), q, k, v, cu, n, scaling)
    return out.reshape(b, t, hq, d)


def varlen_call(
    fn: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    scale: float | None,
) -> torch.Tensor:
    """Causal varlen_attn across torch versions: 2.13 takes window_size=(-1, 0) for causal,
    scale and enable_gqa; the first releases took is_causal and neither of the others (their
    scale is 1/sqrt(head_dim), and key/value heads are repeated to the query heads' count)."""
    causal, gqa, has_scale = _varlen_params(fn)
    kwargs: dict[str, Any] = dict(causal)
    if has_scale:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6 * scale:
        raise ValueError(
            f"this torch's varlen_attn has no scale argument and the model's "
            f"attention scale {scale} is not 1/sqrt(head_dim); use --attention "
            f"flash or loop"
        )
    if q.shape[1] != k.shape[1]:
        if gqa:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


@functools.lru_cache(maxsize=4)
def _varlen_params(fn: Any) -> tuple[dict[str, Any], bool, bool]:
    params = inspect.signature(fn).parameters  # once, not per layer
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params, "scale" in params
