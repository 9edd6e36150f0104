"""SIGTERM to a launcher in launch/ together with its ranks, as scancel, preemption with GraceTime or a time
limit without --signal send it to every process of a Slurm step: the launcher hands it on, waits, and
exits only once every rank has completed its checkpoint and exited -- with the ranks' 75 when run by hand,
with 0 and the ranks' stopped markers under slurm/common.sh (DISTILL_DIST_STEP_STATE set), so srun's
--kill-on-bad-exit does not kill the step while other ranks are still checkpointing. No Slurm needed: each
launcher runs as one task with the environment srun gives it; real ranks (gloo, ZeRO-3) train a tiny model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distill_dist.checkpoint import latest
from distill_dist.runtime import free_port

from conftest import make_teacher_and_student, rank_processes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank
LAUNCHERS = {"srun": ("launch/srun_tasks.sh", 1), "torchrun": ("launch/torchrun_slurm.sh", 2)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_signals")
    data, _ = make_teacher_and_student(root, n_train=96, n_dev=16, data_seed=13, model_seed=8, teacher_steps=40)
    base = [f"model.path={root / 'teacher'}", f"train.student={root / 'pruned'}", f"data.path={data}",
            "data.max_length=64", "train.micro_batch_size=2", "train.warmup_steps=1", "train.save_every=0",
            "train.max_steps=500", "train.arm=kl", "train.eval_after=false", "train.pg_timeout_minutes=2",
            "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}"]
    return root, base


def start(launcher: str, run: Path, base: list[str], state: Path | None) -> tuple[subprocess.Popen, Path]:
    script, ranks = LAUNCHERS[launcher]
    env = {**os.environ, "SLURM_PROCID": "0", "SLURM_NTASKS": str(ranks), "SLURM_LOCALID": "0",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "GPUS_PER_NODE": str(ranks), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("DISTILL_DIST_STEP_STATE", None)
    if state is not None:
        env["DISTILL_DIST_STEP_STATE"] = str(state)
    if launcher == "srun":
        env["SLURM_NTASKS"] = "1"
    log = run.parent / f"{run.name}.log"
    proc = subprocess.Popen(["bash", str(REPO / script), "train", *base, f"train.output_dir={run}"], cwd=REPO,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def running(rank: psutil.Process) -> bool:
    try:
        return rank.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def n_steps(run: Path) -> int:
    f = run / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


@pytest.mark.parametrize("launcher,under_common", [("srun", False), ("srun", True), ("torchrun", False),
                                                   ("torchrun", True)])
def test_sigterm_to_launcher_and_ranks_exits_after_the_checkpoint(setup, launcher, under_common):
    root, base = setup
    run = root / f"{launcher}_{under_common}"
    state = root / f"state_{launcher}_{under_common}" if under_common else None
    proc, log = start(launcher, run, base, state)
    try:
        deadline = time.time() + 240
        while n_steps(run) < 2:  # every rank has its stop handler by its first step
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == LAUNCHERS[launcher][1], [r.cmdline() for r in ranks]
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher, the ranks (and torchrun's agent) at once
        rc = proc.wait(timeout=240)
        # The moment the launcher is gone: every rank has exited and the checkpoint of the last step is complete.
        alive = [r.pid for r in ranks if running(r)]
        ckpt = latest(run / "checkpoints")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert not alive, f"ranks {alive} outlived their launcher: {out[-3000:]}"
    assert ckpt is not None and ckpt[1]["step"] == n_steps(run) >= 2, out[-3000:]
    assert "killed by" not in out and "Terminated" not in out, out[-3000:]
    if under_common:  # srun must not see a bad exit; slurm/common.sh learns of the stop from the markers
        assert rc == 0, out[-3000:]
        stopped = sorted(p.name for p in root.glob(f"{state.name}.stopped.*"))
        assert stopped == [f"{state.name}.stopped.{r}" for r in range(LAUNCHERS[launcher][1])]
        assert "checkpointed and stopped (exit 75)" in out
    else:
        assert rc == 75, out[-3000:]
    assert json.loads((run / "checkpoints" / ckpt[0].name / "COMPLETE").read_text())["world_size"] == \
        LAUNCHERS[launcher][1]
