"""Sharded ZeRO-3 engine -> a consolidated Hugging Face directory for the RL stage.

This is the in-loop path: the 16-bit (training dtype) weights are gathered with DeepSpeed's
`_zero3_consolidated_16bit_state_dict` (a collective, so every rank calls it), rank 0 writes them
with `save_pretrained` into a temporary sibling directory, adds the tokenizer, generation config
and a manifest with a sha256 per file, and renames it into place, so a reader never sees a
half-written directory. Rank 0 holds the whole model in RAM while writing; a streaming offline
converter is separate work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from trainer import dist, versions


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def export_consolidated(engine: Any, tokenizer: Any, out_dir: Path, step: int,
                        num_params: int) -> Path:
    """Write out_dir atomically from the live engine; all ranks must call this."""
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0
    if dist.is_main():
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        module = engine.module
        # Before save_pretrained, which empties the dict as it writes shards (transformers 5.x).
        dtype = next(iter(state_dict.values())).dtype
        # save_pretrained with an explicit state_dict writes exactly these tensors; for a tied
        # config it drops lm_head.weight, which from_pretrained re-ties from embed_tokens.
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if module.generation_config is not None:
            module.generation_config.save_pretrained(tmp)
        write_manifest(tmp, step=step, dtype=str(dtype).removeprefix("torch."),
                       num_params=num_params)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    dist.barrier()
    return Path(out_dir)


def write_manifest(directory: Path, step: int, dtype: str, num_params: int) -> None:
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(Path(directory).iterdir()) if p.is_file()}
    manifest = {"source_step": step, "source_tag": f"checkpoint-{step}", "dtype": dtype,
                "num_parameters": num_params, "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": versions()}
    (Path(directory) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
