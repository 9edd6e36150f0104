# Sourced first thing by the launchers in launch/. Two kinds of stop reach a launcher:
# - A preemption notice (USR1 sent to the step) reaches every process of the step at once: this launcher
#   shell, the ranks, and any helper it runs at that moment. So the launcher sets up with USR1 ignored
#   (helpers like scontrol inherit that), then starts the command with USR1 still ignored and only then
#   catches USR1 itself and writes ready.<task>: slurm/common.sh sends the notice once every task is ready,
#   so it is neither lost nor fatal to a helper. A rank still starting up ignores it (no handler yet); this
#   shell remembers it and, once every target process has its handler (the SigCgt mask in /proc), sends it
#   to them once more. Nothing is re-sent after that.
# - SIGTERM or SIGINT (scancel, preemption with GraceTime, a time limit without --signal, Ctrl-C) to this
#   launcher is handed to the command as SIGTERM (the ranks' stop signal; SIGINT is ignored by commands
#   started in the background), and the launcher keeps waiting for the command: it never exits before its
#   ranks, so a step's cleanup (proctrack/cgroup kills what is left of a task once its leader exits) cannot
#   cut a checkpoint short.
# Exit status: the command's, except that a command which checkpointed and exited 75 under slurm/common.sh
# (DISTILL_DIST_STEP_STATE set) makes the launcher exit 0: each rank has written its stopped.<rank> marker by
# then, which is how common.sh learns of the stop, and a 0 keeps srun's --kill-on-bad-exit from killing
# the step (and every rank still writing its checkpoint) at the first rank that stopped. Run by hand, the
# launcher exits with the command's 75.
# Files for slurm/common.sh, named $DISTILL_DIST_STEP_STATE.*: ready.<task> (above); stopped.<rank> is the
# CLI's own, written once its checkpoint is complete (requeue). The launcher defines notice_targets (prints
# the PIDs to notify) and expected (how many there will be).
pending=0 main=""
EXIT_PREEMPTED=75
trap '' USR1

state_file() {  # $1 = ready
  if [ -n "${DISTILL_DIST_STEP_STATE:-}" ]; then : >"$DISTILL_DIST_STEP_STATE.$1.${SLURM_PROCID:-0}"; fi
}

has_usr1_handler() {
  local mask
  mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) && [ -n "$mask" ] && (( 0x$mask & 1 << 9 ))
}

deliver_notice() {  # until each target has its handler, then USR1 to each of them once
  local targets pid
  while kill -0 "$main" 2>/dev/null; do
    targets=$(notice_targets)
    if [ "$(wc -w <<<"$targets")" -ge "$expected" ]; then
      for pid in $targets; do has_usr1_handler "$pid" || continue 2; done
      kill -USR1 $targets 2>/dev/null
      return
    fi
    sleep 0.2
  done
}

forward_stop() {  # SIGTERM/SIGINT to this shell: SIGTERM to the command, then back to waiting for it
  if [ -n "$main" ]; then kill -TERM "$main" 2>/dev/null; fi
}

run_with_notice() {  # run "$@" with USR1 ignored, deliver a notice as above; return its exit status (see top)
  trap forward_stop TERM INT  # set before the command starts, so the command itself keeps the default action
  "$@" &  # USR1 is still ignored here, so in the command too until it installs its handler
  main=$!
  trap 'pending=1' USR1
  state_file ready
  while kill -0 "$main" 2>/dev/null; do
    if [ "$pending" = 1 ]; then pending=done; deliver_notice; else wait "$main"; fi  # a trap interrupts wait
  done
  wait "$main"; local rc=$?  # once it is gone, wait returns its saved status, not a trap's 128+n
  local who="${RANK:+rank $RANK }on $(hostname -s)"
  if [ "$rc" -gt 128 ]; then echo "launch: $who killed by SIG$(kill -l "$rc")" >&2; fi
  if [ "$rc" -eq "$EXIT_PREEMPTED" ] && [ -n "${DISTILL_DIST_STEP_STATE:-}" ]; then
    echo "launch: $who checkpointed and stopped (exit $rc); exiting 0, the stop is in its stopped marker" >&2
    return 0
  fi
  return "$rc"
}
