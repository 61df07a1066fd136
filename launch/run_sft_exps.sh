#!/usr/bin/env bash
# The five SFT experiments (1.5b, 3b, 7b, 14b, 32b) one after another, like the original
# run_sft_exps.sh, with qsft's launcher, GPU counts and configs. Each size is planned first
# (launch/plan.py: exit 3 = does not fit, and the script stops there).
#
#   MODELS=/models TRAIN_FILE=data/train.jsonl EVAL_FILE=data/test.jsonl \
#     HOSTFILE=launch/hostfile launch/run_sft_exps.sh [SIZES...]     # default: all five
#
# MODELS holds the base models as Qwen2.5-1.5B, Qwen2.5-3B, ... (override one with
# BASE_1_5B=/path, BASE_3B=..., BASE_7B=..., BASE_14B=..., BASE_32B=...). Sizes that fit one
# node run `deepspeed --num_gpus 8` on this node; 32b runs on the first two nodes of HOSTFILE
# (pdsh/ssh mode: run launch/deepspeed_env.sh first so WANDB_*/HF_*/NCCL_* reach every node).
# GPU counts and flags below come from `launch/plan.py ... --gpu_mem 80GB` at --max_seq_length
# 4096 with the per-size micro batch; adjust GPUS_PER_NODE / GPU_MEM for other cards.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-/models}
TRAIN=${TRAIN_FILE:?set TRAIN_FILE (JSONL, parquet or a saved HF dataset dir)}
EVAL=${EVAL_FILE:?set EVAL_FILE}
OUT=${OUT:-final_outputs}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GPU_MEM=${GPU_MEM:-80GB}
HOSTFILE=${HOSTFILE:-launch/hostfile}
PORT=${MASTER_PORT:-29500}
SIZES=("${@:-1.5b 3b 7b 14b 32b}")
read -r -a SIZES <<< "${SIZES[*]}"

base_of() {
    case $1 in
        1.5b) echo "${BASE_1_5B:-$MODELS/Qwen2.5-1.5B}" ;;
        3b) echo "${BASE_3B:-$MODELS/Qwen2.5-3B}" ;;
        7b) echo "${BASE_7B:-$MODELS/Qwen2.5-7B}" ;;
        14b) echo "${BASE_14B:-$MODELS/Qwen2.5-14B}" ;;
        32b) echo "${BASE_32B:-$MODELS/Qwen2.5-32B}" ;;
        *) echo "unknown size $1" >&2; exit 2 ;;
    esac
}

for size in "${SIZES[@]}"; do
    base=$(base_of "$size")
    extra=()
    mb=1  # the per-size micro batch (trainer/config.py SIZE_DEFAULTS), for the plan
    case $size in
        1.5b|3b) nodes=1; mb=2 ;;
        7b) nodes=1 ;;
        14b) nodes=1; extra=(--gradient_checkpointing) ;;
        32b) nodes=2; extra=(--gradient_checkpointing) ;;
    esac
    if (( nodes == 1 )); then
        launcher=(deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$PORT")
        plan_hosts=(--num_nodes 1 --gpus_per_node "$GPUS_PER_NODE")
    else
        hosts=$(mktemp)
        trap 'rm -f "$hosts"' EXIT
        grep -v '^\s*#' "$HOSTFILE" | grep . | head -n "$nodes" > "$hosts"
        (( $(wc -l < "$hosts") == nodes )) || { echo "$HOSTFILE: $size needs $nodes nodes" >&2; exit 2; }
        launcher=(deepspeed --hostfile "$hosts" --master_addr "$(head -n1 "$hosts" | cut -d' ' -f1)"
                  --master_port "$PORT")
        plan_hosts=(--hostfile "$hosts")
    fi
    echo "== $size: ${launcher[*]}" >&2
    python launch/plan.py --model_size "$size" --base_model "$base" "${plan_hosts[@]}" \
        --batch_size "$mb" --gpu_mem "$GPU_MEM" ${extra[@]+"${extra[@]}"} || exit $?
    "${launcher[@]}" launch/train.py --model_size "$size" --base_model "$base" \
        --train_file "$TRAIN" --eval_file "$EVAL" --output_dir "$OUT/$size/" \
        --experiment_name "q-sft-$size" --bf16 --wandb ${extra[@]+"${extra[@]}"}
done
