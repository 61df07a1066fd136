"""What every checkpoint hands downstream besides the weights: the files of its `hf/` directory.

The RL stage (TRL's GRPOTrainer with a vLLM generation server) loads the consolidated directory
by `config.architectures[0]` and generates with its `generation_config.json`, so each checkpoint
records:

- `config.json` naming the class actually trained, with `use_cache` on (off in training);
- `generation_config.json`: the base model's, whose `eos_token_id` holds every token the
  training taught to end an answer, then the base model's own. A Qwen2.5 *base* release stops
  on `<|endoftext|>` only; trained in the chat format, answers end with `<|im_end|>`, and
  without it here generation would run past every answer;
- the tokenizer, whose EOS is the end of an answer (in the chat format, the template's
  end-of-turn token, as in Qwen2.5-Instruct releases). TRL 1.16's GRPOTrainer ends completions
  on the generation config's ids plus the tokenizer's EOS (grpo_trainer.py, `eos_token_ids`),
  and vLLM stops on the generation config's ids too (`update_from_generation_config`); older
  tools and hand-written loops often use `tokenizer.eos_token_id` alone;
- `training_format.json` (consolidation moves it into `manifest.json`): the prompt format and the
  exact end tokens trained.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint.layout import FORMAT_FILE
from trainer.config import ConfigError
from trainer.tokenized import TokenizedSet


@dataclass
class Export:
    tokenizer: Any  # the copy saved with every checkpoint
    generation_config: Any
    info: dict[str, Any]  # prompt format and end tokens: config.yaml, FORMAT_FILE, manifest
    eos_token_id: int | None = None  # config.json's EOS, when the format changes it

    def write(self, hf_dir: Path, model: Any) -> None:
        """Write config, generation config, tokenizer and FORMAT_FILE (rank 0)."""
        hf_dir = Path(hf_dir)
        hf_dir.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(model.config)
        config.use_cache = True  # off for training; what inference downstream wants
        config.architectures = [type(model).__name__]  # e.g. Qwen2ForCausalLM
        if self.eos_token_id is not None:
            config.eos_token_id = self.eos_token_id
        config.save_pretrained(hf_dir)
        self.generation_config.save_pretrained(hf_dir)
        self.tokenizer.save_pretrained(hf_dir)
        (hf_dir / FORMAT_FILE).write_text(json.dumps(self.info, indent=2) + "\n")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def build(model_dir: Path, tokenizer: Any, train: TokenizedSet, requested: str) -> Export:
    """The export for a run trained on `train` in `train.prompt_format`.

    `requested` is --prompt_format as given (auto, raw or chat), recorded beside the result.
    """
    from transformers import AutoConfig, GenerationConfig

    model_dir = Path(model_dir)
    if (model_dir / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(model_dir))
    else:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(model_dir)))
    ends = sorted(train.end_tokens, key=lambda t: -train.end_tokens[t])  # most used first
    base_eos = _ids(gen.eos_token_id)
    stop = list(dict.fromkeys([*ends, *base_eos]))
    if stop:
        # One id as the base releases write it, several as a list (Qwen2.5-Instruct's layout).
        gen.eos_token_id = stop[0] if len(stop) == 1 else stop
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    try:  # what save_pretrained checks: fail here, not at the first checkpoint
        gen.validate(strict=True)
    except ValueError as e:
        first = next((x.strip(" -") for x in str(e).splitlines()[1:] if x.strip()), str(e))
        raise ConfigError(
            f"{model_dir / 'generation_config.json'}: transformers refuses to save it: {first}"
        ) from None
    saved_tokenizer, eos_id = tokenizer, None
    if len(ends) == 1 and ends[0] != tokenizer.eos_token_id:
        # Chat format: the answer ends with the template's end-of-turn token, which becomes
        # the EOS of the fine-tuned model (tokenizer and config.json), as in Qwen2.5-Instruct.
        saved_tokenizer = copy.deepcopy(tokenizer)
        saved_tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ends[0])
        eos_id = ends[0]
    info = dict(
        prompt_format=train.prompt_format,
        prompt_format_flag=requested,
        end_tokens=[
            dict(id=t, token=tokenizer.convert_ids_to_tokens(t), answers=train.end_tokens[t])
            for t in ends
        ],
        eos_token_id=_ids(gen.eos_token_id),
        tokenizer_eos_token=saved_tokenizer.eos_token,
    )
    if train.prompt_format == "raw":
        info["boundary_merged"] = train.boundary_merged
    return Export(saved_tokenizer, gen, info, eos_id)


def describe(info: dict[str, Any]) -> str:
    """One line for the start message."""
    ends = ", ".join(f"{e['token']!r} (id {e['id']})" for e in info["end_tokens"]) or "nothing"
    how = (
        "chosen by --prompt_format auto: "
        + (
            "every training record is prompt/completion"
            if info["prompt_format"] == "raw"
            else "the training data has messages records"
        )
        if info["prompt_format_flag"] == "auto"
        else "--prompt_format"
    )
    text = (
        "prompt + completion + EOS, no template"
        if info["prompt_format"] == "raw"
        else "the tokenizer's chat template"
    )
    return (
        f"prompt format {info['prompt_format']} ({text}; {how}); answers end with {ends}; "
        f"generation stops on {info['eos_token_id']}"
    )
