"""The Slurm templates on a real 2-node cluster (two network namespaces on a bridge, tests/netns_cluster.py):
the KL arm on 2 nodes x 1 rank with each launcher equals the 1-node curve; a preemption notice or SIGTERM to
the step with each launcher, on a deliberately loaded CPU, ends in checkpoint -> one requeue -> the same curve
and eval; a rank
killed on node 2 fails the job within seconds and a resubmission resumes from the last complete checkpoint;
the reproduction graph with several seeds runs to a report. Skipped, with the reason, where not root, where
Slurm or iproute2 is missing, or where network namespaces cannot be created."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netns_cluster import NetnsCluster, netns_skip_reason  # noqa: E402
from test_slurm import REPO, losses, make_work  # noqa: E402

SKIP = netns_skip_reason()
pytestmark = [pytest.mark.multirank, pytest.mark.skipif(SKIP is not None, reason=f"2-node Slurm cluster: {SKIP}")]
STEPS = 16
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none", "--time=15"]
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none", "--time=15"]
LAUNCHERS = {"srun": "launch/srun_tasks.sh", "torchrun": "launch/torchrun_slurm.sh"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = NetnsCluster(tmp_path_factory.mktemp("netns")).start()
    yield c
    c.stop()
    assert not any(Path(f"/run/netns/{ns}").exists() for ns in c.netns), "namespaces left behind"


@pytest.fixture(scope="module")
def work(slurm_models, tmp_path_factory):
    w = make_work(slurm_models, tmp_path_factory.mktemp("mnwork"))
    w["overrides"] = [o for o in w["overrides"] if not o.startswith("train.save_every")] + ["train.save_every=4"]
    return w


@contextmanager
def cpu_load(n: int = 2):
    """n busy-loop processes for the duration: slow teardowns become part of the test, not luck."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_job(cluster, work, name, *args, sbatch=TWO_NODES, launcher="srun", overrides=()):
    log = work["root"] / f"{name}-%j.out"
    env = {**work["env"], "LAUNCHER": LAUNCHERS[launcher]}
    job = cluster.sbatch(*sbatch, f"--output={log}", str(REPO / "slurm/kl_recover.sh"), *work["overrides"],
                         f"train.max_steps={STEPS}", *overrides, *args, cwd=REPO, env=env)
    return job, Path(str(log).replace("%j", job))


def finished(cluster, job, log, timeout=300, state="COMPLETED"):
    st = cluster.wait(job, timeout)
    out = log.read_text() if log.exists() else ""
    assert st["JobState"] == state, f"{st.get('JobState')}: {out[-4000:]}"
    return st, out


