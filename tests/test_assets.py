"""The shipped demo assets: tokenizer, tiny model config and the Q sample set."""

from __future__ import annotations

import ast
import json
import re

import pytest

from trainer.assets import build
from trainer.config import ASSETS_DIR
from trainer.data import load_records

TRAIN, TEST = ASSETS_DIR / "q_sft_train.jsonl", ASSETS_DIR / "q_sft_test.jsonl"


@pytest.fixture(scope="module")
def problems():
    return build.load_problems()


def test_tokenizer_loads_with_autotokenizer_and_round_trips_q():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_model")
    q = 'solve:{[t] select sum qty by sym from t where price>100.5, sym in `a`b}'
    assert tok.decode(tok(q)["input_ids"]) == q
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.chat_template
    # Trained on Q code: common q tokens are single merges, not byte soup.
    assert len(tok("select sum qty by sym from t")["input_ids"]) <= 8


def test_tiny_config_is_a_few_million_param_tied_qwen2():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS_DIR / "tiny_model")
    assert config.model_type == "qwen2" and config.tie_word_embeddings
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n < 10_000_000
    assert not list(ASSETS_DIR.glob("tiny_model/*.safetensors"))  # config only: no weights


def test_sample_set_size_kinds_and_split_by_problem(problems):
    assert len({p["id"] for p in problems}) == len(problems) >= 40
    train, test = load_records(TRAIN), load_records(TEST)
    for records in (train, test):
        kinds = {}
        for r in records:
            kinds.setdefault(r["problem_id"], set()).add(r["task"])
        assert all(k == {"desc2q", "py2q", "q2py"} for k in kinds.values())
    train_ids = {r["problem_id"] for r in train}
    test_ids = {r["problem_id"] for r in test}
    assert not train_ids & test_ids
    assert len(test_ids) >= 8 and train_ids | test_ids == {p["id"] for p in problems}
    norm = lambda s: re.sub(r"\W+", " ", s.lower()).strip()  # noqa: E731
    by_id = {p["id"]: p for p in problems}
    assert not {norm(by_id[i]["description"]) for i in train_ids} & {
        norm(by_id[i]["description"]) for i in test_ids}


def test_shipped_records_match_the_problem_source(problems):
    """q_sft_*.jsonl are exactly what `python -m trainer.assets.build` renders."""
    train, test = build.split(problems)
    assert load_records(TRAIN) == build.render_records(train)
    assert load_records(TEST) == build.render_records(test)


def test_python_solutions_pass_their_tests(problems):
    for p in problems:
        scope: dict = {}
        exec(p["python"], scope)  # team-written solutions shipped in the repository
        assert len(p["tests"]) >= 2, p["id"]
        for t in p["tests"]:
            got = scope["solve"](*ast.literal_eval(t["input"]))
            assert got == ast.literal_eval(t["output"]), (p["id"], t)


def test_q_solutions_define_solve_with_balanced_brackets(problems):
    pairs = {")": "(", "]": "[", "}": "{"}
    for p in problems:
        code = re.sub(r'"(\\.|[^"\\])*"', '""', p["q"])  # strings may hold any bracket
        assert code.lstrip().startswith("solve:"), p["id"]
        stack = []
        for ch in code:
            if ch in "([{":
                stack.append(ch)
            elif ch in pairs:
                assert stack and stack.pop() == pairs[ch], p["id"]
        assert not stack, p["id"]
        json.dumps(p)  # every field is plain JSON
