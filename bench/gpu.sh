#!/usr/bin/env bash
# GPU throughput of qsft on one GPU: a Qwen2.5-1.5B-shaped model, packed Q data, seq 4096, bf16,
# ZeRO-3, with and without gradient checkpointing (bench/gpu.py does the work; see its docstring).
#
# The GPU machines have torch, transformers and triton but not deepspeed, pydantic or datasets,
# and no network. So, on a machine with PyPI access, first:
#     bench/gpu.sh --fetch-wheels            # fills .whl/ (git-ignored) for Python 3.12 x86-64
# then carry .whl/ with the checkout and, on the GPU machine:
#     bench/gpu.sh [bench/gpu.py flags]      # e.g. --steps 30 --variants no-gc,gc
# It installs the wheels into a private directory (nothing from the network), then runs.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${QSFT_WHEELS:-.whl}
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    target=${2:-3.12}
    mkdir -p "$WHEELS"
    # DeepSpeed publishes a source archive only: build its pure-Python wheel here (no ops).
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==0.19.8" \
        || "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "deepspeed==0.19.8"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$target" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" \
        "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
        "typing-inspection==0.4.5" "hjson==3.1.0" "datasets==5.2.0" "dill==0.4.1" \
        "multiprocess==0.70.19"
    ls -la "$WHEELS"
    exit 0
fi

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    SITE=${QSFT_SITE:-/tmp/qsft-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import deepspeed, pydantic, datasets" \
    || { echo "gpu.sh: deepspeed/pydantic/datasets missing; run bench/gpu.sh --fetch-wheels where pip works and carry $WHEELS" >&2; exit 2; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PY" bench/gpu.py "$@"
