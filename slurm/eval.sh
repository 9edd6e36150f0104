#!/usr/bin/env bash
# Evaluate a checkpoint on CSQA (e.g. the unpruned teacher, for the report's "delta vs teacher").
#   sbatch slurm/eval.sh eval.model=PATH eval.output_dir=DIR [key=value ...]
#SBATCH --job-name=dd-eval
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=12
#SBATCH --time=2:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
source "${DISTILL_DIST_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_step eval --config "${CONFIG:-configs/olmo2_7b_csqa.yaml}" "$@"
