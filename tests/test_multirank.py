"""Multi-rank tests through the real deepspeed launcher on CPU (gloo), each with a timeout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, launch, run_env
from trainer.batching import Sampler
from trainer.config import ASSETS_DIR
from trainer.data import encode
from trainer.model import load_tokenizer
from trainer.records import load_records
from trainer.tokenized import tokenize_records

pytestmark = pytest.mark.multirank
PROBE = "tests/scripts/probe.py"


def _grads(tmp_path, nproc: int, accum: int, packing: bool, base_model=None) -> dict:
    out = tmp_path / f"grads_{nproc}.pt"
    extra = ["--base_model", str(base_model)] if base_model else []
    res = launch(
        PROBE,
        [
            "grads",
            str(out),
            "--model_size",
            "tiny",
            "--output_dir",
            str(tmp_path / f"o{nproc}"),
            "--batch_size",
            "2",
            "--gradient_accumulation_steps",
            str(accum),
            "--seed",
            "3",
            "--max_seq_length",
            "512",  # as _reference_grads packs
            "--packing" if packing else "--no-packing",
            *extra,
        ],
        nproc=nproc,
        tmp=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    return torch.load(out)


def _reference_grads(
    init: dict, seed: int, packing: bool, naive: bool = False, model_dir=ASSETS_DIR / "tiny_model"
) -> dict:
    """Plain PyTorch, one process, no DeepSpeed: the gradient of the step's loss.

    Correct: sum of target-token CE over the whole global batch / its target tokens.
    naive=True: the mean of per-micro-batch means (what a loop that averages losses computes).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer(ASSETS_DIR / "tiny_model")
    data = tokenize_records(load_records(ASSETS_DIR / "q_sft_train.jsonl"), tok, 512)
    batches = Sampler(
        data,
        micro=2,
        accum=4,
        world=1,
        rank=0,
        seed=seed,
        pad_id=tok.pad_token_id,
        pack_to=512 if packing else None,
    ).step(0)
    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="sdpa"
    )
    missing, unexpected = model.load_state_dict(init, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: re-tied on load
    if config.tie_word_embeddings:
        model.tie_weights()
    for mb in batches.micro_batches:
        if naive:
            loss = model(**mb).loss / len(batches.micro_batches)
        else:
            loss = model(**mb, num_items_in_batch=batches.num_label_tokens).loss
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_loss_normalisation_1rank_ga4_equals_2ranks_ga2(tmp_path, packing):
    one = _grads(tmp_path, nproc=1, accum=4, packing=packing)
    two = _grads(tmp_path, nproc=2, accum=2, packing=packing)
    torch.testing.assert_close(one["init"], two["init"])  # same seeded init on any world size
    ref = _reference_grads(one["init"], seed=3, packing=packing)
    naive = _reference_grads(one["init"], seed=3, packing=packing, naive=True)
    assert _max_rel_diff(one["grads"], ref) < 1e-5
    assert _max_rel_diff(two["grads"], ref) < 1e-5
    assert _max_rel_diff(one["grads"], two["grads"]) < 1e-5
    # The test can fail: a mean of per-micro-batch means is measurably different here.
    assert _max_rel_diff(naive, ref) > 1e-2


def test_untied_output_weight_gets_its_gradient_under_zero3(tmp_path):
    """The chunked loss runs inside the engine's forward, so a separate (untied) output weight
    is gathered for it and its gradient reduced: 2 ranks equal plain PyTorch to 1e-5."""
    import shutil

    model_dir = shutil.copytree(ASSETS_DIR / "tiny_model", tmp_path / "untied")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    two = _grads(tmp_path, nproc=2, accum=2, packing=True, base_model=model_dir)
    assert "lm_head.weight" in two["init"]
    ref = _reference_grads(two["init"], seed=3, packing=True, model_dir=model_dir)
    assert _max_rel_diff(two["grads"], ref) < 1e-5
    assert float(two["grads"]["lm_head.weight"].norm()) > 0


def test_end_to_end_output_layout(trained):
    out, stdout = trained
    ckpts = out / "checkpoints"
    assert (out / "config.yaml").is_file()
    assert (ckpts / "latest").read_text().strip() == "checkpoint-16"
    assert (ckpts / "zero_to_fp32.py").is_file()
    for step in (8, 16):
        shards = sorted(p.name for p in (ckpts / f"checkpoint-{step}").glob("*_optim_states.pt"))
        assert len(shards) == 2  # one ZeRO optimizer shard per rank
    cons = ckpts / "checkpoint-16" / "consolidated"
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "manifest.json",
    ):
        assert (cons / name).is_file(), name
    assert not list(ckpts.glob("checkpoint-16/.consolidated.tmp-*"))
    manifest = json.loads((cons / "manifest.json").read_text())
    assert manifest["source_step"] == 16 and manifest["dtype"] == "float32"
    from trainer.offline.consolidate import sha256_file

    for name, meta in manifest["files"].items():
        assert sha256_file(cons / name) == meta["sha256"], name

    metrics = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 8, 12, 16]
    # Packed by default: micro 1 sequence of 512 tokens x 2 ranks per step, ~4 examples each.
    assert all(m["tokens_per_s"] > 0 and m["consumed_units"] == m["step"] * 2 for m in metrics)
    assert all(m["examples_seen"] > m["consumed_units"] * 2 for m in metrics)
    assert all(0 <= m["padding"] < 0.2 and 0 < m["mfu"] < 1 for m in metrics)
    evals = json.loads((out / "logs" / "eval_results.json").read_text())
    steps = [e["step"] for e in evals["history"]]
    assert steps == [0, 8, 16]
    first, last = evals["history"][0]["eval_loss"], evals["history"][-1]["eval_loss"]
    assert last < first - 1.0, (first, last)  # held-out loss falls clearly
    assert "step 16 loss" in (out / "logs" / "training_log.txt").read_text()
    assert "== qsft: training complete ==" in stdout
    # The curves are drawn (an 800x800 PNG) and the summary, printed and saved, names them.
    curves = out / "logs" / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    summary = json.loads((out / "logs" / "summary.json").read_text())
    assert summary["curves"] == str(curves) and f"tokens/s): {curves}" in stdout
    assert str(cons) in stdout
    # The demo config has no `architectures`; the consolidated one names the class trained.
    config = json.loads((cons / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["use_cache"] is True
    assert manifest["prompt_format"] == "raw" and manifest["end_tokens"][0]["token"] == "<|im_end|>"
    # The kernels chosen (a CPU: the per-example loop) are said at start and recorded.
    import yaml

    kernels = yaml.safe_load((out / "config.yaml").read_text())["kernels"]
    assert kernels == {"attention": "loop", "loss": "chunked", "loss_chunk_rows": 2**26 // 3514}
    assert "attention loop (causal SDPA per packed example), loss chunked" in stdout


def test_eval_records_that_do_not_fit_are_counted_and_reported(trained):
    """At 512 tokens some held-out records do not fit: dropped like training ones, and said."""
    import yaml

    out, stdout = trained
    tok = load_tokenizer(ASSETS_DIR / "tiny_model")
    records = load_records(ASSETS_DIR / "q_sft_test.jsonl")
    too_long = sum(len(encode(r, tok, "raw").input_ids) > 512 for r in records)
    assert too_long > 0
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (data["eval"]["records"], data["eval"]["dropped"]) == (len(records), too_long)
    evals = json.loads((out / "logs" / "eval_results.json").read_text())
    assert evals["eval_data"]["examples"] == len(records) - too_long
    assert (
        f"eval: {too_long} of {len(records)} records are longer than --max_seq_length 512: "
        f"{too_long} dropped"
    ) in stdout
    assert f"{too_long} longer than --max_seq_length left out, 0 cut to it" in stdout


def test_deepspeed_zero_to_fp32_matches_consolidated(trained, tmp_path):
    """DeepSpeed's own converter works on our checkpoint root and agrees with our export."""
    from safetensors.torch import load_file

    out, _ = trained
    ckpts = out / "checkpoints"
    res = subprocess.run(
        [sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "fp32")],
        env=run_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)
    ours = load_file(ckpts / "checkpoint-16" / "consolidated" / "model.safetensors")
    assert set(ours) <= set(theirs)
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k


def test_consolidated_reproduces_live_engine_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dump = tmp_path / "logits.pt"
    res = launch(
        PROBE,
        [
            "logits",
            str(dump),
            "--model_size",
            "tiny",
            "--max_seq_length",
            "512",
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "6",
            "--eval_steps",
            "100",
            "--save_steps",
            "100",
        ],
        nproc=2,
        tmp=tmp_path,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    live = torch.load(dump)
    cons = tmp_path / "run" / "checkpoints" / "checkpoint-6" / "consolidated"
    model = AutoModelForCausalLM.from_pretrained(cons).eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    AutoTokenizer.from_pretrained(cons)
    with torch.no_grad():
        logits = model(**live["batch"]).logits
    torch.testing.assert_close(logits, live["logits"], rtol=1e-5, atol=1e-5)


def test_weighted_mix_by_epochs_with_per_file_eval_tokenized_once(tmp_path):
    """Two training files 1:3, two eval files, --num_epochs 1, no eval but the last."""
    import math

    import yaml

    from trainer.batching import quotas

    train = (ASSETS_DIR / "q_sft_train.jsonl").read_text().splitlines()
    test = (ASSETS_DIR / "q_sft_test.jsonl").read_text().splitlines()
    files = {}
    for name, lines in (
        ("a", train[:60]),
        ("b", train[60:90]),
        ("e1", test[:6]),
        ("e2", test[6:16]),
    ):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    res = launch(
        "launch/train.py",
        [
            "--model_size",
            "tiny",
            "--output_dir",
            str(out),
            "--max_seq_length",
            "512",
            "--train_file",
            str(files["a"]),
            str(files["b"]),
            "--train_weights",
            "1",
            "3",
            "--eval_file",
            str(files["e1"]),
            str(files["e2"]),
            "--num_epochs",
            "1",
            "--eval_steps",
            "0",
            "--no-eval_at_start",
            "--save_steps",
            "0",
            "--batch_size",
            "2",
            "--data_cache_dir",
            str(tmp_path / "cache"),
        ],
        nproc=2,
        tmp=tmp_path,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    # Rank 0 alone tokenized each file (the other rank waited, then mapped the entries).
    assert res.stdout.count("qsft: tokenizing ") == 4
    assert len(list((tmp_path / "cache").iterdir())) == 4
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    a, b = data["train"]
    assert (a["weight"], b["weight"]) == (1.0, 3.0)
    assert [a["per_epoch"], b["per_epoch"]] == quotas([1, 3], [a["examples"], b["examples"]])
    line = next(x for x in res.stdout.splitlines() if "--num_epochs 1:" in x)
    units = int(line.split(": ")[1].split()[0])
    steps = math.ceil(units / 4)  # global batch 2 x 1 x 2
    assert line.endswith(f"global batch 4 -> {steps} steps")
    summary = json.loads((out / "logs" / "summary.json").read_text())
    assert summary["steps"] == steps
    evals = json.loads((out / "logs" / "eval_results.json").read_text())["history"]
    assert [r["step"] for r in evals] == [steps]  # no step-0 eval, none periodic
    by_file = evals[0]["eval_loss_by_file"]
    assert set(by_file) == {"e1.jsonl", "e2.jsonl"}
    tokens = [e["label_tokens"] for e in data["eval"]]
    pooled = (by_file["e1.jsonl"] * tokens[0] + by_file["e2.jsonl"] * tokens[1]) / sum(tokens)
    assert evals[0]["eval_loss"] == pytest.approx(pooled, rel=1e-9)
    assert by_file["e1.jsonl"] != by_file["e2.jsonl"]
    # --save_steps 0: no checkpoint at all, not even the final one, and the summary says so.
    assert not (out / "checkpoints").exists() and summary["consolidated"] is None
