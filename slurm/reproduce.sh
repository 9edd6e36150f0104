#!/usr/bin/env bash
# The whole reproduction as one Slurm dependency graph (afterok), printing every job id:
#   teacher eval, teacher-logit cache (array) and one prune per keep ratio x prune score, each pruned model
#   evaluated before recovery ($OUT/eval/pruned/keep<r>[/<score>]: the report's "pruned, before recovery"
#   rows and arm - pruned comparisons)
#   -> CE and KL arms for every keep ratio x score x training-set size x seed -> report (table + plots);
#   teacher, each pruned model and each arm also go to the edge: GGUF export + llama.cpp eval (CPU jobs,
#   slurm/export_eval.sh, in $OUT/edge/), which the report's edge tables read.
#   bash slurm/reproduce.sh [key=value ...]          # overrides go to every job
# Environment (defaults sized for OLMo2-7B on 8-GPU nodes):
#   CONFIG=configs/olmo2_7b_csqa.yaml  OUT=runs/reproduce  KEEP_RATIOS="0.7 0.5 0.3"
#   DATA_SIZES="1000 4000 9741"  SEEDS="0 1 2" (train.seed; each seed is one run of each arm, in
#   $OUT/keep<r>/n<n>/<arm>_s<seed>)  TEACHER_SOURCE=cache (or live)  CACHE_SHARDS=16
#   SCORES="gate_up_down" (prune.score; several, e.g. "gate_up_down activation wanda taylor", make the
#   score x loss study: runs under $OUT/keep<r>/<score>/..., the report compares the scores within each arm)
#   CALIBRATION=train (prune.calibration for the calibration scores; or a jsonl path); their prune job runs
#   the model's forward (taylor: + backward) on a GPU: CALIB_ARGS="--gres=gpu:1 --cpus-per-task=12 --mem=64G"
#   (with --ntasks=N --gres=gpu:N the calibration is ZeRO-3 sharded over N ranks)
#   SBATCH_ARGS="--partition=... --account=..." (every job); ARM_ARGS, CACHE_ARGS, ONE_ARGS, EDGE_ARGS (extra
#   sbatch options for the training jobs, the cache array, the single-task jobs, and the edge jobs, e.g. a
#   CPU partition); EXPORT_TYPES="f16 q8_0 q4_k_m" (the GGUF types).
set -euo pipefail
cd "${DISTILL_DIST_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export DISTILL_DIST_ROOT=$PWD
CONFIG=${CONFIG:-configs/olmo2_7b_csqa.yaml}; export CONFIG
OUT=${OUT:-runs/reproduce}
KEEP_RATIOS=${KEEP_RATIOS:-0.7 0.5 0.3}
DATA_SIZES=${DATA_SIZES:-1000 4000 9741}
SEEDS=${SEEDS:-0 1 2}
SCORES=${SCORES:-gate_up_down}
CALIBRATION=${CALIBRATION:-train}
TEACHER_SOURCE=${TEACHER_SOURCE:-cache}
CACHE_SHARDS=${CACHE_SHARDS:-16}
read -r -a sbatch_all <<<"${SBATCH_ARGS:-}"
read -r -a arm_args <<<"${ARM_ARGS:-}"
read -r -a cache_args <<<"${CACHE_ARGS:-}"
read -r -a one_args <<<"${ONE_ARGS:-}"
read -r -a edge_args <<<"${EDGE_ARGS:-}"
read -r -a calib_args <<<"${CALIB_ARGS:---gres=gpu:1 --cpus-per-task=12 --mem=64G}"
mkdir -p "$OUT/logs"

submit() {  # prints the job id; logs go to $OUT/logs
  local id
  id=$(sbatch --parsable --output="$OUT/logs/%x-%j.out" "${sbatch_all[@]}" "$@") || { echo "sbatch failed: $*" >&2; exit 1; }
  echo "${id%%;*}"
}
common=("output_dir=$OUT" "teacher.cache_dir=$OUT/teacher_cache" "$@")

