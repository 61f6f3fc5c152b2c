#!/usr/bin/env bash
# The STaR loop: evaluate M_0 (iteration 0), then for i = 1..N: create data with M_{i-1},
# train M_0 on it (never M_{i-1}), evaluate M_i on the dev slice (choose) and the test split (report);
# with --sft, also the vanilla SFT reference; finally write results/summary.{md,png}.
# A rerun skips every stage whose output is complete, so an interrupted loop continues.
# Outputs go to data/ and results/ under the current folder.
#
#   bash run_star.sh                                   # the paper's loop: embedded model, arithmetic set
#   bash run_star.sh --iterations 3 --sft --train_args "--steps 40 --steps_growth 0.2"
#   bash run_star.sh --human_seed 96 --max_samples 192 --tuned_k 0 --create_args "--accumulate --check_steps filter"  # the demo
#   bash run_star.sh --base_model meta-llama/Llama-3.2-3B-Instruct --dataset gsm8k --iterations 3 \
#       --k 10 --max_samples 7273 --eval_samples 1319 --epochs 3 --lr 2e-5 --batch_size 64
#   bash run_star.sh --base_model meta-llama/Llama-3.2-3B-Instruct --launcher "accelerate launch --num_processes 8"
#   bash run_star.sh --launcher "torchrun --standalone --nproc_per_node 2"     # each stage in 2 CPU processes (gloo)
#   sbatch configs/slurm_star.sbatch        # Slurm: generation on the first node, training across the nodes
#   bash run_star.sh --objective rpo --create_args "--num_samples 4"   # STaR's SFT, then DPO + NLL on right/wrong pairs
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}

ITERATIONS=3
BASE_MODEL=smollm2-135m
DATASET=arithmetic
DATA_DIR=""
K=4
MAX_SAMPLES=96            # train questions per iteration (create_data.py --max_samples)
EVAL_SAMPLES=100          # test questions (evaluate.py --max_samples)
DEV_SAMPLES=200           # the train split's last questions, held out: create_data never uses them
DEV_EVAL_SAMPLES=50       # dev questions scored each iteration (0 = none)
HUMAN_SEED=0              # --human_seed N: M_0 trained on N human rationales (the first N train questions) is
                          # iteration 0's model and generates iteration 1's data; --accumulate carries the N on
TUNED_K=""                # --tuned_k: exemplars when the generator is a fine-tuned model (default: --k); 0 prompts
                          # it as train.py taught it, zero-shot (the 96-scratchpad seed model's Stage 1 on 192 questions:
                          # 105 of 107 right answers with all steps true at 0, 0 of 48 at 4)
SFT=0                     # --sft: also train and score M_0 on the human rationales of the same questions
BATCH_SIZE=32             # generation batch (create_data.py and evaluate.py)
TRAIN_BATCH_SIZE=8
EPOCHS=3
LR=1e-4                   # 2e-5 suits a 3B model; the 135M demo model needs more
MAX_NEW_TOKENS=""
ENGINE=""                 # --engine auto|hf|vllm for create_data.py and evaluate.py (their default: auto)
VLLM_ARGS=""              # --vllm_args '{"gpu_memory_utilization": 0.85}': vLLM's engine arguments, both scripts
EXTRA_CREATE=()           # e.g. --create_args "--no_rationalization"
EXTRA_TRAIN=()            # e.g. --train_args "--lora_r 16"
EXTRA_EVAL=()             # e.g. --eval_args "--num_samples 8"
LAUNCHER=()               # --launcher "accelerate launch --num_processes 8": runs create_data.py, train.py and
                          # evaluate.py under it (each script's path and flags follow it); default: $PY alone
TRAIN_LAUNCHER=()         # --train_launcher '...': train.py's own launcher (default: --launcher), e.g. one that spans
                          # nodes while generation stays on this one (configs/slurm_star.sbatch)
DTYPE=""                  # --dtype auto|bf16|fp32 for the three scripts (default: theirs, auto)
OBJECTIVE=sft             # --objective rpo|step_rpo: each iteration trains M_0 on the kept rationales as STaR does
                          # (results/model_star_iter{N}_sft), then a preference phase from that model on the pairs
                          # (data/star_iter{N}_pairs.jsonl, or _step_pairs.jsonl cut at the first false step) at
                          # --pref_lr, the SFT model as DPO's reference; the human seed and vanilla SFT stay SFT
