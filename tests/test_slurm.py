"""The Slurm templates against a real single-node Slurm cluster on localhost (slurmctld + slurmd +
munged): the KL and CE arms, the caching array feeding a KL run, preemption -> checkpoint -> requeue ->
same result, and idempotent resubmission (2 nodes, both launchers, fail-fast and the reproduction graph:
tests/test_slurm_multinode.py). Skipped, with the reason, where
Slurm's packages are not installed (CI installs them)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, missing_binaries  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.multirank,
              pytest.mark.skipif(bool(missing_binaries()) or os.geteuid() != 0,
                                 reason=f"Slurm not installed ({', '.join(missing_binaries())}) or not root: "
                                        "apt-get install slurmctld slurmd slurm-client munge")]
CPU_ARM = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none", "--time=15"]
CPU_ONE = ["--cpus-per-task=1", "--gres=none", "--time=15"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def make_work(models: tuple[Path, Path], root: Path) -> dict:
    """Overrides that train the session's tiny pruned student (conftest.slurm_models) in seconds, writing
    under root, and the environment for the batch scripts."""
    models_dir, data = models
    overrides = [f"model.path={models_dir / 'teacher'}", "model.dtype=float32", f"data.path={data}",
                 "data.max_length=64", "prune.schedule=[0.25]", f"prune.output_dir={models_dir / 'pruned'}",
                 "train.micro_batch_size=2", "train.lr=1e-4", "train.warmup_steps=2", "train.save_every=10",
                 "eval.limit=24", "eval.batch_size=24",
                 "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}",
                 f"output_dir={root}", "teacher.shard_samples=40"]
    env = {"DISTILL_DIST_ROOT": str(REPO), "PYTHON": sys.executable, "MARKER_DIR": str(root / "markers"),
           "OMP_NUM_THREADS": "1"}
    return {"root": root, "overrides": overrides, "env": env}


@pytest.fixture(scope="module")
def work(slurm_models, tmp_path_factory):
    return make_work(slurm_models, tmp_path_factory.mktemp("slurmwork"))


def submit(cluster, work, script, *args, sbatch=CPU_ARM, name=None):
    log = work["root"] / f"{name or Path(script).stem}-%j.out"
    return cluster.sbatch(*sbatch, f"--output={log}", str(REPO / script), *work["overrides"], *args,
                          cwd=REPO, env=work["env"])


def log_of(work, name, job):
    return (work["root"] / f"{name}-{job}.out").read_text()


def finished(cluster, work, job, name, timeout=600):
    st = cluster.wait(job, timeout)
    out = log_of(work, name, job) if (work["root"] / f"{name}-{job}.out").exists() else ""
    assert st["JobState"] == "COMPLETED", f"{st.get('JobState')}: {out[-3000:]}"
    return st, out


def losses(run):
    return [json.loads(l)["loss"] for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


STEPS = 30


@pytest.fixture(scope="module")
def kl_run(cluster, work):
    run = work["root"] / "kl"
    job = submit(cluster, work, "slurm/kl_recover.sh", f"train.max_steps={STEPS}", f"train.output_dir={run}",
                 name="kl")
    t = time.time()
    finished(cluster, work, job, "kl")
    return run, time.time() - t


def test_kl_recover_job_completes(kl_run):
    run, _ = kl_run
    done = json.loads((run / "done.json").read_text())
    assert done["arm"] == "kl" and done["launch"]["world_size"] == 2 and done["teacher"]["source"] == "live"
    assert len(losses(run)) == STEPS
    assert (run / "final" / "config.json").is_file() and (run / "eval" / "eval.json").is_file()
    assert not (run / "checkpoints").exists()  # dropped once final/ was exported: no optimizer state kept
    assert json.loads((run / "exported.json").read_text())["step"] == STEPS


def test_ce_recover_job_completes(cluster, work):
    run = work["root"] / "ce"
    job = submit(cluster, work, "slurm/ce_recover.sh", "train.max_steps=10", f"train.output_dir={run}", name="ce")
    _, out = finished(cluster, work, job, "ce")
    assert json.loads((run / "done.json").read_text())["arm"] == "ce"
    assert "distill-dist[" in out and "done" in out


def test_preempted_job_requeues_and_matches_uninterrupted(cluster, work, kl_run):
    run = work["root"] / "kl_preempted"
    job = submit(cluster, work, "slurm/kl_recover.sh", f"train.max_steps={STEPS}", f"train.output_dir={run}",
                 name="klp")
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len(losses(run)) >= 3:
            break
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True)
    st, out = finished(cluster, work, job, "klp", timeout=600)
    assert st.get("Restarts") == "1", f"{st.get('Restarts')} restarts: {out[-3000:]}"  # one notice, one requeue
    assert "checkpointed and stopped" in out and "requeueing" in out and "resuming from" in out
    assert "User defined signal" not in out and "Terminated" not in out  # no rank or task was killed
    assert losses(run) == losses(kl_run[0])  # the requeued job continued the same curve, bit for bit
    a, b = (json.loads((r / "done.json").read_text())["eval"] for r in (run, kl_run[0]))
    assert a == b


def test_resubmitting_a_finished_job_does_nothing(cluster, work, kl_run):
    run = kl_run[0]
    before = (run / "metrics.jsonl").read_text()
    job = submit(cluster, work, "slurm/kl_recover.sh", f"train.max_steps={STEPS}", f"train.output_dir={run}",
                 name="klagain")
    _, out = finished(cluster, work, job, "klagain")
    assert "nothing to do" in out
    assert (run / "metrics.jsonl").read_text() == before


def test_cache_array_feeds_a_kl_run(cluster, work):
    cache_dir = work["root"] / "cache"
    array = cluster.sbatch(*CPU_ONE, "--array=0-3", f"--output={work['root']}/cache-%A_%a.out",
                           str(REPO / "slurm/cache_teacher_logits.sh"), *work["overrides"],
                           f"teacher.cache_dir={cache_dir}", cwd=REPO, env=work["env"])
    run = work["root"] / "kl_cache"
    job = cluster.sbatch(*CPU_ARM, f"--dependency=afterok:{array}", f"--output={work['root']}/klc-%j.out",
                         str(REPO / "slurm/kl_recover.sh"), *work["overrides"], "teacher.source=cache",
                         f"teacher.cache_dir={cache_dir}", "train.max_steps=5", f"train.output_dir={run}",
                         cwd=REPO, env=work["env"])
    finished(cluster, work, job, "klc")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["num_shards"] == 4 and manifest["num_samples"] == 160
    meta = json.loads((run / "run_meta.json").read_text())
    assert meta["teacher"]["source"] == "cache" and meta["teacher"]["fingerprint"] == manifest["fingerprint_sha256"]
