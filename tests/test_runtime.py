"""The process layer: the collective-device guard, one place for collectives, and rank-symmetric refusals.

Refusals run as two real rank processes (RANK/WORLD_SIZE/LOCAL_RANK set the way `launch/srun_tasks.sh`
sets them, no torchrun in between) so each rank's own stderr and exit status can be read.
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch

from distill_dist import checkpoint, cli, runtime, signals
from distill_dist.config import TinyModelConfig
from distill_dist.models import build_tiny_model

from conftest import as_ranks, assert_same_refusal

SRC = Path(__file__).resolve().parents[1] / "src" / "distill_dist"


def test_guard_refuses_a_cpu_tensor_under_a_backend_that_needs_cuda():
    t = torch.arange(3, dtype=torch.float64) + 1
    with pytest.raises(RuntimeError, match="collective on a cpu tensor, but the nccl backend needs cuda tensors"):
        runtime.check_comm_device(t, "nccl")
    runtime.check_comm_device(t, "gloo")  # gloo communicates from CPU


def test_every_tensor_collective_goes_through_runtime():
    """The guard is only honest if nothing else issues torch.distributed collectives directly."""
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*|gather\w*|scatter\w*|"
                         r"barrier|send|recv)\(")
    offenders = [f"{p.name}:{i}" for p in SRC.glob("*.py") if p.name != "runtime.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_all_reduce_on_one_rank_returns_its_values():
    rt = runtime.init(1.0)
    try:
        assert rt.world_size == 1 and rt.backend == "gloo"
        assert runtime.all_reduce([1.5, -2.0], "max") == [1.5, -2.0]
    finally:
        runtime.shutdown(clean=True)
    assert "WORLD_SIZE" not in os.environ  # a solo init cleans up after itself


@pytest.mark.multirank
def test_foreign_teacher_is_refused_on_every_rank(refusal_env, tmp_path):
    other = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=128, num_heads=2, num_kv_heads=2,
                                             seed=77), refusal_env["tok"])
    other.save_pretrained(tmp_path / "other")
    codes, errs, s = as_ranks(refusal_env["base"] + ["train.arm=kl", f"model.path={tmp_path / 'other'}",
                                                     f"train.output_dir={tmp_path / 'run'}"])
    assert_same_refusal(codes, errs, s, "is not the checkpoint the student was pruned from")


@pytest.mark.multirank
def test_cache_with_a_loss_it_cannot_serve_is_refused_on_every_rank(refusal_env, tmp_path):
    codes, errs, s = as_ranks(refusal_env["base"] + ["train.arm=kl", "train.loss=reverse_kl", "teacher.source=cache",
                                                     f"teacher.cache_dir={tmp_path / 'cache'}",
                                                     f"train.output_dir={tmp_path / 'run'}"])
    assert_same_refusal(codes, errs, s, "config field 'teacher.source' = 'cache': a teacher-logit cache supports "
                                        "train.loss=kl only, not 'reverse_kl'")


@pytest.mark.multirank
def test_resume_with_another_world_size_is_refused_on_every_rank(refusal_env, tmp_path):
    run = tmp_path / "one_rank"
    with pytest.MonkeyPatch.context() as mp:  # a preemption notice: checkpoint at step 1, exit 75
        mp.setattr(signals, "stop_requested", lambda: True)
        assert cli.main(["train", *refusal_env["base"], "train.arm=ce", f"train.output_dir={run}"]) == 75
    codes, errs, s = as_ranks(refusal_env["base"] + ["train.arm=ce", f"train.output_dir={run}"])
    assert_same_refusal(codes, errs, s, "was written by 1 ranks and this job has 2")


@pytest.mark.multirank
def test_resume_with_a_changed_config_is_refused_on_every_rank(refusal_env, tmp_path):
    run = tmp_path / "two_ranks"
    long = ["train.arm=ce", "train.max_steps=50", f"train.output_dir={run}"]  # stopped by a notice after step 1
    codes, errs, _ = as_ranks(refusal_env["base"] + long, stop_when=lambda: (run / "metrics.jsonl").is_file())
    assert codes == [75, 75], errs
    codes, errs, s = as_ranks(refusal_env["base"] + long + ["train.lr=3e-4"])
    assert_same_refusal(codes, errs, s, "holds a checkpoint of a different run (schedule:")


_SLOW_RANK0 = """
import sys, time
from distill_dist import runtime
runtime.init(timeout_minutes=3 / 60, io_timeout_minutes=2)  # a 3 s process-group timeout
try:
    got = runtime.decide_on_main(lambda: (time.sleep(12), 42)[1], slow=sys.argv[1] == "slow")  # 12 s of "disk work"
    total = runtime.all_reduce([1.0])[0]  # the short-timeout group still works afterwards
    print("result", got, total, flush=True)
    runtime.shutdown(clean=True)
except Exception as e:
    print("failed", type(e).__name__, flush=True)
    sys.exit(1)
