"""qsft: DeepSpeed ZeRO-3 supervised fine-tuning of Qwen2.5-family models on Q (kdb+/q) data."""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Library versions recorded in config.yaml and consolidated manifests."""
    import deepspeed
    import torch
    import transformers

    return {"qsft": __version__, "torch": str(torch.__version__),
            "deepspeed": str(deepspeed.__version__), "transformers": str(transformers.__version__)}
