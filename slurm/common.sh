# Sourced by the batch scripts in slurm/. Runs one distill-dist command as a Slurm step and judges the
# outcome by files, not by srun's exit status: the completion marker the CLI writes last -> success; a rank's
# stopped marker (the CLI writes it once it has checkpointed after a stop signal, then exits 75) or a step
# exit of 75 -> requeue; anything else -> the job fails
# with the step's real exit status.
# Preemption: USR1 to this batch shell (#SBATCH --signal=B:USR1@600, or scancel --signal=USR1 --batch) is
# sent to the step once, as soon as every task's launcher is up; the launcher hands it to ranks that are
# still starting up (launch/notice.sh). It is never repeated: a repeat could hit a rank on its way out.
# Fail fast: srun --kill-on-bad-exit=1, so a rank that dies takes the step (every node) down at once; its
# error line ("distill-dist: error: ..." or srun's "task N: Killed") is in this log. A rank that checkpointed
# and stopped is no bad exit: its launcher exits 0 and the stop is in the rank's stopped marker
# (launch/notice.sh), so the ranks still writing their part of the checkpoint are left to finish it.
# SIGTERM to the step (scancel, preemption with GraceTime, a time limit) is a stop like the notice: the
# launchers hand it to the ranks and wait for them (launch/notice.sh).
# Environment: DISTILL_DIST_ROOT (repo; default the submit dir), PYTHON (default .venv/bin/python),
# LAUNCHER: launch/srun_tasks.sh (default: one task per GPU) or launch/torchrun_slurm.sh (one torchrun agent
# per node, --ntasks-per-node workers each), MARKER_DIR (state files; on a filesystem every node sees).
set -uo pipefail
notice=0
trap 'notice=1' USR1  # from the first line: an early notice must neither kill this shell nor be lost
cd "${DISTILL_DIST_ROOT:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
export PYTHON=${PYTHON:-$PWD/.venv/bin/python}
LAUNCHER=${LAUNCHER:-launch/srun_tasks.sh}
EXIT_PREEMPTED=75

log() { echo "distill-dist[$SLURM_JOB_ID]: $*"; }

step_layout() {  # step_opts (extra srun options) and step_tasks for $LAUNCHER
  case "$LAUNCHER" in
    *torchrun*)
      export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_NNODES))}}
      step_tasks=$SLURM_NNODES
      step_opts=(--ntasks="$step_tasks" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE") ;;
    *) step_tasks=${SLURM_NTASKS:-1} step_opts=() ;;
  esac
}

count_state() { compgen -G "$DISTILL_DIST_STEP_STATE.$1.*" | wc -l; }

forward_notice() {  # USR1 to the step, once, when every task's launcher catches it
  log "USR1 (preemption notice): forwarding to the step"
  while kill -0 "$step" 2>/dev/null; do
    if [ "$(count_state ready)" -ge "$step_tasks" ]; then kill -USR1 "$step"; return; fi
    sleep 0.5
  done
}

run_step() {
  local marker_dir=${MARKER_DIR:-runs/.slurm_markers} rc forwarded=0
  [[ $marker_dir = /* ]] || marker_dir=$PWD/$marker_dir
  mkdir -p "$marker_dir"
  export DISTILL_DIST_STEP_STATE="$marker_dir/${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}.$(date +%s%N)"
  export DISTILL_DIST_DONE_FILE=$DISTILL_DIST_STEP_STATE.done
  step_layout
  log "$(date -Is) on $(hostname -s) (restart ${SLURM_RESTART_COUNT:-0}): $*"
  srun --kill-on-bad-exit=1 "${step_opts[@]}" "$LAUNCHER" "$@" &
  step=$!
  while kill -0 "$step" 2>/dev/null; do
    if [ "$notice" = 1 ] && [ "$forwarded" = 0 ]; then forwarded=1; forward_notice; else wait "$step"; fi
  done
  wait "$step"; rc=$?  # once the step is gone: its saved status, not the 128+n of a trap-interrupted wait
  judge_step "$rc"
}

judge_step() {
  local rc=$1 stopped
  stopped=$(count_state stopped)
  rm -f "$DISTILL_DIST_STEP_STATE".ready.* "$DISTILL_DIST_STEP_STATE".stopped.*
  if [ -f "$DISTILL_DIST_DONE_FILE" ]; then
    rm -f "$DISTILL_DIST_DONE_FILE"
    [ "$rc" -eq 0 ] || log "srun exited $rc after the command had completed; ignored"
    log "done"
    return 0
  fi
  if [ "$stopped" -gt 0 ] || [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
    log "checkpointed and stopped (step exit $rc); requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  log "failed (exit $rc, no completion marker)"
  exit "${rc/#0/1}"
}