"""


@pytest.mark.multirank
@pytest.mark.parametrize("mode", ["slow", "fast"])
def test_waits_for_rank0_disk_work_are_bounded_by_the_io_timeout(mode, free_port):
    """Rank 0 works 12 s while rank 1 waits, under a 3 s process-group timeout: with slow=True (how export,
    pruning between stages and checkpoint commits wait) rank 1 waits on the gloo group bounded by
    io_timeout_minutes and both get the result; in the default group's broadcast (the control) it times out."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _SLOW_RANK0, mode], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port)})
             for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    if mode == "slow":
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all("result 42 2.0" in o for o in outs), outs
    else:
        assert procs[1].returncode != 0 and "result" not in outs[1], outs


# The disk is made slow by a sleep in rank 0's writes (no slow filesystem here); the process-group timeout is
# cut to 3 s once the engine exists (building it takes longer than that on a loaded machine), through
# torch's private _set_pg_timeout: what the checkpoint save does from then on is the real code.
_SLOW_SAVE = """
import datetime, sys, time
from pathlib import Path
import torch.distributed as dist
from distill_dist import checkpoint, engines, runtime
from distill_dist.config import load_config
from distill_dist.losses import LossSpec
mode, model, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
runtime.init(timeout_minutes=2, io_timeout_minutes=2)
cfg = load_config(None, [f"model.path={model}", "train.arm=ce",
                         "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}"])
engine = engines.student_engine(model, cfg, LossSpec("ce"))
if runtime.get().is_main:
    write = engine.checkpoint_engine.save
    engine.checkpoint_engine.save = lambda state_dict, path: (time.sleep(6), write(state_dict, path))
runtime.barrier()
dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=3))
try:
    if mode == "ours":
        checkpoint.save(engine, root, 1, keep=1)
    else:
        engine.save_checkpoint(str(root), tag="step_0000001", save_latest=False)
    total = runtime.all_reduce([1.0])[0]
    print("saved", total, flush=True)
    runtime.shutdown(clean=True)
except Exception as e:
    print("failed", type(e).__name__, str(e)[:200], flush=True)
    sys.exit(1)
"""


def _two_ranks(script: str, args: list[str], port: int) -> tuple[list[int], list[str]]:
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", script, *args], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.multirank
@pytest.mark.parametrize("mode", ["ours", "deepspeed_alone"])
def test_checkpoint_save_waits_for_the_slowest_writer_under_the_io_timeout(mode, tiny_olmo2_dir, tmp_path, free_port):
    """Rank 0 writes its shards 6 s late under a 3 s process-group timeout: checkpoint.save commits complete on
    both ranks (rank 1 waits for it on the slow group, then DeepSpeed's closing barrier returns at once); the
    control, DeepSpeed's save_checkpoint alone, times out in that closing barrier on rank 1."""
    codes, outs = _two_ranks(_SLOW_SAVE, [mode, str(tiny_olmo2_dir), str(tmp_path / "ckpt")], free_port)
    if mode == "ours":
        assert codes == [0, 0] and all("saved 2.0" in o for o in outs), outs
        info = json.loads((tmp_path / "ckpt" / "step_0000001" / checkpoint.COMPLETE_FILE).read_text())
        assert info["world_size"] == 2 and any("optim_states" in f for f in info["files"])
    else:
        assert codes[1] != 0 and "saved" not in outs[1], outs


_SLOW_PRUNE = """
import datetime, sys, time
import torch.distributed as dist
from distill_dist import calibrate, cli, prune
measure, write = calibrate.measure, prune.prune_checkpoint

def measure_then_short_timeout(*a, **k):  # statistics as usual, then a 3 s process-group timeout
    stats = measure(*a, **k)
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=3))
    return stats

calibrate.measure = measure_then_short_timeout
prune.prune_checkpoint = lambda *a, **k: (time.sleep(8), write(*a, **k))[1]  # rank 0's slow disk
sys.exit(cli.main(["prune", *sys.argv[1:]]))
"""


@pytest.mark.multirank
def test_calibrated_prune_others_wait_for_rank0s_write_under_the_io_timeout(tiny_olmo2_dir, tmp_path, free_port):
    """After the statistics, rank 0 streams the pruned checkpoint (8 s here, a sleep standing in for a slow
    disk) under a 3 s process-group timeout: rank 1 waits on the slow group and both ranks get the plan."""
    from distill_dist.hf_checkpoint import load_plan

    calib = tmp_path / "c.jsonl"
    calib.write_text("".join(json.dumps({"text": f"a short story number {i} about a cat"}) + "\n" for i in range(4)))
    args = [f"model.path={tiny_olmo2_dir}", f"prune.output_dir={tmp_path / 'pruned'}", "prune.schedule=[0.5]",
            "prune.score=activation", f"prune.calibration={calib}", "prune.calibration_samples=4",
            "prune.calibration_batch_size=2", "train.pg_timeout_minutes=2", "train.io_timeout_minutes=2"]
    codes, outs = _two_ranks(_SLOW_PRUNE, args, free_port)
    assert codes == [0, 0], outs
    assert load_plan(tmp_path / "pruned")["score"] == "activation"
