# Sourced first thing by the launchers in launch/. A preemption notice (USR1 sent to the step) reaches every
# process of the step at once, this launcher shell included; a rank still starting up ignores it (USR1 is
# ignored until the CLI installs its handler). This shell remembers the notice and, once every target
# process has its handler (the SigCgt mask in /proc), sends it to them once more: a notice that lands during
# start-up is delivered late instead of lost, and nothing is ever re-sent once delivered.
# Files for slurm/common.sh, named $DISTILL_DIST_STEP_STATE.*: ready.<task> once this shell catches USR1
# (from then on one USR1 to the step is enough), stopped.<task> when the command exited 75 (it checkpointed).
# The launcher defines notice_targets (prints the PIDs to notify) and expected (how many there will be).
EXIT_PREEMPTED=75
pending=0 main=""
trap 'pending=1' USR1

state_file() {  # $1 = ready|stopped
  if [ -n "${DISTILL_DIST_STEP_STATE:-}" ]; then : >"$DISTILL_DIST_STEP_STATE.$1.${SLURM_PROCID:-0}"; fi
}
state_file ready

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

run_with_notice() {  # run "$@" with USR1 ignored, deliver a notice as above; return its real exit status
  (trap '' USR1; exec "$@") &
  main=$!
  while kill -0 "$main" 2>/dev/null; do
    if [ "$pending" = 1 ]; then pending=done; deliver_notice; else wait "$main"; fi  # a trap interrupts wait
  done
  wait "$main"; local rc=$?  # once it is gone, wait returns its saved status, not a trap's 128+n
  if [ "$rc" = "$EXIT_PREEMPTED" ]; then state_file stopped; fi
  if [ "$rc" -gt 128 ]; then echo "launch: ${RANK:+rank $RANK }on $(hostname -s) killed by SIG$(kill -l "$rc")" >&2; fi
  return "$rc"
}
