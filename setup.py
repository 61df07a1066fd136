"""qsft: DeepSpeed ZeRO-3 supervised fine-tuning of Qwen2.5-family models on Q (kdb+/q) data."""

from setuptools import find_packages, setup

setup(
    name="qsft",
    version="0.1.0",
    description="DeepSpeed-native SFT trainer for code LMs on Q (kdb+/q) examples",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*"]),
    package_data={"trainer.assets": ["*.jsonl", "tiny_model/*"]},
    install_requires=[
        # A range, not a pin: users with a CUDA build of torch keep it. The Makefile installs
        # torch==2.13.0 (the tested CPU build) only when the venv has no torch at all.
        "torch>=2.4,<2.15",
        "deepspeed>=0.18,<0.20",
        "transformers>=5.0,<6",
        # transformers' HfDeepSpeedConfig (ZeRO-3 model construction) requires accelerate.
        "accelerate>=1.1",
        "datasets>=3.0",
        "wandb>=0.19",
        "pydantic>=2.7,<3",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "numpy>=1.26",
        # logs/curves.png and qsft-data inspect's histogram (Agg backend: no display needed)
        "matplotlib>=3.8",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            # qls: the q syntax lint of the shipped sample set (tests)
            "q-lang-server>=1.0.5,<2",
        ],
        "bench": ["trl>=1.0"],
    },
    entry_points={
        "console_scripts": [
            "qsft-config=trainer.ds_config:main",
            "qsft-consolidate=trainer.offline.consolidate:main",
            "qsft-plan=trainer.offline.plan_cli:main",
            "qsft-data=trainer.datatools.cli:main",
            "qsft-eval=trainer.evaluation.cli:main",
        ]
    },
)
