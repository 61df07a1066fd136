"""ZeRO-3 checkpoint -> consolidated Hugging Face directory, streamed in bounded memory.

    qsft-consolidate CHECKPOINTS_ROOT_OR_TAG_DIR [--tag checkpoint-N] [--out DIR]
        [--dtype bf16|fp16|fp32] [--max_shard_size 5GB] [--verify]
    (or python -m trainer.offline.consolidate ...)

Offline, on one machine, no GPU and no process group: it reads the ZeRO shard files alone.
Parameters are gathered one at a time (trainer.offline.zero_reader) and each is written straight
into its safetensors file, whose header is written first from the known shapes, so peak memory is
about the largest single parameter whatever the model or shard size. The directory is built in a
temporary sibling and renamed into place: readers never see a partial directory, and a failure
leaves nothing behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer import versions
from trainer.checkpoint.layout import (
    COMPLETE,
    EVAL_FILE,
    FORMAT_FILE,
    HF_SUBDIR,
    PROBE_FILE,
    sha256_file,
    verify_files,
)
from trainer.config import ConfigError, parse_size
from trainer.offline.zero_reader import CheckpointError, ZeroCheckpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class ConsolidateError(ValueError):
    """Bad input for consolidation; a one-line message naming the file."""


def resolve_tag_dir(path: Path, tag: str | None, allow_incomplete: bool = False) -> Path:
    """A tag dir as given, or ROOT/--tag, or ROOT/<latest>; it must carry the trainer's COMPLETE
    marker, and every file the marker lists must have its recorded size, unless
    `allow_incomplete` (e.g. a checkpoint written by another DeepSpeed program)."""
    path = Path(path)
    if tag is not None:
        path = path / tag
    elif (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
        raise ConsolidateError(
            f"{path}: no ZeRO checkpoint here (expected zero_pp_rank_0_mp_rank_00_model_states.pt)"
        )
    if allow_incomplete:
        return path
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        raise ConsolidateError(
            f"{path}: no {COMPLETE} marker: the save was interrupted, so "
            f"the shards may be partial; pass --allow_incomplete to "
            f"consolidate it anyway"
        ) from None
    problem = verify_files(path, marker)
    if problem:
        raise ConsolidateError(f"damaged checkpoint: {problem}")
    return path


def output_names(ckpt: ZeroCheckpoint, tied: bool) -> list[tuple[str, str | None]]:
    """(output name, source parameter) pairs in checkpoint order, plus buffers (source None).

    A tied config stores only the embedding (from_pretrained re-ties lm_head); an untied one
    gets every parameter, including one that the checkpoint shares with another.
    """
    names = [(n, n) for n in ckpt.param_shapes]
    for alias, source in ckpt.shared_params.items():
        if alias not in ckpt.param_shapes and not (tied and alias == "lm_head.weight"):
            names.append((alias, source))
    if tied:
        names = [(n, s) for n, s in names if n != "lm_head.weight"]
    return names + [(n, None) for n in ckpt.buffers]


def consolidate(
    tag_dir: Path,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 * 10**9,
    hf_dir: Path | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Write the consolidated directory for one checkpoint tag; returns the manifest."""
    out_dir, tag_dir = Path(out_dir), Path(tag_dir)
    if out_dir.exists():
        raise ConsolidateError(f"{out_dir}: already exists; remove it or choose another --out")
    hf_dir = Path(hf_dir) if hf_dir else tag_dir / HF_SUBDIR
    if not (hf_dir / "config.json").is_file():
        raise ConsolidateError(
            f"{hf_dir}: no config.json; pass --hf_dir with the model's config and tokenizer"
        )
    try:
        ckpt = ZeroCheckpoint(tag_dir)
    except CheckpointError as e:
        raise ConsolidateError(str(e)) from None
    dtype = dtype or ckpt.train_dtype
    config = json.loads((hf_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        entries = output_names(ckpt, tied)
        hashes: dict[str, str] = {}
        weight_files = _write_weights(ckpt, entries, dtype, max_shard_size, tmp, hashes)
        for f in sorted(hf_dir.iterdir()):
            if f.is_file() and f.name not in ("config.json", PROBE_FILE, FORMAT_FILE, EVAL_FILE):
                shutil.copy2(f, tmp / f.name)
        config.pop("torch_dtype", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
        config["use_cache"] = True
        if not config.get("architectures"):  # a checkpoint saved before qsft recorded it
            config["architectures"] = [_causal_lm_class(config)]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        num_params = sum(
            ckpt.param_shapes[s].numel() for n, s in entries if s is not None and n == s
        )
        fmt_file = hf_dir / FORMAT_FILE
        training_format = json.loads(fmt_file.read_text()) if fmt_file.is_file() else {}
        eval_file = hf_dir / EVAL_FILE
        if eval_file.is_file():  # this step's eval loss and the run's best step up to it
            training_format["eval"] = json.loads(eval_file.read_text())
        manifest = dict(
            source_tag=tag_dir.name,
            source_step=ckpt.step,
            dtype=str(dtype).removeprefix("torch."),
            num_parameters=num_params,
            tied_embeddings=tied,
            architecture=config["architectures"][0],
            **training_format,
            weight_files=weight_files,
            files={
                p.name: {"sha256": hashes.get(p.name) or sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir())
            },
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            seconds=round(time.perf_counter() - t0, 2),
            versions=versions(),
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if verify:
            verify_dir(tmp, ckpt, entries, dtype, tag_dir / HF_SUBDIR / PROBE_FILE)
        os.replace(tmp, out_dir)  # atomic publication: the whole directory or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.close()
    return manifest


def _causal_lm_class(config: dict[str, Any]) -> str:
    """The class AutoModelForCausalLM builds for this config (what the trainer trains)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if name is None:
        raise ConsolidateError(
            f"config.json: model_type {config.get('model_type')!r} has no "
            f"causal-LM class in transformers; add 'architectures'"
        )
    return name


def _write_weights(
    ckpt: ZeroCheckpoint,
    entries: list[tuple[str, str | None]],
    dtype: torch.dtype,
    max_shard_size: int,
    out: Path,
    hashes: dict[str, str],
) -> list[str]:
    """Stream tensors into safetensors files of at most max_shard_size bytes each; the sha256
    of each file goes into `hashes`."""
    itemsize = torch.empty((), dtype=dtype).element_size()

    def nbytes(entry: tuple[str, str | None]) -> int:
        name, source = entry
        shape = ckpt.buffers[name].shape if source is None else ckpt.param_shapes[source]
        return shape.numel() * itemsize

    shards: list[list[tuple[str, str | None]]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + nbytes(entry) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes(entry)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        hashes[name] = _write_safetensors(out / name, shard, ckpt, dtype)
        weight_map.update({n: name for n, _ in shard})
    if len(shards) > 1:
        total = sum(nbytes(e) for e in entries)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            + "\n"
        )
    return names


def _write_safetensors(
    path: Path, entries: list[tuple[str, str | None]], ckpt: ZeroCheckpoint, dtype: torch.dtype
) -> str:
    """Write one safetensors file; returns its sha256, hashed as the bytes go out.

    safetensors = 8-byte header length, JSON header, raw data. The header needs only the
    shapes, so it goes first, and each parameter follows in chunks straight from the shards:
    no tensor is ever whole in memory.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, source in entries:
        shape = list(ckpt.buffers[name].shape if source is None else ckpt.param_shapes[source])
        end = offset + int(torch.Size(shape).numel()) * itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:

        def put(data: bytes | memoryview) -> None:
            f.write(data)
            digest.update(data)

        put(struct.pack("<Q", len(blob)))
        put(blob)
        for name, source in entries:
            chunks = [ckpt.buffers[name].flatten()] if source is None else ckpt.iter_chunks(source)
            for chunk in chunks:
                put(memoryview(chunk.to(dtype).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())  # durable before the directory is renamed into place
    return digest.hexdigest()


def verify_dir(
    out: Path,
    ckpt: ZeroCheckpoint,
    entries: list[tuple[str, str | None]],
    dtype: torch.dtype,
    probe_file: Path,
) -> None:
    """Reload with from_pretrained; every tensor must equal the shards' value in `dtype`, and the
    logits on the probe batch must match what the live engine computed when it saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    state = model.state_dict()
    for name, source in entries:
        want = ckpt.buffers[name] if source is None else ckpt.gather(source)
        if not torch.equal(state[name], want.to(dtype)):
            raise ConsolidateError(f"{out}: {name} differs from the checkpoint after reload")
    if not probe_file.is_file():
        return
    probe = torch.load(probe_file, weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    lse, head = torch.logsumexp(logits, dim=-1), logits[..., : probe["head"].shape[-1]]
    # Same weights, maybe other kernels: exact in fp32, bounded by the coarser precision else.
    coarse = dtype != torch.float32 or probe["dtype"] != "float32"
    tol = 5e-2 if coarse else 1e-4
    for got, ref, what in ((lse, probe["lse"], "log-normaliser"), (head, probe["head"], "logits")):
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        if not err <= tol:
            raise ConsolidateError(
                f"{out}: {what} on the probe batch differ from the live "
                f"engine's by {err:.2e} (relative; tolerance {tol:.0e})"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qsft-consolidate", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="checkpoints root (uses `latest`) or a tag directory")
    p.add_argument("--tag", help="tag under the root, e.g. checkpoint-100")
    p.add_argument("--out", type=Path, help="output dir (default TAG_DIR/consolidated)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the training dtype")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors file")
    p.add_argument("--hf_dir", type=Path, help="config + tokenizer dir (default TAG_DIR/hf)")
    p.add_argument("--verify", action="store_true", help="reload and check every tensor")
    p.add_argument(
        "--allow_incomplete",
        action="store_true",
        help="consolidate a tag without the trainer's COMPLETE marker",
    )
    args = p.parse_args(argv)
    try:
        tag_dir = resolve_tag_dir(args.path, args.tag, args.allow_incomplete)
        out = args.out or tag_dir / "consolidated"
        manifest = consolidate(
            tag_dir,
            out,
            DTYPES.get(args.dtype),
            parse_size(args.max_shard_size, "--max_shard_size"),
            args.hf_dir,
            args.verify,
        )
    except (ConsolidateError, ConfigError) as e:
        print(f"consolidate: error: {e}", file=sys.stderr)
        return 2
    print(
        f"consolidated {tag_dir} -> {out} ({manifest['dtype']}, "
        f"{manifest['num_parameters'] / 1e6:.1f}M parameters, "
        f"{len(manifest['weight_files'])} weight file(s), {manifest['seconds']:.1f}s"
        f"{', verified' if args.verify else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
