# make demo / make test create or refresh .venv, install what is missing, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch: a CUDA torch already there is left alone.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.qsft-installed
DEMO_OUT ?= outputs/demo
DEMO_RANKS ?= 2

# 2 ranks on 2 cores: one thread each (the deepspeed launcher does not set it); a stable
# place for DeepSpeed's one-time JIT build of its CPU comm op; nothing from the hub.
# The venv's bin/ first on PATH, as in an activated venv: DeepSpeed's JIT build is keyed on the
# exact compile command, which changes with PATH, and a mismatch rebuilds the op (~60 s) each time.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	port=$$($(PY) -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"); \
	$(VENV)/bin/deepspeed --num_gpus $(DEMO_RANKS) --master_port $$port launch/train.py \
		--model_size tiny --output_dir $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache .ruff_cache *.egg-info
