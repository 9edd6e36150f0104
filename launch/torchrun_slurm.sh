#!/usr/bin/env bash
# Alternative launcher: one `torchrun` agent per node, GPUS_PER_NODE workers each, c10d rendezvous on the
# job's first node. slurm/common.sh runs it as one task per node (LAUNCHER=launch/torchrun_slurm.sh):
#   srun --ntasks-per-node=1 launch/torchrun_slurm.sh train --config configs/olmo2_7b_csqa.yaml
# The agent ignores USR1; workers still starting up get the notice once their handler is up
# (launch/notice.sh). SIGTERM/SIGINT to the agent (from this launcher or from Slurm) is handed to its workers
# as SIGTERM, the agent's own handler (which would stop them and give up their exit codes) replaced: the
# workers checkpoint and exit 75, and the agent then exits 75 too (plain torchrun exits 1 with a
# ChildFailedError), so the job is requeued, not failed; any other failure stays a failure.
#   MASTER_ADDR (default the job's first node), MASTER_PORT, GPUS_PER_NODE (workers per node).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/notice.sh"
head_node=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
expected=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
notice_targets() { pgrep -P "$main"; }
# 75 if a worker exited 75 and the others exited 75 or were stopped by the agent after it (a signal).
agent='import os, signal, socket, sys
import psutil
import torch.distributed.elastic.multiprocessing.api as elastic
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

def on_signal(signum, frame):
    if signum not in (signal.SIGTERM, signal.SIGINT):
        return torch_handler(signum, frame)
    for worker in psutil.Process().children():  # SIGTERM/SIGINT: a stop request for the workers
        try:
            os.kill(worker.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

torch_handler, elastic._terminate_process_handler = elastic._terminate_process_handler, on_signal
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
