"""qsft: DeepSpeed ZeRO-3 supervised fine-tuning of Qwen2.5-family models on Q (kdb+/q) data."""

__version__ = "0.1.0"
