#!/usr/bin/env bash
# Write ./.deepspeed_env so that `deepspeed --hostfile` (pdsh/ssh mode) sets the same variables on
# every node as in this shell. DeepSpeed's runner forwards only a few prefixes on its own
# (PYTHON*, MLFLOW*, UCX*, MV2*, and NCCL*/CUDA_* from the GPU accelerator) plus the lines of
# ./.deepspeed_env or ~/.deepspeed_env. This adds what qsft runs rely on: WANDB_*, HF_*,
# HUGGING_FACE_*, TRANSFORMERS_*, NCCL_*, TORCH_*, OMP_NUM_THREADS, TOKENIZERS_PARALLELISM, PATH
# (so the nodes find the same venv) and LD_LIBRARY_PATH.
#
#   launch/deepspeed_env.sh            # then: deepspeed --hostfile H launch/train.py ...
#
# The file may hold secrets (WANDB_API_KEY, HF_TOKEN): it is written mode 600 and git-ignored.
# DeepSpeed's parser takes KEY=VALUE per line with no comments or blank lines, and a value
# cannot span lines; DeepSpeed pastes values into a double-quoted shell word, so variables whose
# value holds a newline, ", `, $ or \\ are skipped with a warning.
# Not needed with --no_ssh (one launcher per node, e.g. under srun): each node's launcher passes
# its own environment to its ranks.
set -euo pipefail
out=${1:-.deepspeed_env}
umask 077
tmp=$(mktemp "${out}.XXXXXX")
python3 - "$tmp" <<'PY'
import os, re, sys
prefixes = ("WANDB_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "NCCL_", "TORCH_")
exact = {"OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PATH", "LD_LIBRARY_PATH"}
lines = []
for key in sorted(os.environ):
    if not (key.startswith(prefixes) or key in exact) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        continue
    value = os.environ[key]
    if "\n" in value or any(c in value for c in '"`$\\'):
        # DeepSpeed pastes values into a shell command inside double quotes
        print(f"deepspeed_env.sh: skipping {key}: newline or shell quote in its value",
              file=sys.stderr)
        continue
    lines.append(f"{key}={value}")
open(sys.argv[1], "w").write("".join(line + "\n" for line in lines))
print(f"{len(lines)} variables", file=sys.stderr)
PY
mv "$tmp" "$out"
echo "wrote $out" >&2
