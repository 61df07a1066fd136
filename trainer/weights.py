"""Base weights: the files checked against the model before loading, the load checked after.

Why our own checks: under ZeRO-3, transformers 5.24 loads through
`integrations.deepspeed._load_state_dict_into_zero3_model`, which reports no unexpected and no
mis-shaped keys at all (its own comment: "we assume only best-case scenario"), and a parameter
missing from the files is initialised at random with a log line. A run would then fine-tune a
partly random model for hours and hand it to RL. So:

- before anything is loaded, every rank reads the weight files' headers (the index of a sharded
  release, each safetensors header; no tensor data) and compares names and shapes with a
  meta-device model built from config.json: missing, unexpected or mis-shaped keys stop the run
  (exit 2, one line naming them);
- after loading, every rank compares its own ZeRO-3 partition of every parameter with the same
  elements read from the files (`verify_loaded`): a parameter left at its initial value, or
  loaded from the wrong tensor, fails the run. Each rank reads 1/world of the weights, so the
  ranks together read the model once, in parallel, against the load's one full read on rank 0.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError

# The order in which transformers 5.x looks for weights in a local directory
# (modeling_utils._get_resolved_checkpoint_files): single safetensors, sharded safetensors,
# single pickle, sharded pickle.
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "I8": torch.int8,
    "BOOL": torch.bool,
}
_CHUNK = 1 << 24  # elements read at a time by the load check


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of the base model lives on disk."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None = None  # safetensors: absolute byte offset of the data; None for pickles

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def weight_files(model_dir: Path) -> list[Path]:
    """The files transformers would load from model_dir; [] when it has no weights."""
    model_dir = Path(model_dir)
    for name in WEIGHT_NAMES:
        path = model_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}: not a weight index (no 'weight_map')") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ConfigError(f"{f}: missing (named by {path.name})")
        return files
    return []


def read_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor in the weight files, from headers only."""
    out: dict[str, TensorInfo] = {}
    files = weight_files(model_dir)
    for f in files:
        tensors = _safetensors_header(f) if f.suffix == ".safetensors" else _pickle_header(f)
        for name, info in tensors.items():
            if name in out:
                raise ConfigError(f"{f}: tensor {name} is also in {out[name].file.name}")
            out[name] = info
    index = Path(model_dir) / "model.safetensors.index.json"
    if len(files) > 1 and index.is_file():  # the index must describe the shards it names
        for name, file in json.loads(index.read_text())["weight_map"].items():
            if name not in out or out[name].file.name != file:
                raise ConfigError(f"{index}: says {name} is in {file}, but it is not there")
    return out


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    # safetensors: 8-byte little-endian header length, JSON header, then the raw data.
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError("header length")
            header = json.loads(f.read(length))
        size = path.stat().st_size
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(meta["dtype"])
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(x) for x in meta["shape"])
            if dtype is None:
                raise ConfigError(f"{path}: {name} has unsupported dtype {meta['dtype']}")
            if 8 + length + end > size:
                raise ConfigError(f"{path}: truncated ({name} runs past the end of the file)")
            out[name] = TensorInfo(name, path, shape, dtype, 8 + length + begin)
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    return out


@functools.lru_cache(maxsize=4)
def _mapped_pickle(path: Path) -> dict[str, torch.Tensor]:
    # Memory-mapped: shapes without reading the data, and only the pages touched are read.
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise ConfigError(f"{path}: not a readable weight file ({type(e).__name__})") from None


def _pickle_header(path: Path) -> dict[str, TensorInfo]:
    return {
        k: TensorInfo(k, path, tuple(v.shape), v.dtype) for k, v in _mapped_pickle(path).items()
    }


def signature(model_dir: Path) -> str:
    """The weight files and their sizes, for the ranks to agree on (empty: no weights)."""
    try:
        return ", ".join(f"{f.name}:{f.stat().st_size}" for f in weight_files(model_dir))
    except ConfigError as e:
        return str(e)


def expected_tensors(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every tensor the model loads, names the files may omit).

    From a meta-device model built from config.json (no memory; 0.06 s for 32B). A tied output
    projection is the embedding: releases of tied models omit `lm_head.weight`. File keys are
    compared as they are: Qwen2 has no checkpoint key conversions in transformers 5.24
    (conversion_mapping.py), unlike some other architectures, which this check would reject.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return shapes, optional


