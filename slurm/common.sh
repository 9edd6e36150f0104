# Sourced by the batch scripts in slurm/. Runs one distill-dist command as a Slurm step, forwards a
# preemption signal to it, requeues the job when the step checkpointed and stopped (exit 75), and judges
# success by the completion marker the CLI writes last, not by srun's exit status.
# Environment: DISTILL_DIST_ROOT (repo; default the submit dir), PYTHON (default .venv/bin/python),
# LAUNCHER (launch/srun_tasks.sh, one task per GPU; or launch/torchrun_slurm.sh with one task per node).
set -uo pipefail
cd "${DISTILL_DIST_ROOT:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
export PYTHON=${PYTHON:-$PWD/.venv/bin/python}
LAUNCHER=${LAUNCHER:-launch/srun_tasks.sh}
EXIT_PREEMPTED=75

run_step() {
  local marker_dir=${MARKER_DIR:-runs/.slurm_markers}
  mkdir -p "$marker_dir"
  export DISTILL_DIST_DONE_FILE="$PWD/$marker_dir/${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}.$(date +%s%N).done"
  echo "distill-dist[$SLURM_JOB_ID]: $(date -Is) on $(hostname -s) (restart ${SLURM_RESTART_COUNT:-0}): $*"
  # In the background + wait: bash runs a trap only between commands, never during a foreground srun.
  srun --kill-on-bad-exit=0 "$LAUNCHER" "$@" &
  local step=$! rc preempt=0
  trap 'preempt=1; echo "distill-dist[$SLURM_JOB_ID]: USR1 (preemption notice): forwarding to the step"; kill -USR1 "$step"' USR1
  while :; do
    wait "$step"; rc=$?
    kill -0 "$step" 2>/dev/null || break  # woken by the trap: the step is still checkpointing
    # A notice that lands while the step is still starting is ignored there (launch/srun_tasks.sh):
    # repeat it until the step has stopped.
    while [ "$preempt" = 1 ] && kill -0 "$step" 2>/dev/null; do
      sleep 10 & wait $!
      kill -0 "$step" 2>/dev/null && kill -USR1 "$step"
    done
  done
  trap - USR1
  if [ -f "$DISTILL_DIST_DONE_FILE" ]; then
    rm -f "$DISTILL_DIST_DONE_FILE"
    [ "$rc" -eq 0 ] || echo "distill-dist[$SLURM_JOB_ID]: srun exited $rc after the command had completed; ignored"
    echo "distill-dist[$SLURM_JOB_ID]: done"
    return 0
  fi
  if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
    echo "distill-dist[$SLURM_JOB_ID]: checkpointed and stopped; requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "distill-dist[$SLURM_JOB_ID]: failed (exit $rc, no completion marker)"
  exit "${rc/#0/1}"
}
