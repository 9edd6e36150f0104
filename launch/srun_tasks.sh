#!/usr/bin/env bash
# Run the distill-dist CLI as one Slurm task per GPU (call it through `srun`, as slurm/common.sh does): no
# torchrun, no custom process manager. Rank, world size and local rank come from SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID; the rendezvous address is the job's first node (or MASTER_ADDR). A preemption
# notice (USR1 to the step) reaches every rank, also one still starting up; SIGTERM/SIGINT to this launcher
# goes on to its rank, whose status it then waits for (launch/notice.sh: signals and exit status).
#   srun launch/srun_tasks.sh train --config configs/olmo2_7b_csqa.yaml train.arm=kl
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/notice.sh"
export RANK=${SLURM_PROCID:?run me through srun} WORLD_SIZE=${SLURM_NTASKS} LOCAL_RANK=${SLURM_LOCALID}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
expected=1
notice_targets() { echo "$main"; }
run_with_notice "${PYTHON:-python}" -m distill_dist.cli "$@"
