#!/usr/bin/env bash
# Teacher-logit cache as a job array: task i computes shard i of N (N = the array size), on one GPU.
# Each task, once its shard is written, verifies all shards; the last to finish writes manifest.json.
# A failed or preempted task is simply re-run: complete shards are skipped, partial ones redone.
#   sbatch --array=0-15 slurm/cache_teacher_logits.sh [key=value ...]     e.g. teacher.top_k=64
# Then: sbatch --dependency=afterok:<array job id> slurm/kl_recover.sh teacher.source=cache
#SBATCH --job-name=dd-cache
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=12
#SBATCH --time=4:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
source "${DISTILL_DIST_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_step cache-teacher --config "${CONFIG:-configs/olmo2_7b_csqa.yaml}" \
  --shard "${SLURM_ARRAY_TASK_ID:?submit as an array: sbatch --array=0-15 ...}" \
  --num-shards "$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))" "$@"
