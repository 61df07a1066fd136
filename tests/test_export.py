"""Real checkpoints in, RL-ready checkpoints out — through the real launcher.

A Qwen2.5-layout model (EOS <|endoftext|>, chat end-of-turn <|im_end|>, base generation config
stopping on <|endoftext|> only) is trained and consolidated; the result is loaded the way TRL's
GRPOTrainer loads it and generates with the saved defaults.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import launch, qwen_layout_model, sharded_model
from trainer.config import ConfigError
from trainer.export import build as build_export
from trainer.model import load_tokenizer
from trainer.tokenized import tokenize_records

# Short, distinct answers that a 3.85M-parameter model over-fits in a few hundred steps.
RECORDS = [
    {"prompt": "Sum a list.\n", "completion": "```q\nsolve:{sum x}\n```"},
    {"prompt": "Reverse a list.\n", "completion": "```q\nsolve:{reverse x}\n```"},
    {"prompt": "Count the items.\n", "completion": "```q\nsolve:{count x}\n```"},
    {"prompt": "Largest item.\n", "completion": "```q\nsolve:{max x}\n```"},
]


def _train(tmp, base, data, *extra, nproc=1):
    out = tmp / "out"
    res = launch(
        "launch/train.py",
        [
            "--model_size",
            "tiny",
            "--base_model",
            str(base),
            "--train_file",
            str(data),
            "--output_dir",
            str(out),
            "--max_seq_length",
            "256",
            "--logging_steps",
            "50",
            *extra,
        ],
        nproc=nproc,
        tmp=tmp,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    return out, res.stdout


def _load_like_trl(path):
    """TRL's loading line (trl/trainer/utils.py, 1.16): the class named by the config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, config.architectures[0]).from_pretrained(path)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.multirank
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_sharded_base_weights_arrive_bit_identical(tmp_path, tied):
    """3 safetensors shards + index, loaded under ZeRO-3 on 2 ranks and checked on each; one
    step at a learning rate too small to move an fp32 weight; the consolidated fp32 export
    equals the input, tensor for tensor, bit for bit."""
    base = sharded_model(tmp_path / "base", tied=tied)
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    out, log = _train(
        tmp_path,
        base,
        data,
        "--max_steps",
        "1",
        "--save_steps",
        "1",
        "--learning_rate",
        "1e-30",
        "--batch_size",
        "1",
        "--no-packing",
        nproc=2,
    )
    assert "checked against the files on every rank" in log
    cons = out / "checkpoints" / "checkpoint-1" / "consolidated"
    given = {}
    for f in base.glob("model-*.safetensors"):
        given.update(load_file(f))
    got = load_file(cons / "model.safetensors")
    assert set(got) == set(given) and ("lm_head.weight" in got) != tied
    for name, value in given.items():
        assert torch.equal(got[name], value), name
    config = json.loads((cons / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["use_cache"] is True
    model, _ = _load_like_trl(cons)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(model.model.embed_tokens.weight, given["model.embed_tokens.weight"])


@pytest.mark.multirank
def test_a_parameter_that_did_not_load_stops_every_rank(tmp_path):
    """Under real ZeRO-3 on 2 ranks: rank 1's share of one parameter differs after the load (as
    if left at its init); every rank stops with one line naming it and the rank, exit 2."""
    base = sharded_model(tmp_path / "base")
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    res = launch(
        "launch/train.py",
        [
            "--model_size",
            "tiny",
            "--base_model",
            str(base),
            "--train_file",
            str(data),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "1",
            "--no-packing",
        ],
        nproc=2,
        tmp=tmp_path,
        timeout=300,
        env={"QSFT_TEST_CORRUPT_LOAD_ON_RANK": "1"},
    )
    assert res.returncode != 0
    errors = [x for x in res.stdout.splitlines() if "qsft: error:" in x]
    assert len(errors) == 1, res.stdout[-3000:]
    assert (
        "rank 1 on" in errors[0]
        and "model.layers.0.mlp.up_proj.weight differs from the weight files" in errors[0]
    ), errors[0]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_export_per_format_on_the_qwen_layout(tmp_path):
    """What each format writes, before any training: the end token learned, then the base's."""
    model = qwen_layout_model(tmp_path / "m")
    tok = load_tokenizer(model)
    chat = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in RECORDS
    ]
    raw = build_export(model, tok, tokenize_records(RECORDS, tok, 256), "auto")
    assert raw.info["prompt_format"] == "raw" and raw.generation_config.eos_token_id == 0
    assert raw.tokenizer is tok and raw.eos_token_id is None  # EOS already ends the answer
    chat = build_export(model, tok, tokenize_records(chat, tok, 256), "auto")
    assert chat.generation_config.eos_token_id == [2, 0]  # <|im_end|>, then <|endoftext|>
    assert (chat.tokenizer.eos_token, chat.eos_token_id) == ("<|im_end|>", 2)
    assert tok.eos_token == "<|endoftext|>"  # the tokenizer in training is not changed
    assert chat.info["end_tokens"] == [{"id": 2, "token": "<|im_end|>", "answers": 4}]


def test_a_base_generation_config_transformers_cannot_save_fails_at_start(tmp_path):
    model = qwen_layout_model(tmp_path / "m")
    (model / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "temperature": 0.7, "eos_token_id": 0})
    )
    tok = load_tokenizer(model)
    with pytest.raises(
        ConfigError,
        match=r"generation_config.json: transformers refuses to save "
        r"it: `temperature`",
    ):
        build_export(model, tok, tokenize_records(RECORDS, tok, 256), "auto")


