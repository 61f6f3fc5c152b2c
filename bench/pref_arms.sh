#!/usr/bin/env bash
# Preference phases at one iteration, side by side: from a STaR loop's trained model (the SFT phase of run_star.sh
# --objective rpo|step_rpo), train.py --pairs_only on that iteration's pairs for each objective and rate, each scored as
# run_star.sh scores an iteration (test and dev slice, the demo's sizes). Run it in the loop's folder (data/, results/).
#
#   bash bench/pref_arms.sh                       # iteration 1, rpo and step_rpo at 1e-6 and 1e-5
#   ITERATION=2 ARMS="step_rpo:1e-6" bash bench/pref_arms.sh
#   ARMS="rpo:1e-5 rpo:1e-5:50" bash bench/pref_arms.sh    # a third field: --dpop_lambda (DPO-Positive)
#   ITERATION=3 BASE=results/model_star_iter3_sft EVAL_SAMPLES=500 TRAIN_ARGS="--seed 1" ARMS="rpo:3e-7" bash bench/pref_arms.sh
# BASE: the model the phases start from and are referenced to (default: results/model_star_iter$ITERATION; in a
# run_star.sh --objective rpo folder its SFT phase is results/model_star_iterN_sft); EVAL_SAMPLES: test questions
# (default 100, the demo's); TRAIN_ARGS: more train.py flags for every arm. Per-question results are saved
# (results/eval_<arm>.jsonl) for bench/paired_bootstrap.py.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
ITERATION=${ITERATION:-1}
ARMS=${ARMS:-"rpo:1e-6 step_rpo:1e-6 rpo:1e-5 step_rpo:1e-5"}
BASE=${BASE:-results/model_star_iter$ITERATION}
EVAL_SAMPLES=${EVAL_SAMPLES:-100}
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"
name_of() {  # objective:rate[:lambda] -> the arm's model name
  local objective rate lambda
  IFS=: read -r objective rate lambda <<< "$1"
  echo "pref_${objective}_${rate}${lambda:+_dpop$lambda}_iter$ITERATION"
}
for arm in $ARMS; do
  IFS=: read -r objective rate lambda <<< "$arm"
  name=$(name_of "$arm")
  [ -e "results/model_$name" ] || "$PY" "$HERE/train.py" --iteration "$ITERATION" --objective "$objective" --pairs_only \
    --base_model "$BASE" --pref_lr "$rate" --dpop_lambda "${lambda:-0}" --epochs 3 \
    --batch_size 8 --output_dir "results/model_$name" --report_to none "${TRAIN_ARGS[@]}"
  [ -e "results/eval_$name.json" ] || "$PY" "$HERE/evaluate.py" --model "results/model_$name" --dataset arithmetic \
    --dev_samples 200 --max_samples "$EVAL_SAMPLES" --dev_eval_samples 50 --batch_size 32 --save_results \
    --output "results/eval_$name.json"
done
echo "| model (iteration $ITERATION) | test accuracy | correct, all steps true (test) | dev accuracy |"
echo "|---|---|---|---|"
for name in "star_iter$ITERATION" $(for arm in $ARMS; do name_of "$arm"; done); do
  file=results/eval_$name.json; [ "$name" = "star_iter$ITERATION" ] && file=results/eval_iter$ITERATION.json
  "$PY" -c "import json, sys; t, d = (json.load(open(f)) for f in sys.argv[2:]); print(f'| {sys.argv[1]} | '
    f'{100 * t[\"accuracy\"]:.1f}% | {100 * t[\"accuracy_faithful\"]:.1f}% | {100 * d[\"accuracy\"]:.1f}% |')" \
    "$name" "$file" "$(dirname "$file")/eval_dev_${file#results/eval_}"
done
