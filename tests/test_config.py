"""Run config (CLI) and DeepSpeed JSON validation: shipped files pass, broken ones fail clearly."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import DS_CONFIG_DIR, SIZE_DEFAULTS, ConfigError, parse_run_config
from trainer.ds_config import load_ds_config, resolve_ds_config, validate_ds_dict

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(DS_CONFIG_DIR.glob("*.json"))


def test_every_size_has_a_config():
    names = {p.name for p in SHIPPED}
    for size in SIZE_DEFAULTS:
        assert f"zero3_{size}.json" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    ds = load_ds_config(path)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    # Bucket sizes are pinned numbers derived from the hidden size (ds_configs/README.md).
    for key in (
        "reduce_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
    ):
        assert isinstance(zero[key], int)


def test_bucket_sizes_follow_hidden_size():
    hidden = {"1.5b": 1536, "3b": 2048, "7b": 3584, "14b": 5120, "32b": 5120}
    for size, h in hidden.items():
        zero = load_ds_config(DS_CONFIG_DIR / f"zero3_{size}.json")["zero_optimization"]
        assert zero["reduce_bucket_size"] == h * h
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
        assert zero["stage3_param_persistence_threshold"] == 10 * h


BASE = json.loads((DS_CONFIG_DIR / "zero3_7b.json").read_text())


def _with(mutate):
    cfg = copy.deepcopy(BASE)
    mutate(cfg)
    return cfg


BROKEN = {
    "misspelt top-level key": (lambda c: c.update(gradient_clippping=1.0), "gradient_clippping"),
    "suggests the right key": (
        lambda c: c.update(gradient_clippping=1.0),
        "did you mean 'gradient_clipping'",
    ),
    "misspelt zero key": (
        lambda c: c["zero_optimization"].update(stage3_prefetch_bucket_sise=1),
        "zero_optimization.stage3_prefetch_bucket_sise",
    ),
    "misspelt offload key": (
        lambda c: c["zero_optimization"].update(offload_optimizer={"devise": "cpu"}),
        "zero_optimization.offload_optimizer.devise",
    ),
    "misspelt bf16 key": (lambda c: c["bf16"].update(enable=True), "bf16.enable"),
    "stage 2": (lambda c: c["zero_optimization"].update(stage=2), "zero_optimization.stage"),
    "no gather on save": (
        lambda c: c["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False),
        "stage3_gather_16bit_weights_on_model_save",
    ),
    "bf16 and fp16": (lambda c: c.update(fp16={"enabled": True}), "bf16.enabled and fp16"),
    "string boolean": (lambda c: c["bf16"].update(enabled="false"), "bf16.enabled must be"),
    "bad offload device": (
        lambda c: c["zero_optimization"].update(offload_optimizer={"device": "gpu"}),
        "offload_optimizer.device",
    ),
    "nvme without path": (
        lambda c: (
            c.update(optimizer={"type": "AdamW"})
            or c["zero_optimization"].update(offload_param={"device": "nvme"})
        ),
        "nvme_path",
    ),
    "offload without ds optimizer": (
        lambda c: c["zero_optimization"].update(offload_optimizer={"device": "cpu"}),
        "needs a DeepSpeed 'optimizer' block",
    ),
    "auto value": (
        lambda c: c["zero_optimization"].update(reduce_bucket_size="auto"),
        'zero_optimization.reduce_bucket_size: "auto"',
    ),
    "negative clipping": (lambda c: c.update(gradient_clipping=-1), "gradient_clipping"),
    "scheduler block": (lambda c: c.update(scheduler={"type": "WarmupLR"}), "scheduler"),
    "unsupported feature": (lambda c: c.update(pipeline={"stages": 2}), "'pipeline'"),
    "unknown optimizer": (lambda c: c.update(optimizer={"type": "Lamb"}), "optimizer.type"),
    "misspelt optimizer param": (
        lambda c: c.update(optimizer={"type": "AdamW", "params": {"betas1": 0.9}}),
        "optimizer.params.betas1",
    ),
    "no zero section": (lambda c: c.pop("zero_optimization"), "zero_optimization"),
    "zero not an object": (lambda c: c.update(zero_optimization=3), "zero_optimization"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_ds_config_rejected(name):
    mutate, expected = BROKEN[name]
    with pytest.raises(ConfigError) as e:
        validate_ds_dict(_with(mutate), source="x.json")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("x.json: ")
    assert expected in msg


def test_invalid_json_names_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "gradient_clipping": 1.0,\n  "zero_optimization": {"stage": 3,}\n}')
    with pytest.raises(ConfigError, match=r"bad.json: line 3: invalid JSON"):
        load_ds_config(bad)


def _run_cfg(tmp_path, *extra):
    return parse_run_config(["--model_size", "tiny", "--output_dir", str(tmp_path), *extra])


def test_train_batch_size_checked_against_world(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(dict(BASE, train_batch_size=64, bf16={"enabled": False})))
    cfg = _run_cfg(
        tmp_path, "--ds_config", str(ds), "--batch_size", "2", "--gradient_accumulation_steps", "8"
    )
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(cfg, world_size=2)
    assert (
        "train_batch_size 64 != micro 2 x grad_accum 8 x world 2 = 32; set "
        "gradient_accumulation_steps to 16"
    ) in str(e.value)
    assert resolve_ds_config(cfg, world_size=4)["train_batch_size"] == 64


def test_resolve_fills_batch_and_precision(tmp_path):
    cfg = _run_cfg(tmp_path, "--batch_size", "3", "--gradient_accumulation_steps", "5")
    ds = resolve_ds_config(cfg, world_size=2)
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (3, 5, 30)
    assert ds["bf16"]["enabled"] is False  # tiny runs fp32 on CPU
    ds = resolve_ds_config(_run_cfg(tmp_path, "--bf16"), world_size=1)
    assert ds["bf16"]["enabled"] is True


def test_offload_config_gets_run_lr(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = parse_run_config(
        [
            "--model_size",
            "32b",
            "--base_model",
            str(tmp_path / "m"),
            "--output_dir",
            str(tmp_path),
            "--ds_config",
            str(DS_CONFIG_DIR / "zero3_32b_offload.json"),
        ]
    )
    ds = resolve_ds_config(cfg, world_size=8)
    assert ds["optimizer"]["params"]["lr"] == 4e-6
    assert ds["train_batch_size"] == 1 * 8 * 8


def test_size_defaults_and_overrides(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    big = parse_run_config(
        ["--model_size", "14b", "--base_model", str(tmp_path / "m"), "--output_dir", str(tmp_path)]
    )
    assert (
        big.learning_rate,
        big.save_every_n_steps,
        big.batch_size,
        big.gradient_accumulation_steps,
        big.max_steps,
    ) == (4e-6, 50, 1, 8, 1000)
    small = parse_run_config(
        [
            "--model_size",
            "7b",
            "--base_model",
            str(tmp_path / "m"),
            "--output_dir",
            str(tmp_path),
            "--save_steps",
            "7",
            "--learning_rate",
            "1e-4",
        ]
    )
    assert (small.learning_rate, small.save_every_n_steps) == (1e-4, 7)
    assert small.resolved_warmup_steps == 30  # 3% of 1000 steps


BAD_FLAGS = {
    "unknown flag": (["--learning_rat", "1e-4"], "unknown flag: --learning_rat"),
    "bad size": (["--model_size", "70b"], "--model_size"),
    "negative lr": (["--learning_rate", "-1"], "--learning_rate"),
    "not a number": (["--max_steps", "many"], "--max_steps"),
    "warmup past end": (["--max_steps", "10", "--warmup_steps", "10"], "--warmup_steps"),
    "missing base model": (["--model_size", "7b"], "--base_model is required"),
    "missing ds config": (["--ds_config", "nope.json"], "--ds_config nope.json"),
    "bad resume": (["--resume", "/no/such/dir"], "--resume"),
    "bad overlong": (["--overlong", "wrap"], "--overlong"),
    "overwrite while resuming": (["--overwrite"], "--overwrite only applies with --resume none"),
    "negative save interval": (["--save_steps", "-1"], "--save_every_n_steps"),
    "keep without saves": (["--save_steps", "0", "--keep_last", "2"], "saves none"),
    "zero rank timeout": (["--rank_timeout_s", "0"], "--rank_timeout_s"),
    "steps and epochs": (
        ["--max_steps", "10", "--num_epochs", "2"],
        "give --max_steps or --num_epochs, not both",
    ),
    "weights without files": (["--train_weights", "1"], "--train_weights: 1 weight(s) for 0"),
    "weights per file": (
        ["--train_file", "a.jsonl", "b.jsonl", "--train_weights", "1"],
        "--train_weights: 1 weight(s) for 2 --train_file(s)",
    ),
    "zero weight": (["--train_file", "a", "b", "--train_weights", "1", "0"], "above 0"),
    "file twice": (["--train_file", "a.jsonl", "a.jsonl"], "a.jsonl is given twice"),
    "negative eval interval": (["--eval_steps", "-1"], "--eval_steps"),
}


def test_several_files_weights_and_epochs_parse(tmp_path):
    cfg = _run_cfg(
        tmp_path,
        "--train_file",
        "a.jsonl",
        "b.parquet",
        "--train_weights",
        "0.7",
        "0.3",
        "--eval_file",
        "x.jsonl",
        "y.jsonl",
        "--num_epochs",
        "2.5",
        "--eval_steps",
        "0",
        "--no-eval_at_start",
    )
    assert cfg.train_paths == [Path("a.jsonl"), Path("b.parquet")]
    assert cfg.eval_paths == [Path("x.jsonl"), Path("y.jsonl")]
    # max_steps is worked out from the data at start (trainer.startup.setup)
    assert (cfg.train_weights, cfg.num_epochs, cfg.max_steps) == ([0.7, 0.3], 2.5, None)
    assert (cfg.eval_steps, cfg.eval_at_start) == (0, False)
    assert cfg.cache_dir == tmp_path / "data_cache"


def test_save_steps_is_the_original_name_of_save_every_n_steps(tmp_path):
    # What 0 does (no checkpoint at all) is checked on a launched run in test_multirank.
    assert _run_cfg(tmp_path, "--save_steps", "0").save_every_n_steps == 0
    assert _run_cfg(tmp_path, "--save_steps", "7").save_every_n_steps == 7


@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_bad_flags_rejected(name, tmp_path):
    argv, expected = BAD_FLAGS[name]
    base = ["--model_size", "tiny", "--output_dir", str(tmp_path)]
    with pytest.raises(ConfigError) as e:
        parse_run_config(base + argv)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flag", [["--local_rank=1"], ["--local_rank", "1"]])
def test_launcher_local_rank_flag_is_accepted_and_not_part_of_the_config(tmp_path, flag):
    """The deepspeed launcher adds --local_rank to every rank's command line; it must neither
    fail the parse nor shift the flags after it, nor land in config.yaml."""
    cfg = _run_cfg(tmp_path, *flag, "--max_steps", "7")
    assert cfg.max_steps == 7
    assert not [k for k in cfg.model_dump() if "local_rank" in k]


def test_check_cli(tmp_path):
    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps(dict(BASE, gradient_clippping=1.0)))
    ok = subprocess.run(
        [sys.executable, "-m", "trainer.ds_config", "check", *map(str, SHIPPED)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("ok ") == len(SHIPPED)
    fail = subprocess.run(
        [sys.executable, "-m", "trainer.ds_config", "check", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert fail.returncode == 2
    assert "typo.json: unknown top-level key 'gradient_clippping'" in fail.stderr


def test_train_entry_exits_2_on_bad_flag_before_loading(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--model_size",
            "tiny",
            "--output_dir",
            str(tmp_path / "o"),
            "--learning_rate",
            "-3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.startswith("qsft: error:")]
    assert lines and "--learning_rate" in lines[0]
    assert not (tmp_path / "o").exists()  # nothing written


def test_help_lists_every_flag():
    out = subprocess.run(
        [sys.executable, "launch/train.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--model_size", "--warmup_steps", "--save_steps", "--no-packing", "--keep_last"):
        assert flag in out.stdout
