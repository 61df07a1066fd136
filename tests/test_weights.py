"""Base weights: the files are checked against config.json before loading, the load after."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, run_env, sharded_model
from trainer.config import ConfigError
from trainer.weights import check_files, read_index, verify_loaded


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return sharded_model(tmp_path_factory.mktemp("w") / "base")


def _edit_shard(model_dir, edit):
    """Apply edit(dict of tensors) to the shard holding the embedding; keep the index true."""
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = index["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(model_dir / name)
    edit(tensors)
    save_file(tensors, model_dir / name, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
    index["weight_map"].update({k: name for k in tensors})
    index_path.write_text(json.dumps(index))


def _copy(base, tmp_path):
    import shutil

    return shutil.copytree(base, tmp_path / "m")


def test_complete_release_passes_and_indexes_every_tensor(base):
    index = check_files(base)
    assert "model.embed_tokens.weight" in index and "lm_head.weight" not in index  # tied
    assert len({i.file for i in index.values()}) == 3


@pytest.mark.parametrize("kind", ["missing", "unexpected", "mis-shaped", "missing shard"])
def test_mismatched_weights_are_one_line_naming_them(base, tmp_path, kind):
    m = _copy(base, tmp_path)
    if kind == "missing":
        _edit_shard(m, lambda t: t.pop("model.embed_tokens.weight"))
        expected = "missing model.embed_tokens.weight"
    elif kind == "unexpected":
        _edit_shard(m, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(3)}))
        expected = "unexpected model.layers.0.extra.weight"
    elif kind == "mis-shaped":
        config = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**config, "vocab_size": 4000}))
        expected = "shape of model.embed_tokens.weight is [3514, 256] in model-0000"
    else:
        next(m.glob("model-00002-*.safetensors")).unlink()
        expected = "model-00002-of-00003.safetensors: missing (named by model.safetensors.index"
    with pytest.raises(ConfigError) as e:
        check_files(m)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_train_exits_2_naming_the_keys_before_loading(base, tmp_path):
    m = _copy(base, tmp_path)
    _edit_shard(m, lambda t: t.pop("model.embed_tokens.weight"))
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--model_size",
            "tiny",
            "--base_model",
            str(m),
            "--output_dir",
            str(out),
        ],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("qsft: error:")]
    assert len(errors) == 1 and "missing model.embed_tokens.weight" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def _zero3_like(model, rank: int, world: int) -> None:
    """Give every parameter the ZeRO-3 partition of `rank` (DeepSpeed's layout: equal padded
    slices of the flattened parameter) and drop its full data, as DeepSpeed does."""
    for p in model.parameters():
        part = math.ceil(p.numel() / world)
        flat = torch.cat([p.detach().flatten(), torch.full((part * world - p.numel(),), 7.0)])
        p.ds_tensor = flat[rank * part : (rank + 1) * part].clone()
        p.ds_numel = p.numel()
        p.data = torch.empty(0)


@pytest.mark.parametrize("rank", [0, 1])
def test_load_check_compares_each_partition_exactly(base, rank):
    from transformers import AutoModelForCausalLM

    index = read_index(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert verify_loaded(model, index, base).error is None  # the whole model, no ZeRO
    _zero3_like(model, rank, world=2)
    check = verify_loaded(model, index, base, rank=rank)
    assert check.error is None and check.tensors == len(index)
    assert check.elements == sum(
        math.ceil(i.numel / 2) if rank == 0 else i.numel - math.ceil(i.numel / 2)
        for i in index.values()
    )
    # One parameter of this rank's share left at a fresh init: named, whatever else is right.
    target = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        target.ds_tensor[-5:] = torch.randn(5) * 0.02
    check = verify_loaded(model, index, base, rank=rank)
    assert "model.layers.1.mlp.up_proj.weight differs from the weight files" in check.error


def test_load_check_casts_like_from_pretrained(base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    assert verify_loaded(model, read_index(base), base).error is None
