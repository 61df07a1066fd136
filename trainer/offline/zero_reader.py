"""Read a ZeRO-3 checkpoint tag directory lazily, one parameter at a time, in bounded memory.

Why our own reader: `torch.load(mmap=True)` (what DeepSpeed's zero_to_fp32 uses) maps each shard
file, and every page it touches stays resident in the process, so peak RSS grows to the size of
the fp32 weights however the output is written. Here the shard files (torch's zip format, stored
uncompressed) are memory-mapped by us, the pickle is read with tensors replaced by descriptors,
each slice is copied out when needed and its pages are released right away (madvise DONTNEED).

The reconstruction of a parameter from its per-rank partitions follows DeepSpeed 0.19's
`zero_to_fp32._zero3_merge_trainable_params` exactly (same offsets, same padding), so values are
bit-identical to `get_fp32_state_dict_from_zero_checkpoint`.
"""

from __future__ import annotations

import io
import math
import mmap
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A missing, truncated, corrupt or inconsistent checkpoint; names the file."""


@dataclass(frozen=True)
class LazyStorage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    storage: LazyStorage
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _rebuild_lazy(storage: LazyStorage, offset: int, size: Any, stride: Any, *_: Any) -> LazyTensor:
    return LazyTensor(storage, int(offset), tuple(int(s) for s in size))


class TorchZipFile:
    """A file written by torch.save (zip format), memory-mapped, its tensors read on demand."""

    _LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            archive = zipfile.ZipFile(self._file)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (zipfile.BadZipFile, ValueError, OSError) as e:
            raise CheckpointError(
                f"{self.path}: not a readable checkpoint shard, corrupt or "
                f"truncated ({type(e).__name__})"
            ) from None
        self._data_offsets: dict[str, int] = {}
        pickle_name = None
        for info in archive.infolist():
            parts = info.filename.split("/")
            if parts[-1] == "data.pkl":
                pickle_name = info.filename
            elif len(parts) >= 2 and parts[-2] == "data":
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{self.path}: compressed tensor data is not supported")
                start = self._data_start(info)
                if start + info.file_size > len(self._map):
                    raise CheckpointError(
                        f"{self.path}: truncated (tensor data runs past the end of the file)"
                    )
                self._data_offsets[parts[-1]] = start
        if pickle_name is None:
            raise CheckpointError(f"{self.path}: no data.pkl; not a torch checkpoint")
        try:
            self.obj = _LazyUnpickler(io.BytesIO(archive.read(pickle_name))).load()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise CheckpointError(f"{self.path}: corrupt pickle ({type(e).__name__})") from None

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        head = self._map[info.header_offset : info.header_offset + self._LOCAL_HEADER.size]
        if len(head) < self._LOCAL_HEADER.size:
            raise CheckpointError(f"{self.path}: truncated zip header")
        fields = self._LOCAL_HEADER.unpack(head)
        if fields[0] != 0x04034B50:
            raise CheckpointError(f"{self.path}: corrupt zip entry {info.filename}")
        name_len, extra_len = fields[9], fields[10]
        return info.header_offset + self._LOCAL_HEADER.size + name_len + extra_len

    def read(self, t: LazyTensor, start: int, stop: int) -> torch.Tensor:
        """Copy elements [start, stop) of a flat lazy tensor out of the map, then release them."""
        itemsize = torch.empty((), dtype=t.storage.dtype).element_size()
        begin = self._data_offsets[t.storage.key] + (t.offset + start) * itemsize
        nbytes = (stop - start) * itemsize
        if begin + nbytes > len(self._map):
            raise CheckpointError(f"{self.path}: truncated")
        with warnings.catch_warnings():  # the map is read-only; we clone before anyone writes
            warnings.simplefilter("ignore", UserWarning)
            out = torch.frombuffer(
                self._map, dtype=t.storage.dtype, count=stop - start, offset=begin
            ).clone()
        self._release(begin, nbytes)
        return out

    def read_all(self, t: LazyTensor) -> torch.Tensor:
        return self.read(t, 0, t.numel).view(t.shape)

    def _release(self, begin: int, nbytes: int) -> None:
        # Drop the pages we just copied from this process's resident set; the page cache keeps
        # them, so a second read is still fast.
        page = mmap.PAGESIZE
        lo, hi = (begin // page) * page, min(len(self._map), -(-(begin + nbytes) // page) * page)
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self._map.close()
        self._file.close()


class _Opaque:
    """Stands in for any non-torch object in a checkpoint pickle; keeps its state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:  # for reduce-style constructors
        return _Opaque(*args)


