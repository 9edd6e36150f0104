#!/usr/bin/env bash
# Table + plots over finished runs; refuses runs whose pruning or schedule differ.
#   sbatch slurm/report.sh RUN_DIR... [report.teacher_eval=DIR] [report.output_dir=DIR]
#SBATCH --job-name=dd-report
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=0:30:00
#SBATCH --output=%x-%j.out
source "${DISTILL_DIST_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_step report --config "${CONFIG:-configs/olmo2_7b_csqa.yaml}" "$@"
