"""Shared test helpers: launching real multi-rank jobs on CPU with a hard timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


TINY = REPO / "trainer" / "assets" / "tiny_model"
QWEN_LAYOUT = REPO / "tests" / "fixtures" / "qwen25_layout"
# 8 held-out records: for launcher tests that need an eval set but not its figures (the shipped
# one costs ~10 s per eval on 2 CPU ranks).
EVAL_SMALL = REPO / "tests" / "fixtures" / "eval_small.jsonl"


def qwen_layout_model(dest: Path) -> Path:
    """The demo model with a Qwen2.5 base release's special-token layout (see
    tests/fixtures/qwen25_layout/README.md): EOS = pad = <|endoftext|>, distinct from the chat
    template's <|im_end|>; generation stops on <|endoftext|> only; Qwen2.5's template."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(TINY / "tokenizer.json", dest / "tokenizer.json")
    for f in QWEN_LAYOUT.iterdir():
        if f.name != "README.md":
            shutil.copy2(f, dest / f.name)
    return dest


def sharded_model(dest, tied: bool = True, shards: int = 3, seed: int = 0):
    """A small "pretrained" model saved like a Qwen2.5 release: `shards` safetensors + index.

    Every value is random and none is exactly 0 or 1 (unlike a fresh init), so a weight left at
    its init, or a tiny optimizer update, cannot go unnoticed.
    """
    import math

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    qwen_layout_model(dest)
    config = AutoConfig.from_pretrained(dest)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02 + (1.0 if p.ndim == 1 else 0.0) + 1e-3)
    total = sum(p.numel() for p in set(model.parameters())) * 4
    # Greedy sharding leaves the last shard part-full: aim between `shards` - 1 and `shards`.
    model.save_pretrained(dest, max_shard_size=math.ceil(total / (shards - 0.5)))
    files = sorted(dest.glob("model-*.safetensors"))
    assert len(files) == shards and (dest / "model.safetensors.index.json").is_file()
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",  # 2 ranks on 2 cores; the deepspeed launcher does not set it
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),  # JIT once, then reuse
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        QSFT_NO_PROGRESS="1",
        TMPDIR=str(tmp),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        # As in an activated venv (and the Makefile): DeepSpeed's JIT op cache is keyed on the
        # compile command, which depends on PATH; a different PATH means a 60 s rebuild.
        PATH=str(VENV_BIN) + os.pathsep + env.get("PATH", ""),
    )
    return env


def start(
    script: str, args: list[str], nproc: int, tmp: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `deepspeed --num_gpus nproc script args` in its own session (a process group).

    A new session lets us signal or kill the launcher *and* its ranks: killing only the
    launcher would orphan the ranks (they train on).
    """
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        script,
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**run_env(tmp), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def start_node(
    node_rank: int,
    hostfile: Path,
    port: int,
    script: str,
    args: list[str],
    tmp: Path,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.Popen:
    """One "node" of a multi-node job on this machine: the per-node launcher mode.

    `deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 --master_port P`
    starts only this node's ranks (as srun does on a cluster); rank 0's node hosts the
    rendezvous. Only loopback is addressed. Own session, like start().
    """
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(node_rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(REPO / script),
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**run_env(tmp), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def start_two_nodes(
    tmp: Path,
    script: str,
    args: list[str],
    envs: tuple[dict | None, dict | None] = (None, None),
    cwds: tuple[Path, Path] = (REPO, REPO),
) -> list[subprocess.Popen]:
    """Both launchers of a 2-node job (hostfile: node0 slots=1, node1 slots=1), started."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    return [start_node(n, hostfile, port, script, args, tmp, envs[n], cwds[n]) for n in (0, 1)]


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each launcher's whole process group (launcher and ranks); reap them."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.communicate(timeout=60)


def two_nodes(
    tmp: Path,
    script: str,
    args: list[str],
    timeout: int = 300,
    env: dict[str, str] | None = None,
    cwds: tuple[Path, Path] = (REPO, REPO),
) -> list[subprocess.CompletedProcess]:
    """Run a 2-node job to the end; returns each node's result."""
    procs = start_two_nodes(tmp, script, args, (env, env), cwds)
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_all(procs)
            pytest.fail(f"2-node job hung for {timeout}s")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return results


def launch(
    script: str,
    args: list[str],
    nproc: int,
    tmp: Path,
    timeout: int = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a launcher job to the end; kill it all and fail the test on timeout."""
    proc = start(script, args, nproc, tmp, env)
    cmd = proc.args
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script} hung for {timeout}s; output tail:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def train_tiny(tmp: Path, *extra: str, nproc: int = 2, steps: int = 16) -> tuple[Path, str]:
    """A short real training run of the tiny model through the launcher; returns (out, log)."""
    out = tmp / "run"
    # 512 tokens, not the demo's 1024: half the work per step, enough for every test here.
    res = launch(
        "launch/train.py",
        [
            "--model_size",
            "tiny",
            "--max_seq_length",
            "512",
            "--output_dir",
            str(out),
            "--max_steps",
            str(steps),
            "--save_steps",
            str(steps // 2),
            "--eval_steps",
            str(steps // 2),
            "--logging_steps",
            "4",
            *extra,
        ],
        nproc=nproc,
        tmp=tmp,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    return out, res.stdout


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """16 steps of the tied tiny model on 2 ranks, checkpoints at 8 and 16, consolidated."""
    return train_tiny(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="session")
def trained_untied(tmp_path_factory):
    """The same with untied embeddings (a separate lm_head, like Qwen2.5-7B and larger)."""
    import json
    import shutil

    tmp = tmp_path_factory.mktemp("untied")
    model = tmp / "untied_model"
    shutil.copytree(REPO / "trainer" / "assets" / "tiny_model", model)
    config = json.loads((model / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (model / "config.json").write_text(json.dumps(config))
    return train_tiny(tmp, "--base_model", str(model), "--consolidate", "none", steps=4)
