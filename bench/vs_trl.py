"""Benchmark: qsft vs TRL's SFTTrainer vs a bare PyTorch loop, same SFT work, on this CPU.

    .venv/bin/pip install -e ".[bench]"        # adds trl
    .venv/bin/python bench/vs_trl.py [--models tiny,13m] [--epochs 1]

For each model (the shipped 3.3M demo model and a 13M one, both Qwen2 architecture, the demo
tokenizer, random init saved once so every method starts from the same weights), each method
trains the shipped Q training set (q_sft_train.jsonl: 804 records, with and without tests in
the prompt) for the same number of epochs, about 8 examples per optimizer step, sequences of at
most 1024 tokens (the longest record is 856), AdamW at 1e-3 with 3% warmup and cosine decay,
clipping 1.0, fp32, and loss on completion tokens only:

  trl-padded   SFTTrainer as the original pipeline used it: batches of 8, padded, no packing
  trl-packed   SFTTrainer with its best-fit-decreasing packing, 2 sequences of 1024 per step
  qsft-1rank   our trainer, 1 rank, packed, 2 sequences per step
  qsft-2ranks  our trainer, 2 ranks through the launcher, 1 sequence per rank per step
  bare         a plain PyTorch loop on our packed batches: no framework, the floor
  bare-opt     the same loop with qsft's per-example attention, target-only logits and fused
               AdamW: the work qsft does without DeepSpeed, so qsft / bare-opt is the engine's
               overhead alone

Single-process methods use both cores (2 threads); 2 ranks use one thread each. Each method runs
in its own process; the time is its training loop only (TRL's train_runtime, our summary's
train_seconds). The eval loss of every final model is computed the same way afterwards: mean
target-token loss on the held-out test problems. Prints a table, then ratios ours / each other.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ASSETS = REPO / "trainer" / "assets"
LR, SEQ, EXAMPLES_PER_STEP, SEED = 1e-3, 1024, 8, 42
# Every method trains the chat format (TRL gets conversational prompt/completion records), as
# when the figures in BENCHMARKS.md were taken; qsft's default for these records is now raw.
FORMAT = "chat"
SHAPES = {
    "tiny": None,  # the shipped config
    "13m": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
    ),
}


def make_model(name: str, work: Path) -> Path:
    """A model dir with config, tokenizer and seeded random weights (shared by all methods)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = work / f"model_{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ASSETS / "tiny_model", out)
    config = AutoConfig.from_pretrained(out)
    for k, v in (SHAPES[name] or {}).items():
        setattr(config, k, v)
    config.layer_types = ["full_attention"] * config.num_hidden_layers  # derived at init
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)


def _conversational(path: Path) -> list[dict]:
    from trainer.records import load_records

    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["completion"]}],
        }
        for r in load_records(path)
    ]


def worker_trl(model_dir: Path, out: Path, packing: bool, epochs: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    train = datasets.Dataset.from_list(_conversational(ASSETS / "q_sft_train.jsonl"))
    args = SFTConfig(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        num_train_epochs=epochs,
        per_device_train_batch_size=2 if packing else EXAMPLES_PER_STEP,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=SEED,
        data_seed=SEED,
        max_length=SEQ,
        packing=packing,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    result = trainer.train()
    trainer.save_model(str(out / "final"))
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])  # non-padding, one epoch
    return dict(
        train_s=result.metrics["train_runtime"],
        tokens=tokens * epochs,
        examples=len(train) * epochs,
        steps=result.global_step,
        final=str(out / "final"),
    )