PREF_LR=""                # --pref_lr: the preference phase's rate (default: train.py's, 1e-6; 5e-6 with LoRA)

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; echo "options: --iterations --base_model --dataset --data_dir --k --max_samples --eval_samples --dev_samples --dev_eval_samples --human_seed --tuned_k --batch_size --train_batch_size --epochs --lr --max_new_tokens --engine --vllm_args --dtype --objective --pref_lr --sft --create_args '...' --train_args '...' --eval_args '...' --launcher '...' --train_launcher '...'"; }
while [ $# -gt 0 ]; do
  case "$1" in -h|--help) usage; exit 0 ;; --sft) SFT=1; shift; continue ;; esac
  [ $# -ge 2 ] || { echo "run_star.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --iterations) ITERATIONS=$2 ;;
    --base_model) BASE_MODEL=$2 ;;
    --dataset) DATASET=$2 ;;
    --data_dir) DATA_DIR=$2 ;;
    --k) K=$2 ;;
    --max_samples) MAX_SAMPLES=$2 ;;
    --eval_samples) EVAL_SAMPLES=$2 ;;
    --dev_samples) DEV_SAMPLES=$2 ;;
    --dev_eval_samples) DEV_EVAL_SAMPLES=$2 ;;
    --human_seed) HUMAN_SEED=$2 ;;
    --tuned_k) TUNED_K=$2 ;;
    --batch_size) BATCH_SIZE=$2 ;;
    --train_batch_size) TRAIN_BATCH_SIZE=$2 ;;
    --epochs) EPOCHS=$2 ;;
    --lr) LR=$2 ;;
    --max_new_tokens) MAX_NEW_TOKENS=$2 ;;
    --engine) ENGINE=$2 ;;
    --vllm_args) VLLM_ARGS=$2 ;;
    --create_args) read -r -a EXTRA_CREATE <<< "$2" ;;
    --train_args) read -r -a EXTRA_TRAIN <<< "$2" ;;
    --eval_args) read -r -a EXTRA_EVAL <<< "$2" ;;
    --launcher) read -r -a LAUNCHER <<< "$2" ;;
    --train_launcher) read -r -a TRAIN_LAUNCHER <<< "$2" ;;
    --dtype) DTYPE=$2 ;;
    --objective) OBJECTIVE=$2 ;;
    --pref_lr) PREF_LR=$2 ;;
    *) echo "run_star.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift 2
done

for value in "$HUMAN_SEED" "${TUNED_K:-0}"; do
  case "$value" in ''|*[!0-9]*) echo "run_star.sh: --human_seed and --tuned_k must be counts >= 0 (got '$value')" >&2; exit 2 ;; esac
