#!/usr/bin/env bash
# Run the distill-dist CLI as one Slurm task per GPU (call it through `srun`): no torchrun, no custom
# process manager. Rank, world size and local rank come from SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID; the rendezvous address is the job's first node. Signals sent to the step (USR1 on
# preemption) reach every rank directly.
#   srun launch/srun_tasks.sh train --config configs/olmo2_7b_csqa.yaml train.arm=kl
set -euo pipefail
export RANK=${SLURM_PROCID:?run me through srun} WORLD_SIZE=${SLURM_NTASKS} LOCAL_RANK=${SLURM_LOCALID}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID} % 20000))}
# USR1 is ignored until the CLI installs its handler (first thing it does): an early preemption notice
# must not kill a rank; slurm/common.sh repeats the notice until the step has stopped.
trap '' USR1
exec "${PYTHON:-python}" -m distill_dist.cli "$@"
