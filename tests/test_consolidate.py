"""Offline consolidation: bit-identical to DeepSpeed's fp32 reconstruction, streamed, atomic,
verified, and bad input refused with one line naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_env
from trainer.config import parse_size
from trainer.offline.consolidate import ConsolidateError, consolidate

pytestmark = pytest.mark.multirank  # the fixtures train through the real launcher


def _deepspeed_fp32(root, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def _load_dir(path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def test_fp32_bit_identical_to_deepspeed_tied(trained, tmp_path):
    out, _ = trained
    ckpts = out / "checkpoints"
    consolidate(ckpts / "checkpoint-8", tmp_path / "c", dtype=torch.float32)
    ours, ref = _load_dir(tmp_path / "c"), _deepspeed_fp32(ckpts, "checkpoint-8")
    assert "lm_head.weight" not in ours  # tied: from_pretrained re-ties it from the embedding
    assert set(ref) == set(ours) | {"lm_head.weight"}
    for k, v in ours.items():
        assert torch.equal(v, ref[k].contiguous()), k


def test_fp32_bit_identical_to_deepspeed_untied(trained_untied, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = trained_untied
    ckpts = out / "checkpoints"
    consolidate(ckpts / "checkpoint-4", tmp_path / "c", dtype=torch.float32)
    ours, ref = _load_dir(tmp_path / "c"), _deepspeed_fp32(ckpts, "checkpoint-4")
    assert set(ours) == set(ref) and "lm_head.weight" in ours
    for k, v in ours.items():
        assert torch.equal(v, ref[k].contiguous()), k
    assert not torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, ours["lm_head.weight"])


def test_sharded_bf16_output_loads_and_matches(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = trained
    tag = out / "checkpoints" / "checkpoint-16"
    manifest = consolidate(
        tag,
        tmp_path / "c",
        dtype=torch.bfloat16,
        max_shard_size=parse_size("2MB", "--max_shard_size"),
        verify=True,
    )
    assert len(manifest["weight_files"]) > 3
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(manifest["weight_files"])
    assert all(
        (tmp_path / "c" / f).stat().st_size <= 2_000_000 + 200_000 for f in manifest["weight_files"]
    )  # one tensor may exceed; none here
    ref = _deepspeed_fp32(out / "checkpoints", "checkpoint-16")
    ours = _load_dir(tmp_path / "c")
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert model.dtype == torch.bfloat16
    assert json.loads((tmp_path / "c" / "config.json").read_text())["dtype"] == "bfloat16"
    from trainer.offline.consolidate import sha256_file

    for name, meta in manifest["files"].items():
        assert sha256_file(tmp_path / "c" / name) == meta["sha256"]


def test_verify_catches_a_wrong_probe(trained, tmp_path):
    out, _ = trained
    tag = tmp_path / "checkpoint-16"
    shutil.copytree(
        out / "checkpoints" / "checkpoint-16", tag, ignore=shutil.ignore_patterns("consolidated")
    )
    probe = torch.load(tag / "hf" / "verify_probe.pt")
    probe["lse"] = probe["lse"] + 0.5  # as if the weights had drifted from the live engine
    torch.save(probe, tag / "hf" / "verify_probe.pt")
    with pytest.raises(ConsolidateError, match="log-normaliser on the probe batch differ"):
        consolidate(tag, tmp_path / "c", verify=True)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.tmp-*"))


def _corrupt(kind: str, tag):
    shard1 = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if kind == "missing rank shard":
        shard1.unlink()
        return "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"
    if kind == "truncated shard":
        data = shard1.read_bytes()
        shard1.write_bytes(data[: len(data) // 2])
        return "zero_pp_rank_1_mp_rank_00_optim_states.pt: not a readable checkpoint shard"
    if kind == "corrupt shard":
        shard1.write_bytes(b"\x00garbage" * 1000)
        return "zero_pp_rank_1_mp_rank_00_optim_states.pt: not a readable checkpoint shard"
    if kind == "world size mismatch":
        shutil.copy(shard1, tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
        return "3 optimizer shards but the metadata says 2 ranks"
    if kind == "shards from another run":
        # rank 1's shard of the untied model beside the tied model's metadata and rank 0
        shutil.copy(tag.parent / "other" / shard1.name, shard1)
        return "do not belong to this metadata"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing rank shard",
        "truncated shard",
        "corrupt shard",
        "world size mismatch",
        "shards from another run",
    ],
)
def test_bad_checkpoint_exits_2_naming_the_file(kind, trained, trained_untied, tmp_path):
    tag = tmp_path / "checkpoint-16"
    shutil.copytree(
        trained[0] / "checkpoints" / "checkpoint-16",
        tag,
        ignore=shutil.ignore_patterns("consolidated"),
    )
    if kind == "shards from another run":
        shutil.copytree(trained_untied[0] / "checkpoints" / "checkpoint-4", tmp_path / "other")
    expected = _corrupt(kind, tag)
    # The reader's own checks, as for a tag without the trainer's marker (the marker's size
    # check, which comes first otherwise, is tested in test_faults).
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.offline.consolidate",
            str(tag),
            "--out",
            str(tmp_path / "out"),
            "--allow_incomplete",
        ],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("consolidate: error:")]
    assert len(errors) == 1 and expected in errors[0], res.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_is_refused(trained, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.offline.consolidate",
            str(trained[0] / "checkpoints"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert "out: already exists" in res.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_cli_uses_latest_and_training_dtype(trained, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.offline.consolidate",
            str(trained[0] / "checkpoints"),
            "--out",
            str(tmp_path / "c"),
            "--verify",
        ],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["source_tag"] == "checkpoint-16" and manifest["dtype"] == "float32"
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tmp_path / "c")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert manifest["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert "verified" in res.stdout