teacher_eval=$(submit "${one_args[@]}" slurm/eval.sh "eval.output_dir=$OUT/eval/teacher" "${common[@]}")
echo "teacher eval: $teacher_eval"
cache_dep=""
if [ "$TEACHER_SOURCE" = cache ]; then
  cache=$(submit --output="$OUT/logs/%x-%A_%a.out" "${cache_args[@]}" --array=0-$((CACHE_SHARDS - 1)) slurm/cache_teacher_logits.sh "${common[@]}")
  echo "teacher-logit cache (array of $CACHE_SHARDS): $cache"
  cache_dep=":$cache"
fi
edge_ids=()
edge_ids+=("$(submit "${edge_args[@]}" slurm/export_eval.sh "" "$OUT/edge/teacher" "${common[@]}")")
echo "teacher on the edge: ${edge_ids[-1]}"
read -r -a scores <<<"$SCORES"
train_ids=() run_dirs=() pruned_evals=()
for r in $KEEP_RATIOS; do
  for score in "${scores[@]}"; do
    base="$OUT/keep$r"
    [ "${#scores[@]}" -gt 1 ] && base+="/$score"
    pruning=("prune.schedule=[$r]" "prune.score=$score" "prune.calibration=$CALIBRATION" "prune.output_dir=$base/pruned")
    case "$score" in activation|wanda|taylor) extra=("${calib_args[@]}") ;; *) extra=() ;; esac
    prune=$(submit "${one_args[@]}" "${extra[@]}" slurm/prune.sh "${pruning[@]}" "${common[@]}")
    echo "prune keep $r, score $score: $prune"
    pruned_evals+=("$(submit "${one_args[@]}" --dependency="afterok:$prune" slurm/eval.sh \
      "eval.model=$base/pruned" "eval.output_dir=$OUT/eval/pruned/${base#"$OUT"/}" "${common[@]}")")
    echo "pruned keep $r, score $score, before recovery: eval ${pruned_evals[-1]}"
    edge_base="$OUT/edge/${base#"$OUT"/}"
    edge_ids+=("$(submit "${edge_args[@]}" --dependency="afterok:$prune" slurm/export_eval.sh "$base/pruned" \
      "$edge_base/pruned" "${common[@]}")")
    for n in $DATA_SIZES; do
      for seed in $SEEDS; do
        for arm in ce kl; do
          dep="afterok:$prune"
          [ "$arm" = kl ] && dep+="$cache_dep"
          dir="$base/n$n/${arm}_s$seed"
          id=$(submit "${arm_args[@]}" --dependency="$dep" "slurm/${arm}_recover.sh" "${pruning[@]}" \
            "data.train_examples=$n" "train.seed=$seed" "train.output_dir=$dir" \
            "teacher.source=$TEACHER_SOURCE" "${common[@]}")
          echo "  $arm keep $r, $score, $n examples, seed $seed: $id -> $dir"
          train_ids+=("$id") run_dirs+=("$dir")
          edge_ids+=("$(submit "${edge_args[@]}" --dependency="afterok:$id" slurm/export_eval.sh "$dir/final" \
            "$edge_base/n$n/${arm}_s$seed" "${common[@]}")")
        done
      done
    done
  done
done
echo "edge (export + llama.cpp eval) jobs: ${edge_ids[*]}"
deps=$(IFS=:; echo "${train_ids[*]}:${edge_ids[*]}:${pruned_evals[*]}")
report=$(submit "${one_args[@]}" --dependency="afterok:$deps:$teacher_eval" slurm/report.sh "${run_dirs[@]}" \
  "report.teacher_eval=$OUT/eval/teacher" "report.pruned_eval=$OUT/eval/pruned" "report.output_dir=$OUT/report" \
  "report.edge=[$OUT/edge]" "${common[@]}")
echo "report: $report -> $OUT/report/report.md"