done
case "$OBJECTIVE" in sft|rpo|step_rpo) ;; *) echo "run_star.sh: --objective must be sft, rpo or step_rpo (got '$OBJECTIVE')" >&2; exit 2 ;; esac
if [ ${#LAUNCHER[@]} -gt 0 ] && ! command -v "${LAUNCHER[0]}" >/dev/null; then
  echo "run_star.sh: --launcher: '${LAUNCHER[0]}' is not a command on this machine" >&2; exit 2
fi
if [ ${#TRAIN_LAUNCHER[@]} -gt 0 ] && ! command -v "${TRAIN_LAUNCHER[0]}" >/dev/null; then
  echo "run_star.sh: --train_launcher: '${TRAIN_LAUNCHER[0]}' is not a command on this machine" >&2; exit 2
fi
[ ${#TRAIN_LAUNCHER[@]} -gt 0 ] || TRAIN_LAUNCHER=("${LAUNCHER[@]}")
DATA=(--dataset "$DATASET" --dev_samples "$DEV_SAMPLES")
[ -n "$DATA_DIR" ] && DATA+=(--data_dir "$DATA_DIR")
GEN=()
[ -n "$MAX_NEW_TOKENS" ] && GEN+=(--max_new_tokens "$MAX_NEW_TOKENS")
[ -n "$ENGINE" ] && GEN+=(--engine "$ENGINE")
[ -n "$VLLM_ARGS" ] && GEN+=(--vllm_args "$VLLM_ARGS")
PRECISION=()
[ -n "$DTYPE" ] && PRECISION=(--dtype "$DTYPE")

run() {  # run SCRIPT flags...: one of the three scripts, under --launcher (train.py: --train_launcher) when given
  local launcher=("${LAUNCHER[@]}")
  [ "$1" = train.py ] && launcher=("${TRAIN_LAUNCHER[@]}")
  if [ ${#launcher[@]} -gt 0 ]; then "${launcher[@]}" "$HERE/$1" "${@:2}"; else "$PY" "$HERE/$1" "${@:2}"; fi
}

stage() {  # stage NAME OUTPUT command...: skip when OUTPUT exists, stop the loop when the command fails
  local name=$1 output=$2; shift 2
  if [ -e "$output" ]; then echo "== $name: $output exists, skipped"; return; fi
  echo "== $name"
  "$@" || { echo "run_star.sh: stage '$name' failed (exit $?); fix it and rerun to continue" >&2; exit 1; }
}

evaluate() {  # evaluate LABEL MODEL: test split (results/eval_LABEL.json) and the dev slice (results/eval_dev_LABEL.json)
  local dev=()  # the dev slice in the same run, on the same engine (evaluate.py writes the test file last)
  [ "$DEV_EVAL_SAMPLES" -gt 0 ] && [ "$DEV_SAMPLES" -gt 0 ] && dev=(--dev_eval_samples "$DEV_EVAL_SAMPLES")
  stage "$1: evaluate on test${dev[*]:+ and dev}" "results/eval_$1.json" \
    run evaluate.py --model "$2" "${DATA[@]}" --max_samples "$EVAL_SAMPLES" "${dev[@]}" --batch_size "$BATCH_SIZE" \
    --output "results/eval_$1.json" "${GEN[@]}" "${PRECISION[@]}" "${@:3}" "${EXTRA_EVAL[@]}" --save_results
}

human_sft() {  # human_sft NAME COUNT DATA MODEL: M_0 fine-tuned on the human rationales of the first COUNT train questions
  stage "$1: human rationales" "$3" \
    run create_data.py --human_rationales "${DATA[@]}" --max_samples "$2" --output "$3"
  stage "$1: train the base model" "$4" \
    run train.py --train_file "$3" --output_dir "$4" --base_model "$BASE_MODEL" \
    --epochs "$EPOCHS" --lr "$LR" --batch_size "$TRAIN_BATCH_SIZE" "${PRECISION[@]}" "${EXTRA_TRAIN[@]}"
}

if [ "$HUMAN_SEED" -gt 0 ]; then  # a warm start (as RFT starts from an SFT model), not in the STaR paper
  human_sft "seed" "$HUMAN_SEED" data/star_iter0_train.jsonl results/model_star_iter0
  evaluate iter0 results/model_star_iter0
else
  evaluate iter0 "$BASE_MODEL" --iteration 0 --k "$K"   # the base model, K-shot
fi
for ((i = 1; i <= ITERATIONS; i++)); do
  GENERATOR=(); SHOTS=$K  # M_{i-1}: create_data.py's default (M_0 at i = 1, K-shot) ...
  if [ "$i" -gt 1 ] || [ "$HUMAN_SEED" -gt 0 ]; then SHOTS=${TUNED_K:-$K}; fi  # ... or a fine-tuned model
  if [ "$i" = 1 ] && [ "$HUMAN_SEED" -gt 0 ]; then GENERATOR=(--model_name results/model_star_iter0); fi
  stage "iteration $i: create data" "data/star_iter${i}_train.jsonl" \
    run create_data.py --iteration "$i" --base_model "$BASE_MODEL" --k "$SHOTS" "${DATA[@]}" \
    --max_samples "$MAX_SAMPLES" --batch_size "$BATCH_SIZE" "${GEN[@]}" "${PRECISION[@]}" "${EXTRA_CREATE[@]}" \
    "${GENERATOR[@]}"
  MODEL=results/model_star_iter$i  # with a preference objective, the SFT phase's model (the phase after it writes MODEL)
  [ "$OBJECTIVE" = sft ] || MODEL=results/model_star_iter${i}_sft
  stage "iteration $i: train the base model" "$MODEL" \
    run train.py --iteration "$i" --base_model "$BASE_MODEL" --epochs "$EPOCHS" --lr "$LR" --output_dir "$MODEL" \
    --batch_size "$TRAIN_BATCH_SIZE" "${PRECISION[@]}" "${EXTRA_TRAIN[@]}"
  PAIRS=data/star_iter${i}_pairs.jsonl; [ "$OBJECTIVE" = step_rpo ] && PAIRS=data/star_iter${i}_step_pairs.jsonl
  if [ "$OBJECTIVE" != sft ] && [ ! -e "results/model_star_iter$i" ] && [ ! -s "$PAIRS" ]; then
    echo "== iteration $i: $PAIRS holds no pair: the iteration's model is its SFT phase"
    ln -s "model_star_iter${i}_sft" "results/model_star_iter$i"
  elif [ "$OBJECTIVE" != sft ]; then
    stage "iteration $i: preference phase ($OBJECTIVE)" "results/model_star_iter$i" \
      run train.py --iteration "$i" --base_model "$MODEL" --objective "$OBJECTIVE" --pairs_only --epochs "$EPOCHS" \
      ${PREF_LR:+--pref_lr "$PREF_LR"} --batch_size "$TRAIN_BATCH_SIZE" "${PRECISION[@]}" "${EXTRA_TRAIN[@]}"
  fi
  evaluate "iter$i" "results/model_star_iter$i" --iteration "$i"
done
if [ "$SFT" = 1 ]; then  # the reference: M_0 fine-tuned on the human rationales of the same train questions
  human_sft "vanilla SFT" "$MAX_SAMPLES" data/sft_train.jsonl results/model_sft
  evaluate sft results/model_sft
fi
"$PY" "$HERE/summary.py"