def _prompt_ids(tok, rec, fmt):
    """How the RL stage must format prompts (README): raw text, or the chat template."""
    if fmt == "raw":
        return tok(rec["prompt"], return_tensors="pt").input_ids
    return tok.apply_chat_template(
        [{"role": "user", "content": rec["prompt"]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


@pytest.mark.multirank
@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_generation_stops_where_training_taught_answers_to_end(tmp_path, fmt):
    base = qwen_layout_model(tmp_path / "base")  # no weights: trained from its seeded init
    if fmt == "raw":
        data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    else:  # messages records: --prompt_format auto picks chat
        data = _jsonl(
            tmp_path / "train.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["completion"]},
                    ]
                }
                for r in RECORDS
            ],
        )
    steps = "100" if fmt == "raw" else "200"  # the chat prompts share a long system prompt
    out, log = _train(
        tmp_path,
        base,
        data,
        "--max_steps",
        steps,
        "--save_steps",
        steps,
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "2",
    )
    cons = out / "checkpoints" / f"checkpoint-{steps}" / "consolidated"
    model, tok = _load_like_trl(cons)
    endoftext, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    end = endoftext if fmt == "raw" else im_end
    # What training taught, recorded everywhere the RL stage or a person looks.
    manifest = json.loads((cons / "manifest.json").read_text())
    recorded = yaml.safe_load((out / "config.yaml").read_text())["data"]
    for info in (manifest, recorded):
        assert info["prompt_format"] == fmt
        assert [e["id"] for e in info["end_tokens"]] == [end]
    assert f"prompt format {fmt}" in log
    # The base model's generation config stopped on <|endoftext|> only; the saved one also stops
    # on the learned end, and in the chat format the tokenizer's EOS is the end of turn.
    eos = model.generation_config.eos_token_id
    assert set(eos if isinstance(eos, list) else [eos]) == {end, endoftext}
    assert tok.eos_token_id == end and model.config.eos_token_id == end
    for rec in RECORDS:
        ids = _prompt_ids(tok, rec, fmt)
        new = model.generate(ids, max_new_tokens=40)[0, ids.shape[1] :].tolist()
        assert new[-1] == end and len(new) < 40, tok.decode(new)  # stopped at the end token
        assert tok.decode(new[:-1]) == rec["completion"]  # and said exactly what it learned
        if fmt == "chat":  # with the base model's stop tokens alone it would run on
            more = model.generate(ids, max_new_tokens=40, eos_token_id=endoftext)
            assert more.shape[1] - ids.shape[1] > len(new)
