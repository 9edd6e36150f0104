#!/usr/bin/env bash
# Alternative launcher: one `torchrun` agent per node (call it through `srun --ntasks-per-node=1`),
# c10d rendezvous on the job's first node, GPUS_PER_NODE workers each. A plain torchrun agent dies on
# USR1; here the agent ignores it and the signal is forwarded to the workers, so a preemption still
# ends in a checkpoint.
#   srun --ntasks-per-node=1 launch/torchrun_slurm.sh train --config configs/olmo2_7b_csqa.yaml
set -uo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
nproc=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
( trap '' USR1; exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node "$nproc" \
    --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" --rdzv_id "$SLURM_JOB_ID" -m distill_dist.cli "$@" ) &
agent=$!
trap 'pkill -USR1 -P "$agent"' USR1
while :; do
  wait "$agent"; rc=$?
  kill -0 "$agent" 2>/dev/null || break  # woken by the trap: keep waiting
done
exit "$rc"