def poll(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise TimeoutError(f"not after {timeout}s: {what}")


def n_losses(run):
    return len(losses(run)) if (run / "metrics.jsonl").is_file() else 0


def eval_of(run):
    return json.loads((run / "done.json").read_text())["eval"]


@pytest.fixture(scope="module")
def one_node_run(cluster, work):
    """The reference: the same 2 ranks on one node."""
    run = work["root"] / "one_node"
    job, log = run_job(cluster, work, "one", f"train.output_dir={run}", sbatch=ONE_NODE)
    _, out = finished(cluster, job, log)
    assert "on node1" in out and json.loads((run / "done.json").read_text())["launch"]["world_size"] == 2
    return run


PREEMPTIONS = [("srun", "USR1", "mid-training"), ("torchrun", "USR1", "at start-up"), ("srun", "TERM", "mid-training"),
               ("torchrun", "TERM", "mid-training")]


def stop_moment_reached(run: Path, log: Path, when: str) -> bool:
    if when == "mid-training":
        return n_losses(run) >= 3
    return log.exists() and "on node1" in log.read_text()  # the batch script started, the ranks not yet


@pytest.fixture(scope="module")
def preemptions(cluster, work):
    """Every preemption job submitted at once, each stopped once at its moment, all on a loaded CPU: their
    start-ups, requeue delays (cred_expire) and restarts overlap instead of adding up (Slurm runs two of
    them at a time: each takes one CPU of each node). -> {case: (scontrol fields, log text, run dir)}."""
    jobs = {}
    # under pytest-xdist the other worker's tests are the second load
    with cpu_load(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2):
        for launcher, signal_name, when in PREEMPTIONS:
            run = work["root"] / f"preempt_{launcher}_{signal_name}"
            job, log = run_job(cluster, work, f"pre_{launcher}_{signal_name}", f"train.output_dir={run}",
                               launcher=launcher)
            jobs[launcher, signal_name, when] = job, log, run
        pending = dict(jobs)
        deadline = time.time() + 600
        while pending:
            for (launcher, signal_name, when), (job, log, run) in list(pending.items()):
                if stop_moment_reached(run, log, when):
                    # USR1 to the batch shell, which forwards it (slurm/common.sh); SIGTERM to every step
                    # but the batch step: every launcher, torchrun agent and rank, as GraceTime preemption
                    where = ["--batch"] if signal_name == "USR1" else []
                    subprocess.run(["scancel", f"--signal={signal_name}", *where, job], env=cluster.env, check=True)
                    del pending[launcher, signal_name, when]
            assert time.time() < deadline, f"no stop moment after 600s: {pending}"
            time.sleep(0.1)
        results = {}
        for case, (job, log, run) in jobs.items():
            st = cluster.wait(job, timeout=600)
            results[case] = st, log.read_text() if log.exists() else "", run
    return results


@pytest.mark.parametrize("launcher,signal_name,when", PREEMPTIONS)
def test_preemption_requeues_and_matches_on_a_loaded_cpu(preemptions, one_node_run, launcher, signal_name, when):
    """2 nodes x 1 rank with each launcher equals the 1-node run, through one stop: a notice (USR1) during
    training, one that lands while the ranks are still starting (before their handler is up), or SIGTERM to
    every process of the step (launchers, torchrun's agents, ranks) as scancel and preemption with GraceTime
    send it. Each ends in a complete checkpoint and exactly one requeue, never in a killed rank or step."""
    st, out, run = preemptions[launcher, signal_name, when]
    assert st["JobState"] == "COMPLETED", f"{st.get('JobState')}: {out[-4000:]}"
    assert st.get("Restarts") == "1", f"{st.get('Restarts')} restarts: {out[-4000:]}"  # one stop, one requeue
    assert st["NodeList"] == "node[1-2]" and json.loads((run / "done.json").read_text())["launch"]["world_size"] == 2
    assert "checkpointed and stopped" in out and "requeueing" in out and "resuming from" in out
    assert "User defined signal" not in out and "killed by" not in out  # no rank was killed by the stop
    assert "Terminated" not in out and not re.search(r"distill-dist\[\d+\]: failed", out)  # no task killed
    assert losses(run) == losses(one_node_run)  # bit for bit, across the requeue
    assert eval_of(run) == eval_of(one_node_run)


def rank_pids_in(netns: str) -> list[int]:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            if b"distill_dist.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_killed_rank_fails_fast_and_a_resubmission_resumes(cluster, work, one_node_run):
    run = work["root"] / "killed"
    job, log = run_job(cluster, work, "killed", f"train.output_dir={run}")
    latest = run / "checkpoints" / "latest_complete"
    poll(lambda: latest.is_file() and n_losses(run) >= 6, 240, "a complete checkpoint and 2 more steps")
    (victim,) = rank_pids_in(cluster.netns[1])
    os.kill(victim, signal.SIGKILL)
    t = time.time()
    _, out = finished(cluster, job, log, state="FAILED")
    took = time.time() - t
    assert took < 60, f"the job took {took:.0f}s to fail"  # seconds (KillWait=10), not the process-group timeout
    assert re.search(r"launch: rank 1 on node2 killed by SIGKILL", out), out[-3000:]
    assert "failed (exit" in out
    step = latest.read_text().strip()
    job2, log2 = run_job(cluster, work, "resumed", f"train.output_dir={run}")
    _, out2 = finished(cluster, job2, log2)
    assert f"resuming from {run / 'checkpoints' / step}" in out2
    assert losses(run) == losses(one_node_run)


def test_reproduce_graph_with_seeds_runs_to_a_report(cluster, work):
    """slurm/reproduce.sh on 2 nodes at the smallest sizes: every arm x seed is its own run (train.seed),
    every checkpoint goes to the edge (GGUF + llama.cpp eval, on 1 CPU here: EDGE_ARGS), the pruned model is
    evaluated before recovery, the report job gets all of them."""
    out = work["root"] / "repro"
    env = {**cluster.env, **work["env"], "OUT": str(out), "KEEP_RATIOS": "0.5", "DATA_SIZES": "120", "SEEDS": "0 1",
           "TEACHER_SOURCE": "live", "SBATCH_ARGS": "--gres=none --time=15",
           "ARM_ARGS": "--nodes=2 --ntasks-per-node=1 --cpus-per-task=1", "ONE_ARGS": "--ntasks=1 --cpus-per-task=1",
           "EDGE_ARGS": "--cpus-per-task=1 --mem=4G", "EXPORT_TYPES": "q8_0"}
    overrides = [o for o in work["overrides"] if not o.startswith(("prune.", "output_dir="))] + ["train.max_steps=4",
                                                                                            "export.pre_tokenizer=gpt-2"]
    proc = subprocess.run(["bash", str(REPO / "slurm/reproduce.sh"), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    runs = [Path(l.split("-> ")[1]) for l in lines if ", seed " in l]
    assert sorted(r.name for r in runs) == ["ce_s0", "ce_s1", "kl_s0", "kl_s1"]
    report_job = lines[-1].split()[1]
    st = cluster.wait(report_job, timeout=600)
    assert st["JobState"] == "COMPLETED", proc.stdout + "".join(
        p.read_text()[-1500:] for p in (out / "logs").glob("*.out"))
    report_log = (out / "logs" / f"dd-report-{report_job}.out").read_text()
    assert all(str(r) in report_log for r in runs)  # the report got every run
    report_md = (out / "report" / "report.md").read_text()
    assert "### On the edge device" in report_md and "q8_0" in report_md  # the edge evals reached the report
    for row in ("| pruned, before recovery |", "| KL − pruned |", "| CE − pruned |"):  # the pruned model's eval did
        assert row in report_md, report_md
    edge_evals = sorted(p.parent.parent.name for p in (out / "edge").rglob("eval-q8_0/eval.json"))
    assert edge_evals == sorted(["teacher", "pruned", "ce_s0", "ce_s1", "kl_s0", "kl_s1"])
    for arm in ("ce", "kl"):
        s0, s1 = (losses(out / f"keep0.5/n120/{arm}_s{seed}") for seed in (0, 1))
        assert len(s0) == len(s1) == 4 and s0 != s1  # train.seed reached the run: another data order
