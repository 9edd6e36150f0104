"""Kills at the worst moments: `kill -9` of one rank mid-step, of both ranks while a checkpoint is being
written and while the student is being exported, plus a torn last line in metrics.jsonl (a kill during
an append). Each re-run resumes from the last complete checkpoint; the chain ends with exactly the loss
curve and evaluation of an uninterrupted run. Real torchrun jobs, 2 gloo ranks, ZeRO-3."""
import json
import signal
import subprocess
import sys
import os
import time

import pytest

from distill_dist.checkpoint import read_metrics
from distill_dist.runtime import free_port

from conftest import make_teacher_and_student, rank_processes

STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    data, _ = make_teacher_and_student(root, n_train=96, n_dev=16, data_seed=11, model_seed=6, teacher_steps=40)
    base = [f"model.path={root / 'teacher'}", f"train.student={root / 'pruned'}", f"data.path={data}",
            "data.max_length=64", "train.micro_batch_size=2", "train.warmup_steps=1", "train.save_every=3",
            f"train.max_steps={STEPS}", "train.arm=kl", "eval.limit=16", "train.pg_timeout_minutes=2",
            "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}"]
    return {"root": root, "base": base}


def launch(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "distill_dist.cli", "train", *args]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_when(proc, ready, which: slice, timeout: float = 300) -> None:
    """SIGKILL the chosen workers as soon as `ready()` holds; then let torchrun wind the job down."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            for w in rank_processes(proc.pid)[which]:
                w.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]


def test_kills_and_torn_metrics_resume_to_the_uninterrupted_result(setup):
    root, base = setup["root"], setup["base"]
    ref = root / "uninterrupted"
    p = launch(base + [f"train.output_dir={ref}"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

    run = root / "killed"
    args = base + [f"train.output_dir={run}"]
    ckpts = run / "checkpoints"
    # 1. one rank, mid-step (after step 4, between checkpoints 3 and 6)
    kill_when(launch(args), lambda: len(read_metrics(run / "metrics.jsonl")) >= 4, slice(1, 2))
    assert (ckpts / "latest_complete").read_text().strip() == "step_0000003"
    # 2. a kill during an append left half a line
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')
    # 3. both ranks, as soon as the step-9 checkpoint directory appears (mid-write at the latest)
    kill_when(launch(args), lambda: (ckpts / "step_0000009").exists(), slice(None))
    assert (ckpts / "latest_complete").read_text().strip() in ("step_0000006", "step_0000009")
    # 4. both ranks, while the final student is being exported
    kill_when(launch(args), lambda: any(p.name.startswith(".final.tmp") for p in run.iterdir()), slice(None))
    assert not (run / "done.json").exists()
    # 5. the last re-run finishes
    p = launch(args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in b] == [m["loss"] for m in a]  # bit for bit
    assert [m["grad_norm"] for m in b] == [m["grad_norm"] for m in a]
    ea, eb = (json.loads((d / "eval" / "eval.json").read_text())["metrics"] for d in (ref, run))
    assert ea == eb
    assert not [p.name for p in run.iterdir() if p.name.startswith(".final")]  # no export debris
