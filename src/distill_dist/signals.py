"""Stop signals: Slurm's preemption notice (SIGUSR1) or SIGTERM asks for a checkpoint, then exit 75.

The handler only sets a flag; the loop checks it (agreed across ranks) at the end of each step. It is
installed first thing by the CLI and stays installed until the process exits, so a notice that lands
during start-up, after the checkpoint, or while the ranks are exiting is harmless; just before the
interpreter tears down (when Python would restore the default, fatal action) the notices are ignored.
"""
from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # "try again": the Slurm wrapper requeues on it
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_STOP = {"requested": False}


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written and the job should be requeued."""


def install_stop_handlers() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop)


def _on_stop(*_) -> None:
    _STOP["requested"] = True


def stop_requested() -> bool:
    return _STOP["requested"]


def ignore_further_notices() -> None:
    """At exit: interpreter teardown resets Python-level handlers to the default action (terminate), but
    leaves SIG_IGN alone, so a late repeat of the notice cannot kill a rank that already checkpointed."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