def check_files(model_dir: Path) -> dict[str, TensorInfo]:
    """Raise ConfigError (one line) unless the files hold exactly the model's tensors."""
    index = read_index(model_dir)
    shapes, optional = expected_tensors(model_dir)
    missing = sorted(set(shapes) - set(index) - optional)
    unexpected = sorted(set(index) - set(shapes))
    wrong = sorted(k for k in set(index) & set(shapes) if index[k].shape != shapes[k])
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if wrong:
        k = wrong[0]
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        problems.append(
            f"shape of {k} is {list(index[k].shape)} in {index[k].file.name}, "
            f"config.json needs {list(shapes[k])}{more}"
        )
    if problems:
        raise ConfigError(
            f"--base_model {model_dir}: the weights do not match config.json: "
            + "; ".join(problems)
        )
    return index


def _some(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def read_flat(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor, read straight from its file."""
    if info.offset is None:  # a pickle
        return _mapped_pickle(info.file)[info.name].flatten()[start:stop].clone()
    itemsize = torch.empty((), dtype=info.dtype).element_size()
    with open(info.file, "rb") as f:
        f.seek(info.offset + start * itemsize)
        data = f.read((stop - start) * itemsize)
    return torch.frombuffer(bytearray(data), dtype=info.dtype)


@dataclass
class LoadCheck:
    """What verify_loaded compared on this rank."""

    tensors: int = 0
    elements: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    skipped: int = 0  # partitions on NVMe, not in memory to compare
    error: str | None = None


def verify_loaded(
    model: Any, index: dict[str, TensorInfo], model_dir: Path, rank: int | None = None
) -> LoadCheck:
    """Compare this rank's share of every parameter with the files, exactly.

    Under ZeRO-3 a parameter's partition on rank r (`ds_tensor`) holds elements
    [r * part, (r + 1) * part) of the flattened parameter, the last rank's padded past
    `ds_numel`; without ZeRO-3 the whole parameter is compared. The file's values are cast to
    the parameter's dtype first, as from_pretrained does when it copies them in, so a correct
    load is bit-identical. Run on every rank (no collective); gather the outcome. `rank`
    overrides the partition rank (tests); by default it is this rank's in the parameter's group.
    """
    import torch.distributed as tdist

    t0 = time.perf_counter()
    out, bad = LoadCheck(), []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or name not in index:  # a tied lm_head is the embedding
            continue
        seen.add(id(p))
        info = index[name]
        part = getattr(p, "ds_tensor", None)
        if part is None:
            got, start, stop = p.detach().flatten(), 0, p.numel()
        else:
            if getattr(part, "final_location", None) is not None:  # swapped out to NVMe
                out.skipped += 1
                continue
            r = rank
            if r is None:
                group = getattr(p, "ds_process_group", None)
                r = tdist.get_rank(group=group) if tdist.is_initialized() else 0
            start = r * part.numel()
            stop = min(start + part.numel(), p.ds_numel)
            got = part.detach()[: max(0, stop - start)]
        for lo in range(start, stop, _CHUNK):
            hi = min(lo + _CHUNK, stop)
            want = read_flat(info, lo, hi)
            out.bytes_read += want.numel() * want.element_size()
            mine = got[lo - start : hi - start].cpu()
            if not torch.equal(mine, want.to(mine.dtype)):
                diff = (mine.float() - want.float()).abs().max().item()
                bad.append((name, diff))
                break
        out.tensors += 1
        out.elements += max(0, stop - start)
    out.seconds = time.perf_counter() - t0
    if bad:
        name, diff = bad[0]
        more = f" and {len(bad) - 1} more differ" if len(bad) > 1 else " differs"
        out.error = (
            f"--base_model {model_dir}: after loading, {name}{more} from the "
            f"weight files (max abs diff {diff:.3g}): the load left parameters at "
            f"their initial values or mixed them up; nothing was trained"
        )
    return out


def corrupt_for_test(model: Any) -> None:
    """Change this rank's share of one parameter (fault injection for the load-check test)."""
    p = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    target = getattr(p, "ds_tensor", None)
    with torch.no_grad():
        (p.data if target is None else target).view(-1)[:3] = 0.5
