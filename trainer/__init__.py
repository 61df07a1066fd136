"""qsft: DeepSpeed ZeRO-3 supervised fine-tuning of Qwen2.5-family models on Q (kdb+/q) data."""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Library versions recorded in config.yaml and consolidated manifests (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"qsft": __version__}
    for pkg in ("torch", "deepspeed", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
