"""The shipped demo assets: tokenizer, tiny model config and the Q sample set."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from trainer.assets import build
from trainer.assets.validate import check
from trainer.config import ASSETS_DIR
from trainer.datatools.near_dup import near_duplicate_pairs
from trainer.records import load_records


@pytest.fixture(scope="module")
def problems():
    return build.load_problems()


def test_tokenizer_loads_with_autotokenizer_and_round_trips_q():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_model")
    q = "solve:{[t] select sum qty by sym from t where price>100.5, sym in `a`b}"
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


def test_sample_set_size_difficulty_and_coverage(problems):
    assert len({p["id"] for p in problems}) == len(problems) >= 150
    levels = Counter(p["difficulty"] for p in problems)
    assert set(levels) == {"easy", "medium", "hard"} and min(levels.values()) >= 25
    topics = Counter(t for p in problems for t in p["topics"])
    for topic in (
        "lists",
        "iterators",
        "dictionaries",
        "strings",
        "temporal",
        "tables",
        "qsql",
        "joins",
        "functional",
    ):
        assert topics[topic] >= 8, (topic, topics)
    # The constructs a q programmer uses daily each appear in several solutions.
    constructs = {
        "each": r"\beach\b",
        "over": r"/(?![:/])",
        "scan": r"\\(?!:)",
        "each-prior": r"':",
        "each-left": r"\\:",
        "each-right": r"/:",
        "select": r"\bselect\b",
        "exec": r"\bexec\b",
        "update": r"\bupdate\b",
        "delete": r"\bdelete\b",
        "by": r"\bby\b",
        "fby": r"\bfby\b",
        "xbar": r"\bxbar\b",
        "vs": r"\bvs\b",
        "sv": r"\bsv\b",
        "like": r"\blike\b",
        "functional select": r"\?\[",
        "functional update": r"!\[",
        "dictionary": r"!",
        "temporal cast": r"`(date|month|year|mm|dd|hh|minute|"
        r"second|week|time|timestamp)\$",
    }
    for name, pattern in constructs.items():
        n = sum(bool(re.search(pattern, p["q"])) for p in problems)
        assert n >= 2, (name, n)
    joins = {
        j: sum(bool(re.search(rf"\b{j}\b", p["q"])) for p in problems)
        for j in ("lj", "ij", "ej", "pj", "uj", "aj")
    }
    assert min(joins.values()) >= 1 and sum(joins.values()) >= 10, joins


def test_every_problem_passes_validation(problems):
    """Python solutions pass their tests, every q snippet (solution, test inputs and outputs)
    parses under qls, no near-duplicate descriptions or solutions: see trainer/assets/validate."""
    assert check(problems) == {}


def test_split_by_problem_without_leakage(problems):
    train, test = build.split(problems)
    assert len(test) >= 20 and not {p["id"] for p in train} & {p["id"] for p in test}
    for field in ("description", "q", "python"):
        pairs = near_duplicate_pairs(
            {p["id"]: p[field] for p in train}, {p["id"]: p[field] for p in test}
        )
        assert pairs == [], (field, pairs[:3])
    for level in ("easy", "medium", "hard"):  # the held-out set spans the difficulty levels
        assert any(p["difficulty"] == level for p in test)


def test_shipped_records_match_the_problem_source(problems):
    """q_sft_*.jsonl are exactly what `python -m trainer.assets.build` renders."""
    train, test = build.split(problems)
    for name, part in (("train", train), ("test", test)):
        records = build.render_split(part)
        assert load_records(ASSETS_DIR / f"q_sft_{name}.jsonl") == records
        assert load_records(ASSETS_DIR / f"q_sft_{name}_no_tests.jsonl") == [
            r for r in records if not r["with_tests"]
        ]
        kinds = Counter((r["problem_id"], r["task"], r["with_tests"]) for r in records)
        assert len(kinds) == len(records) == 6 * len(part)  # 3 kinds x {plain, with tests}


def test_completions_are_whole_solutions_that_fit_the_demo_length(problems):
    """No empty or truncated completion: each is the full solution in one closed fence, and
    no rendered record is cut or dropped at the demo's max_seq_length, in either format."""
    from trainer.config import SIZE_DEFAULTS
    from trainer.data import encode
    from trainer.model import load_tokenizer

    by_id = {p["id"]: p for p in problems}
    tok = load_tokenizer(ASSETS_DIR / "tiny_model")
    limit = SIZE_DEFAULTS["tiny"]["max_seq_length"]
    for name in ("train", "test"):
        for r in load_records(ASSETS_DIR / f"q_sft_{name}.jsonl"):
            lang, code = ("python", "python") if r["task"] == "q2py" else ("q", "q")
            assert r["completion"] == f"```{lang}\n{by_id[r['problem_id']][code].strip()}\n```"
            if r["with_tests"]:
                tests = by_id[r["problem_id"]]["tests"]
                assert r["prompt"].count("assert solve(" if lang == "python" else "solve[") >= len(
                    tests
                )
            for fmt in ("raw", "chat"):
                assert len(encode(r, tok, fmt).input_ids) <= limit, (r["id"], fmt)
            # A newline ends every prompt: in the raw format the answer's fence starts a new
            # token instead of merging with the prompt's last one.
            assert r["prompt"].endswith("\n") and not encode(r, tok, "raw").boundary_merged
