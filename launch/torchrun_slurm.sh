#!/usr/bin/env bash
# Alternative launcher: one `torchrun` agent per node, GPUS_PER_NODE workers each, c10d rendezvous on the
# job's first node. slurm/common.sh runs it as one task per node (LAUNCHER=launch/torchrun_slurm.sh):
#   srun --ntasks-per-node=1 launch/torchrun_slurm.sh train --config configs/olmo2_7b_csqa.yaml
# The agent ignores USR1; workers still starting up get the notice once their handler is up
# (launch/notice.sh). Workers that checkpointed and exited 75 make the agent exit 75 too (plain torchrun
# exits 1 with a ChildFailedError), so the job is requeued, not failed; any other failure stays a failure.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/notice.sh"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
expected=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
notice_targets() { pgrep -P "$main"; }
# 75 if a worker exited 75 and the others exited 75 or were stopped by the agent after it (a signal).
agent='import socket, sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main()
except ChildFailedError as e:
    codes = [f.exitcode for f in e.failures.values()]
    if 75 in codes and all(c == 75 or c < 0 for c in codes):
        sys.exit(75)
    rank, first = e.get_first_failure()
    how = f"killed by {first.signal_name()}" if first.exitcode < 0 else f"exit {first.exitcode}"
    sys.exit(f"launch: worker rank {rank} on {socket.gethostname()} failed first ({how})")'
run_with_notice "${PYTHON:-python}" -c "$agent" --nnodes "$SLURM_NNODES" --nproc_per_node "$expected" \
  --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" --rdzv_id "$SLURM_JOB_ID" -m distill_dist.cli "$@"
