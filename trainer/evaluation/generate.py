"""Answers from a checkpoint, in the prompt format it was trained with and with its stop tokens.

The format comes from the consolidated checkpoint's manifest.json (written from the run's
training_format.json): `raw` feeds the prompt text as trained (prompt, then the completion
follows directly), `chat` renders the conversation up to the assistant turn with the tokenizer's
chat template and its generation prompt. Generation stops at the end tokens training taught
(the manifest's `end_tokens`) as well as the model's generation config EOS.

On a GPU with vLLM installed, vLLM generates (continuous batching, paged attention: the fast
path for many samples); otherwise transformers' batched `generate()` (CPU, or a GPU without
vLLM). Both sample with the given seed; vLLM and transformers do not draw the same samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data import render
from trainer.records import to_messages


class FormatError(ValueError):
    """The model directory does not say how it was trained, and no --prompt_format was given."""


def read_format(model_dir: Path, override: str | None = None) -> tuple[str, list[int]]:
    """(prompt format, end-token ids) from the checkpoint's manifest.json, or `override`."""
    manifest = Path(model_dir) / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        fmt = override or info.get("prompt_format")
        ends = [int(e["id"]) for e in info.get("end_tokens", [])]
        if fmt:
            return fmt, ends
    if override:
        return override, []
    raise FormatError(
        f"{model_dir}: no manifest.json naming the prompt format (not a qsft consolidated "
        f"checkpoint); pass --prompt_format raw or chat"
    )


def prompt_text(record: dict[str, Any], tokenizer: Any, prompt_format: str) -> str:
    """What the model sees before its answer, exactly as training laid it out: the raw prompt,
    or the rendered conversation up to where its last answer starts (trainer.data.render)."""
    if prompt_format == "raw":
        return record["prompt"]
    messages = to_messages(record)
    if messages[-1]["role"] != "assistant":  # no answer given: add one to find where it starts
        messages = [*messages, {"role": "assistant", "content": ""}]
    text, spans = render(messages, tokenizer)
    return text[: spans[-1][0]]


def stop_ids(model_dir: Path, ends: list[int], tokenizer: Any) -> list[int]:
    """The learned end tokens first, then the generation config's EOS."""
    ids = list(ends)
    gen = Path(model_dir) / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    for e in [eos] if isinstance(eos, int) else eos or [tokenizer.eos_token_id]:
        if e is not None and e not in ids:
            ids.append(int(e))
    return ids


def have_vllm() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@dataclass
class Sampling:
    samples: int  # completions per prompt
    temperature: float  # 0: greedy
    max_new_tokens: int
    seed: int
    stops: list[int]  # token ids that end an answer


def generate(
    model_dir: Path, prompts: list[str], how: Sampling, prompt_format: str, batch_size: int = 8
) -> tuple[list[list[str]], str]:
    """`how.samples` completions per prompt (text before the first stop token), and the engine.

    Prompts are tokenized as training tokenized them: raw text with the tokenizer's special
    tokens (as `tokenizer(text)`), chat text without (the template already wrote them).
    """
    special = prompt_format == "raw"
    if have_vllm():
        return _vllm(model_dir, prompts, how, special), "vllm"
    return _transformers(model_dir, prompts, how, special, batch_size), "transformers"


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def _transformers(
    model_dir: Path, prompts: list[str], how: Sampling, special: bool, batch_size: int
) -> list[list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"  # generation continues each row from its last real token
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    torch.manual_seed(how.seed)
    out: list[list[str]] = []
    stop_set, samples = set(how.stops), how.samples
    for i in range(0, len(prompts), batch_size):
        batch = tok(
            prompts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=special,
        ).to(device)
        sampling = dict(do_sample=True, temperature=how.temperature, top_p=1.0, top_k=0)
        with torch.no_grad():
            ids = model.generate(
                **batch,
                max_new_tokens=how.max_new_tokens,
                num_return_sequences=samples,
                eos_token_id=how.stops,
                pad_token_id=tok.pad_token_id,
                **(sampling if how.temperature > 0 else dict(do_sample=False)),
            )
        new = ids[:, batch["input_ids"].shape[1] :].tolist()
        texts = [tok.decode(_cut(row, stop_set)) for row in new]
        out += [texts[j : j + samples] for j in range(0, len(texts), samples)]
    return out


def _vllm(
    model_dir: Path, prompts: list[str], how: Sampling, special: bool
) -> list[list[str]]:  # pragma: no cover - needs a GPU and vLLM
    import gc

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(p, add_special_tokens=special)["input_ids"] for p in prompts]
    llm = LLM(model=str(model_dir), seed=how.seed)
    params = SamplingParams(
        n=how.samples,
        temperature=how.temperature,
        max_tokens=how.max_new_tokens,
        seed=how.seed,
        stop_token_ids=how.stops,
        skip_special_tokens=False,
    )
    try:
        results = llm.generate([{"prompt_token_ids": x} for x in ids], params)
        return [[o.text for o in r.outputs] for r in results]
    finally:  # --checkpoints loads one model after another: free this one's GPU memory
        del llm
        gc.collect()
        torch.cuda.empty_cache()
