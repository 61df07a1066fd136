"""A decoder's shape from its config.json, and what follows by arithmetic: parameter counts and
the bytes of activations one layer keeps per token.

Used by the trainer's disk-space checks (trainer.checkpoint.retention: a checkpoint's size
before one exists) and by the memory planner (trainer.offline.plan), which explains the
activation formula. No weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.config import ConfigError

VOCAB = 151936  # DESIGN.md's Qwen2.5 vocabulary (7B and larger pad it to 152064 in config.json)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Shape:
        try:
            return cls(
                hidden=int(c["hidden_size"]),
                layers=int(c["num_hidden_layers"]),
                heads=int(c["num_attention_heads"]),
                kv_heads=int(c.get("num_key_value_heads", c["num_attention_heads"])),
                intermediate=int(c["intermediate_size"]),
                vocab=int(c.get("vocab_size", VOCAB)),
                tied=bool(c.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ConfigError(f"model config: missing key {e.args[0]!r}") from None

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o
        return attention + 3 * h * i + 2 * h  # gate, up, down; two RMSNorm weights

    def total_params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def largest_layer_params(self) -> int:
        """The most parameters one module holds directly (DeepSpeed's 'largest layer')."""
        h = self.hidden
        return max(self.vocab * h, h * self.intermediate, h * h + h)

    def activation_bytes_per_token_layer(self, e: int) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return 8 * h + e * (9 * h + 4 * kv + 4 * i) + 4 * self.heads
