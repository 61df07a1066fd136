"""Rebuild the shipped demo assets from q_problems.jsonl (the team-written problem set).

    python -m trainer.assets.build            # renders the SFT records and trains the tokenizer

Outputs (all committed, so nothing is downloaded or built at run time):
  q_sft_{train,test}.jsonl            prompt/completion records, split by problem: three task
                                      kinds, each also with the test cases in the prompt
  q_sft_{train,test}_no_tests.jsonl   the same without the with-tests variant
  tiny_model/                         Qwen2 config + byte-level BPE tokenizer trained on Q code
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from trainer.datatools.problems import Problem, Test, render_records

ASSETS = Path(__file__).resolve().parent
PROBLEMS = ASSETS / "q_problems.jsonl"
TINY = ASSETS / "tiny_model"

TEST_EVERY = 6  # every 6th problem (by id) is held out: a split by problem, never by record
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format of the Qwen2.5 instruct templates, written for the demo tokenizer.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def load_problems(path: Path = PROBLEMS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split(problems: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    ordered = sorted(problems, key=lambda p: p["id"])
    test = [p for i, p in enumerate(ordered) if i % TEST_EVERY == TEST_EVERY - 1]
    train = [p for i, p in enumerate(ordered) if i % TEST_EVERY != TEST_EVERY - 1]
    return train, test


def to_problem(p: dict[str, Any]) -> Problem:
    """Our JSON problem as the renderer's Problem; each test becomes a check in both languages:
    `assert solve(args) == expected` and `solve[args]~expected` (1b when it passes)."""
    tests = []
    for t in p["tests"]:
        args = ", ".join(repr(a) for a in ast.literal_eval(t["input"]))
        tests.append(
            Test(f"assert solve({args}) == {t['output']}", f"solve[{t['q_input']}]~{t['q_output']}")
        )
    return Problem(p["id"], p["description"], p["q"], p["python"], tuple(tests), p["difficulty"])


def render_split(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return render_records([to_problem(p) for p in problems])


def write_problem_dirs(problems: list[dict[str, Any]], root: Path) -> None:
    """The problems in the original data set's per-problem layout (root/<split>/<id>/...)."""
    for name, part in zip(("train", "test"), split(problems), strict=False):
        for p in part:
            d = root / name / p["id"]
            d.mkdir(parents=True)
            prob = to_problem(p)
            (d / "problem_description.txt").write_text(prob.description)
            (d / "python_sol.py").write_text(prob.python)
            (d / "q_sol.q").write_text(prob.q)
            (d / "entry.json").write_text(json.dumps({"difficulty": p["difficulty"]}))
            for n, t in enumerate(prob.tests, start=1):
                (d / f"test_case_{n}.py").write_text(t.python + "\n")
                (d / f"q_test_case_{n}.q").write_text(t.q + "\n")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    # ~3.9M parameters (vocab 3514): the Qwen2.5 architecture (GQA, RoPE, SwiGLU, RMSNorm, tied
    # embeddings) at a size that trains a few hundred steps on 2 CPU cores in minutes.
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def main() -> None:
    from transformers import GenerationConfig

    train, test = split(load_problems())
    train_records, test_records = render_split(train), render_split(test)
    for name, records in (("train", train_records), ("test", test_records)):
        write_jsonl(ASSETS / f"q_sft_{name}.jsonl", records)
        write_jsonl(
            ASSETS / f"q_sft_{name}_no_tests.jsonl", [r for r in records if not r["with_tests"]]
        )
    # The tokenizer sees training text only (no held-out problem leaks into its merges).
    # (prompts end with a newline: the text is the raw training format)
    texts = [r["prompt"] + r["completion"] for r in train_records]
    tokenizer = train_tokenizer(texts)
    TINY.mkdir(exist_ok=True)
    tokenizer.save_pretrained(TINY)
    config = tiny_config(tokenizer)
    config.save_pretrained(TINY)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=256,
        do_sample=False,
    ).save_pretrained(TINY)
    print(
        f"{len(train)} train / {len(test)} test problems -> {len(train_records)} / "
        f"{len(test_records)} records; tokenizer vocab {len(tokenizer)}"
    )


if __name__ == "__main__":
    main()
