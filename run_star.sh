#!/usr/bin/env bash
# The STaR loop: evaluate M_0 (iteration 0), then for i = 1..N: create data with M_{i-1},
# train M_0 on it (never M_{i-1}), evaluate M_i; finally write results/summary.{md,png}.
# A rerun skips every stage whose output is complete, so an interrupted loop continues.
# Outputs go to data/ and results/ under the current folder.
#
#   bash run_star.sh                                   # the demo: embedded model, arithmetic set
#   bash run_star.sh --base_model meta-llama/Llama-3.2-3B-Instruct --dataset gsm8k --iterations 3 \
#       --k 10 --max_samples 7473 --eval_samples 1319 --epochs 3 --lr 2e-5 --batch_size 64
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}

ITERATIONS=2
BASE_MODEL=smollm2-135m
DATASET=arithmetic
DATA_DIR=""
K=4
MAX_SAMPLES=96            # train questions per iteration (create_data.py --max_samples)
EVAL_SAMPLES=100          # test questions (evaluate.py --max_samples)
BATCH_SIZE=32             # generation batch (create_data.py and evaluate.py)
TRAIN_BATCH_SIZE=8
EPOCHS=3
LR=1e-4                   # 2e-5 suits a 3B model; the 135M demo model needs more
MAX_NEW_TOKENS=""
EXTRA_CREATE=()           # e.g. --create_args "--no_rationalization"
EXTRA_TRAIN=()            # e.g. --train_args "--lora_r 16"

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; echo "options: --iterations --base_model --dataset --data_dir --k --max_samples --eval_samples --batch_size --train_batch_size --epochs --lr --max_new_tokens --create_args '...' --train_args '...'"; }
while [ $# -gt 0 ]; do
  case "$1" in -h|--help) usage; exit 0 ;; esac
  [ $# -ge 2 ] || { echo "run_star.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --iterations) ITERATIONS=$2 ;;
    --base_model) BASE_MODEL=$2 ;;
    --dataset) DATASET=$2 ;;
    --data_dir) DATA_DIR=$2 ;;
    --k) K=$2 ;;
    --max_samples) MAX_SAMPLES=$2 ;;
    --eval_samples) EVAL_SAMPLES=$2 ;;
    --batch_size) BATCH_SIZE=$2 ;;
    --train_batch_size) TRAIN_BATCH_SIZE=$2 ;;
    --epochs) EPOCHS=$2 ;;
    --lr) LR=$2 ;;
    --max_new_tokens) MAX_NEW_TOKENS=$2 ;;
    --create_args) read -r -a EXTRA_CREATE <<< "$2" ;;
    --train_args) read -r -a EXTRA_TRAIN <<< "$2" ;;
    *) echo "run_star.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift 2
done

DATA=(--dataset "$DATASET")
[ -n "$DATA_DIR" ] && DATA+=(--data_dir "$DATA_DIR")
GEN=()
[ -n "$MAX_NEW_TOKENS" ] && GEN+=(--max_new_tokens "$MAX_NEW_TOKENS")

stage() {  # stage NAME OUTPUT command...: skip when OUTPUT exists, stop the loop when the command fails
  local name=$1 output=$2; shift 2
  if [ -e "$output" ]; then echo "== $name: $output exists, skipped"; return; fi
  echo "== $name"
  "$@" || { echo "run_star.sh: stage '$name' failed (exit $?); fix it and rerun to continue" >&2; exit 1; }
}

stage "iteration 0: evaluate the base model ($K-shot)" results/eval_iter0.json \
  "$PY" "$HERE/evaluate.py" --iteration 0 --base_model "$BASE_MODEL" --k "$K" "${DATA[@]}" \
  --max_samples "$EVAL_SAMPLES" --batch_size "$BATCH_SIZE" "${GEN[@]}" --save_results
for ((i = 1; i <= ITERATIONS; i++)); do
  stage "iteration $i: create data" "data/star_iter${i}_train.jsonl" \
    "$PY" "$HERE/create_data.py" --iteration "$i" --base_model "$BASE_MODEL" --k "$K" "${DATA[@]}" \
    --max_samples "$MAX_SAMPLES" --batch_size "$BATCH_SIZE" "${GEN[@]}" "${EXTRA_CREATE[@]}"
  stage "iteration $i: train the base model" "results/model_star_iter$i" \
    "$PY" "$HERE/train.py" --iteration "$i" --base_model "$BASE_MODEL" --epochs "$EPOCHS" --lr "$LR" \
    --batch_size "$TRAIN_BATCH_SIZE" "${EXTRA_TRAIN[@]}"
  stage "iteration $i: evaluate" "results/eval_iter$i.json" \
    "$PY" "$HERE/evaluate.py" --iteration "$i" "${DATA[@]}" --max_samples "$EVAL_SAMPLES" --batch_size "$BATCH_SIZE" \
    "${GEN[@]}" --save_results
done
"$PY" "$HERE/summary.py"