class _LazyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] not in ("torch", "collections", "builtins", "numpy", "_codecs"):
            # DeepSpeed's loss scaler and config objects: not needed for the weights, and
            # importing deepspeed to rebuild them costs seconds.
            return _Opaque
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_lazy
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *_: data  # a Parameter is its data here
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda func, _type, args, _state: func(*args)  # drop the subclass
        if module == "torch._utils" and name.startswith("_rebuild"):
            raise pickle.UnpicklingError(f"unsupported tensor kind {name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> LazyStorage:
        _, storage_type, key, _location, numel = pid
        with warnings.catch_warnings():  # legacy typed-storage classes warn on .dtype
            warnings.simplefilter("ignore", UserWarning)
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        return LazyStorage(str(key), dtype, int(numel))


def _rank_of(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


class ZeroCheckpoint:
    """A ZeRO-3 tag directory: metadata from rank 0's model states, fp32 flat groups per rank."""

    def __init__(self, tag_dir: Path):
        self.tag_dir = Path(tag_dir)
        if not self.tag_dir.is_dir():
            raise CheckpointError(f"{self.tag_dir}: not a directory")
        model_file = self.tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        meta = TorchZipFile(model_file)
        state = meta.obj
        if not isinstance(state, dict) or "param_shapes" not in state:
            raise CheckpointError(f"{model_file}: not a ZeRO-3 model states file")
        if state.get("frozen_param_shapes"):
            raise CheckpointError(f"{model_file}: frozen parameters are not supported")
        self.world_size = int(state.get("dp_world_size", 0))
        self.param_shapes: dict[str, torch.Size] = {
            name: torch.Size(shape)
            for group in state["param_shapes"]
            for name, shape in group.items()
        }
        self.shared_params: dict[str, str] = dict(state.get("shared_params", {}))
        self.ds_config: dict[str, Any] = state.get("ds_config") or {}
        trainer_state = state.get("qsft_trainer_state") or {}
        self.step = int(trainer_state.get("step", state.get("global_steps", 0)))
        self.buffers = {n: meta.read_all(state["module"][n]) for n in state.get("buffer_names", [])}
        meta.close()

        files = sorted(self.tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
        expected = [
            self.tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
            for r in range(self.world_size)
        ]
        for path in expected:
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: missing (the checkpoint was written by {self.world_size} ranks)"
                )
        if len(files) != self.world_size:
            raise CheckpointError(
                f"{self.tag_dir}: {len(files)} optimizer shards but the "
                f"metadata says {self.world_size} ranks"
            )
        self.shards = [TorchZipFile(p) for p in expected]
        self.flat_groups: list[list[LazyTensor]] = []
        for shard in self.shards:
            osd = shard.obj.get("optimizer_state_dict", {}) if isinstance(shard.obj, dict) else {}
            # ZeRO-3 shards hold "fp32_flat_groups" (stages 1/2 another key). zero_stage itself is
            # a DeepSpeed enum, pickled differently by different Python patch releases.
            if "fp32_flat_groups" not in osd:
                raise CheckpointError(f"{shard.path}: not a ZeRO-3 optimizer shard")
            if osd.get("partition_count") != self.world_size:
                raise CheckpointError(
                    f"{shard.path}: written by {osd.get('partition_count')} "
                    f"ranks but the metadata says {self.world_size}"
                )
            self.flat_groups.append(list(osd["fp32_flat_groups"]))
        self._layout()

    def _layout(self) -> None:
        sizes = [[g.numel for g in groups] for groups in self.flat_groups]
        for shard, size in zip(self.shards, sizes, strict=True):
            if size != sizes[0]:
                raise CheckpointError(
                    f"{shard.path}: holds partitions of {sum(size)} elements, "
                    f"rank 0 of {sum(sizes[0])}; the shards do not belong to "
                    f"this metadata"
                )
        self.group_starts = [0]
        for n in sizes[0]:
            self.group_starts.append(self.group_starts[-1] + n)
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape in self.param_shapes.items():
            part = math.ceil(shape.numel() / self.world_size)  # each rank's share, padded
            self.offsets[name] = (offset, part)
            offset += part
        if offset != self.group_starts[-1]:
            raise CheckpointError(
                f"{self.tag_dir}: partitions hold {self.group_starts[-1]} "
                f"elements per rank, the parameters need {offset}; the shards "
                f"do not belong to this metadata"
            )

    @property
    def train_dtype(self) -> torch.dtype:
        if (self.ds_config.get("bf16") or {}).get("enabled"):
            return torch.bfloat16
        if (self.ds_config.get("fp16") or {}).get("enabled"):
            return torch.float16
        return torch.float32

    def gather(self, name: str) -> torch.Tensor:
        """The full fp32 value of one parameter (for verification; the writer streams)."""
        shape = self.param_shapes[name]
        full = torch.empty(shape.numel(), dtype=self.flat_groups[0][0].storage.dtype)
        pos = 0
        for chunk in self.iter_chunks(name):
            full[pos : pos + chunk.numel()] = chunk
            pos += chunk.numel()
        return full.view(shape)

    def iter_chunks(self, name: str, max_elems: int = 1 << 24) -> Any:
        """Yield the fp32 values of one parameter in order, at most max_elems at a time.

        The flattened parameter is rank 0's partition, then rank 1's, ... cut at numel (the
        last rank's padding dropped), so it can be written out without ever being whole.
        """
        offset, part = self.offsets[name]
        remaining = self.param_shapes[name].numel()
        for shard, groups in zip(self.shards, self.flat_groups, strict=True):
            for g, flat in enumerate(groups):
                lo = max(offset, self.group_starts[g])
                hi = min(offset + part, self.group_starts[g + 1])
                base = self.group_starts[g]
                while lo < hi and remaining > 0:
                    n = min(hi - lo, max_elems, remaining)
                    yield shard.read(flat, lo - base, lo - base + n)
                    lo += n
                    remaining -= n

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
