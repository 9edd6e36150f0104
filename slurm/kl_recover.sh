#!/usr/bin/env bash
# KL arm (L2PSD): self-distillation of the pruned student from the frozen teacher, for one keep ratio.
#   sbatch slurm/kl_recover.sh [key=value ...]          e.g. prune.schedule=[0.5] output_dir=runs/keep05
# Edit the #SBATCH lines for your cluster (partition/account, nodes, GPUs, time). Environment: CONFIG
# (default configs/olmo2_7b_csqa.yaml), PYTHON, LAUNCHER (see slurm/common.sh). Multi-node: raise
# --nodes; ranks = nodes x ntasks-per-node (LAUNCHER=launch/torchrun_slurm.sh: one torchrun agent per
# node instead of one task per rank). Preemption: USR1 600 s before the time limit -> checkpoint ->
# requeue -> resume. The lead time must cover one step + a checkpoint, and --time must exceed it by far:
# with --time <= 10 min the notice fires at job start (use e.g. --signal=B:USR1@120 for short jobs).
# Add teacher.source=cache to train from a teacher-logit cache.
#SBATCH --job-name=dd-kl
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --output=%x-%j.out
source "${DISTILL_DIST_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_step train --config "${CONFIG:-configs/olmo2_7b_csqa.yaml}" train.arm=kl "$@"
