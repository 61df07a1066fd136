"""Tokenizer and model construction, partitioned by ZeRO-3 as they are created."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer import attention, loss
from trainer.config import ConfigError

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


def has_weights(model_dir: Path) -> bool:
    return any(any(Path(model_dir).glob(g)) for g in WEIGHT_GLOBS)


def check_remote_code(model_dir: Path, trust: bool) -> None:
    """A model directory whose config or tokenizer config maps to its own Python code
    (`auto_map`) for a model or tokenizer transformers does not have would run that code when
    loaded: only with --trust_remote_code. (With a class transformers has, its own is used.)"""
    import json

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for name, native in (
        ("config.json", lambda c: c.get("model_type") in CONFIG_MAPPING_NAMES),
        ("tokenizer_config.json", lambda c: hasattr(transformers, str(c.get("tokenizer_class")))),
    ):
        f = Path(model_dir) / name
        try:
            content = json.loads(f.read_text()) if f.is_file() else {}
        except ValueError:
            continue  # a broken file is reported by the loader, naming it
        if "auto_map" in content and not native(content) and not trust:
            raise ConfigError(
                f"{f}: needs custom code (auto_map) for a class transformers does "
                f"not have; it would run on every rank: pass --trust_remote_code "
                f"if you trust its source"
            )


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer, after checking that the model's config loads too (a ConfigError if not)."""
    from transformers import AutoConfig, AutoTokenizer

    check_remote_code(model_dir, trust_remote_code)
    for what, loader in (("model config", AutoConfig), ("tokenizer", AutoTokenizer)):
        try:
            loaded = loader.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{model_dir}: cannot load the {what}: {first}") from None
    tok = loaded
    if tok.pad_token_id is None:
        # Qwen2.5 ships <|endoftext|> as pad; for a tokenizer without one, padding with EOS is
        # safe because pad positions are masked out of attention and loss.
        tok.pad_token = tok.eos_token
    return tok


def build_model(
    model_dir: Path,
    ds_config: dict[str, Any],
    dtype: torch.dtype,
    gradient_checkpointing: bool,
    seed: int,
    attention_impl: str = "loop",
    loss_impl: str = "chunked",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Create the causal LM with its parameters already sharded across ranks.

    Returns (model, hf_ds_config). The caller must keep `hf_ds_config` alive until
    `deepspeed.initialize`: transformers consults it (a weak global) to construct the model inside
    `deepspeed.zero.Init`, so no rank ever holds the whole model. A model directory without
    weights (the shipped `tiny` demo) is initialised from its config with `seed`. The model gets
    our packed attention (`attention_impl`, see trainer.attention) and our loss (trainer.loss).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    set_seed(seed)  # same init on every rank, whatever the launch order
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    config.use_cache = False  # no KV cache in training (and required by gradient checkpointing)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attention.register(attention_impl),
        trust_remote_code=trust_remote_code,
    )
    if has_weights(model_dir):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss.install(model, loss_impl)
    return model, hf_ds_config


def count_parameters(model: Any) -> int:
    """Parameter count of a possibly ZeRO-3 partitioned model (ds_numel is the full size)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += getattr(p, "ds_numel", p.numel())
    return total