def worker_bare(model_dir: Path, out: Path, epochs: int, opt: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from trainer import attention
    from trainer.batching import Sampler
    from trainer.loss import install, summed_loss
    from trainer.model import load_tokenizer
    from trainer.records import load_records
    from trainer.startup import lr_lambda
    from trainer.tokenized import tokenize_records

    torch.set_num_threads(2)
    tok = load_tokenizer(model_dir)
    data = tokenize_records(
        load_records(ASSETS / "q_sft_train.jsonl"), tok, SEQ, prompt_format=FORMAT
    )
    sampler = Sampler(
        data, micro=2, accum=1, world=1, rank=0, seed=SEED, pad_id=tok.pad_token_id, pack_to=SEQ
    )
    steps = round(epochs * sampler.steps_per_epoch)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        attn_implementation=attention.register("loop") if opt else "sdpa",
    )
    model.config.use_cache = False
    install(model, "chunked" if opt else "full")  # bare: all target logits at once
    adam = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=opt)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lr_lambda(max(1, round(0.03 * steps)), steps))
    tokens = examples = 0
    t0 = time.perf_counter()
    for step in range(steps):
        b = sampler.step(step * sampler.global_batch)
        for mb in b.micro_batches:
            if opt:
                (summed_loss(model, mb, "cpu") / b.num_label_tokens).backward()
            else:
                model(**mb, num_items_in_batch=b.num_label_tokens, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adam.step()
        sched.step()
        adam.zero_grad(set_to_none=True)
        tokens, examples = tokens + b.tokens, examples + len(b.sample_ids)
    train_s = time.perf_counter() - t0
    model.save_pretrained(out / "final")
    return dict(
        train_s=train_s, tokens=tokens, examples=examples, steps=steps, final=str(out / "final")
    )


def run_qsft(model_dir: Path, out: Path, ranks: int, epochs: int, tmp: Path) -> dict:
    from tests.conftest import launch
    from trainer.batching import Sampler
    from trainer.model import load_tokenizer
    from trainer.records import load_records
    from trainer.tokenized import tokenize_records

    tok = load_tokenizer(model_dir)
    data = tokenize_records(
        load_records(ASSETS / "q_sft_train.jsonl"), tok, SEQ, prompt_format=FORMAT
    )
    per_epoch = Sampler(data, 2, 1, 1, 0, SEED, tok.pad_token_id, pack_to=SEQ).steps_per_epoch
    steps = round(epochs * per_epoch)
    res = launch(
        "launch/train.py",
        [
            "--model_size",
            "tiny",
            "--base_model",
            str(model_dir),
            "--train_file",
            str(ASSETS / "q_sft_train.jsonl"),
            "--output_dir",
            str(out),
            "--max_steps",
            str(steps),
            "--batch_size",
            str(2 // ranks),
            "--gradient_accumulation_steps",
            "1",
            "--learning_rate",
            str(LR),
            "--max_seq_length",
            str(SEQ),
            "--save_steps",
            str(steps),
            "--logging_steps",
            "1",
            "--seed",
            str(SEED),
            "--prompt_format",
            FORMAT,
        ],
        nproc=ranks,
        tmp=tmp,
        timeout=3000,
        env={"OMP_NUM_THREADS": "1" if ranks == 2 else "2"},
    )
    if res.returncode != 0:
        raise RuntimeError(res.stdout[-3000:])
    s = json.loads((out / "logs" / "summary.json").read_text())
    return dict(
        train_s=s["train_seconds"],
        tokens=s["tokens_seen"],
        examples=s["examples_seen"],
        steps=s["steps"],
        final=s["consolidated"],
    )


def eval_loss(final: str) -> float:
    """Mean target-token CE on the held-out problems, the same for every method."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.batching import collate
    from trainer.model import load_tokenizer
    from trainer.records import load_records
    from trainer.tokenized import tokenize_records

    tok = load_tokenizer(ASSETS / "tiny_model")
    data = tokenize_records(
        load_records(ASSETS / "q_sft_test.jsonl"), tok, SEQ, prompt_format=FORMAT
    )
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    total = n = 0.0
    with torch.no_grad():
        for i in range(0, len(data), 8):
            mb = collate(data.input_ids[i : i + 8], data.labels[i : i + 8], tok.pad_token_id)
            total += float(model(**mb, num_items_in_batch=1, use_cache=False).loss)
            n += int((mb["labels"][:, 1:] != -100).sum())
    return total / n


def padded_fraction(epochs: int) -> float:
    """Share of padding in batches of EXAMPLES_PER_STEP random examples padded to the longest
    (what trl-padded computes on); our tokenisation, a seeded shuffle per epoch."""
    import random

    from trainer.model import load_tokenizer
    from trainer.records import load_records
    from trainer.tokenized import tokenize_records

    tok = load_tokenizer(ASSETS / "tiny_model")
    lengths = [
        len(x)
        for x in tokenize_records(
            load_records(ASSETS / "q_sft_train.jsonl"), tok, SEQ, prompt_format=FORMAT
        ).input_ids
    ]
    rng, real, padded = random.Random(SEED), 0, 0
    for _ in range(epochs):
        order = rng.sample(lengths, len(lengths))
        for i in range(0, len(order), EXAMPLES_PER_STEP):
            batch = order[i : i + EXAMPLES_PER_STEP]
            real, padded = real + sum(batch), padded + len(batch) * max(batch)
    return 1 - real / padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,13m")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_vs_trl")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # child process: one method, result as JSON on the last line
        out = args.workdir / args.worker
        if args.worker.startswith("bare"):
            result = worker_bare(args.model_dir, out, args.epochs, args.worker == "bare-opt")
        else:
            result = worker_trl(args.model_dir, out, args.worker == "trl-packed", args.epochs)
        print(json.dumps(result))
        return

    import shutil

    from tests.conftest import run_env

    rows = []
    for name in args.models.split(","):
        work = args.workdir / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        model_dir = make_model(name, work)
        env = {**run_env(work), "OMP_NUM_THREADS": "2"}
        results = {}
        for method in ("trl-padded", "trl-packed", "bare", "bare-opt"):
            t0 = time.perf_counter()
            res = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    method,
                    "--model_dir",
                    str(model_dir),
                    "--workdir",
                    str(work),
                    "--epochs",
                    str(args.epochs),
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            if res.returncode != 0:
                sys.exit(f"{method} failed:\n{res.stderr[-3000:]}")
            results[method] = json.loads(res.stdout.strip().splitlines()[-1])
            results[method]["wall_s"] = time.perf_counter() - t0
        for ranks in (1, 2):
            t0 = time.perf_counter()
            key = f"qsft-{ranks}rank" + ("s" if ranks > 1 else "")
            results[key] = run_qsft(model_dir, work / key, ranks, args.epochs, work)
            results[key]["wall_s"] = time.perf_counter() - t0
        for method, r in results.items():
            r["eval_loss"] = eval_loss(r["final"])
            rows.append((name, method, r))
        (work / "results.json").write_text(json.dumps(results, indent=2))

    print(
        f"\n{args.epochs} epochs of {EXAMPLES_PER_STEP}-example steps, seq {SEQ}, fp32, "
        f"2 CPU cores\n"
    )
    print("| model | method | steps | train s | non-pad tokens/s | examples/s | eval loss |")
    print("|---|---|---|---|---|---|---|")
    for name, method, r in rows:
        print(
            f"| {name} | {method} | {r['steps']} | {r['train_s']:.1f} | "
            f"{r['tokens'] / r['train_s']:.0f} | {r['examples'] / r['train_s']:.2f} | "
            f"{r['eval_loss']:.4f} |"
        )
    print(
        f"\npadding in {EXAMPLES_PER_STEP}-example padded batches of this data: "
        f"{padded_fraction(args.epochs):.1%} of the computed tokens (packing removes it)\n"
    )
    for name in args.models.split(","):
        res = {m: r for n, m, r in rows if n == name}
        for ours in ("qsft-1rank", "qsft-2ranks"):
            eps = res[ours]["examples"] / res[ours]["train_s"]
            for other in ("trl-padded", "trl-packed", "bare", "bare-opt"):
                o = res[other]["examples"] / res[other]["train_s"]
                print(
                    f"{name}: {ours} / {other}: {eps / o:.2f}x examples/s "
                    f"(eval loss {res[ours]['eval_loss']:.3f} vs {res[other]['eval_loss']:.3f})"
                )
    assert all(math.isfinite(r["eval_loss"]) for _, _, r in rows)


if __name__ == "__main__":
    main()
