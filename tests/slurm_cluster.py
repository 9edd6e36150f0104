"""A real single-node Slurm cluster on localhost for the Slurm tests: munged + slurmctld + slurmd, all
state (and a private munged: its own key and socket) in a temp dir, torn down by PID. Debian's packages:
slurmctld slurmd slurm-client munge.

Settings that decide how a step ends are a production site's (slurm_conf): proctrack/cgroup, so when the
last task of a step on a node exits, whatever else still runs in the step there is killed (a launcher
that exits before its ranks takes their checkpoint with it, as on a real cluster), wherever the cgroup-v1
freezer hierarchy exists (each slurmd gets its own subtree of it, bind-mounted over the freezer mount in
its own mount namespace, so clusters side by side never share a job's cgroup); elsewhere proctrack/linuxproc.
MessageTimeout=10 and KillWait=30 are Slurm's defaults. cred_expire is 10 s, not the default 120 s: a
requeued job may only start again once its old credential has expired, and 120 s per requeue would
dominate the tests. The consequence, that a requeued job (same job id, step numbering restarting at 0) is
back ~11 s after its requeue, while slurmctld may still re-send a kill of the old run's step, is met by
the launchers: a rank's clean stop is no bad exit (launch/notice.sh), so no kill is ever sent for it."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# Pending reasons that no amount of waiting ends: a request the partition cannot hold, a failed dependency.
NEVER_RUNS = {"PartitionConfig", "DependencyNeverSatisfied", "PartitionNodeLimit", "PartitionTimeLimit"}
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(r: Path, ctl_host: str, ctld_port: int, slurmd_port: int, nodes: str, spool: str, auth: str = "") -> str:
    """slurm.conf for a test cluster with all state under `r`; %n in a path is the node name (several slurmd)."""
    return f"""ClusterName=ddtest
SlurmctldHost={ctl_host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo={auth}cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType={proctrack()}
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=30
MessageTimeout=10
MinJobAge=300
SchedulerParameters=sched_interval=1,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


FREEZER = Path("/sys/fs/cgroup/freezer")  # cgroup v1: what proctrack/cgroup needs here
CGROUP_CONF = "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n"


def proctrack() -> str:
    return "proctrack/cgroup" if (FREEZER / "cgroup.procs").is_file() else "proctrack/linuxproc"


def private_freezer(tag: str, command: str) -> str:
    """`command` (sh) in its own mount namespace where the freezer hierarchy is FREEZER/<tag> (see the top)."""
    if proctrack() != "proctrack/cgroup":
        return command
    (FREEZER / tag).mkdir(exist_ok=True)
    return f"unshare --mount --propagation private sh -c 'mount --bind {FREEZER / tag} {FREEZER} && exec {command}'"


def remove_freezer(tag: str) -> None:
    """The subtree once nothing runs in it: cgroups are removed deepest first, with rmdir."""
    top = FREEZER / tag
    if top.is_dir():
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
            try:
                d.rmdir()
            except OSError:
                pass


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus, self.pids = root, cpus, []
        self.host = socket.gethostname().split(".")[0]
        self.tag = f"dd{os.getpid() % 100000}"
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "MUNGE_SOCKET": str(root / "munge" / "munge.sock")}

    def _munge(self) -> None:
        """A private munged: its own key and socket, so no other cluster on the machine is involved."""
        d = self.root / "munge"
        d.mkdir(mode=0o700, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(["/usr/sbin/munged", "-F", "--force", f"--socket={d / 'munge.sock'}", f"--key-file={key}",
                     f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                     f"--seed-file={d / 'munged.seed'}"], "munged")
        for _ in range(100):
            if subprocess.run(["munge", "-n", "-S", str(d / "munge.sock")], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"munged did not start: {(self.root / 'log' / 'munged.stderr').read_text()[-500:]}")

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        p = subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL, start_new_session=True,
                             stderr=open(self.root / "log" / f"{name}.stderr", "w"))
        self.pids.append(p)
        return p

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        try:
            self._munge()
            mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
            node = f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
            self.conf.write_text(slurm_conf(r, self.host, free_port(), free_port(), node, spool=f"{r}/spool",
                                            auth=f"socket={r}/munge/munge.sock,"))
            (r / "cgroup.conf").write_text(CGROUP_CONF)
            self._spawn(["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
            self._spawn(["sh", "-c", "exec " + private_freezer(self.tag, f"/usr/sbin/slurmd -D -f {self.conf}")],
                        "slurmd")
            self._wait_up(1)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_up(self, n_nodes: int) -> None:
        """Until sinfo shows every node usable; else stop and raise with the daemons' log tails."""
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True,
                                 text=True).stdout.split()
            if len(out) == n_nodes and all(s in ("idle", "mix", "alloc") for s in out):
                return
            if any(p.poll() is not None for p in self.pids):
                break
            time.sleep(0.3)
        logs = "".join(f"{f.name}: {f.read_text()[-1500:]}" for f in sorted((self.root / "log").iterdir()))
        self.stop()
        raise RuntimeError(f"Slurm did not come up: {logs}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for p in self.pids:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.pids:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        remove_freezer(self.tag)

    # ---- helpers for tests
    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], env=self.env, capture_output=True, text=True).stdout
        fields = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def _fail_if_never_runs(self, job: str, st: dict) -> None:
        """Fail at once, not at the timeout, when job or a job it waits on is pending for good."""
        if st.get("JobState") != "PENDING":
            return
        if st.get("Reason") in NEVER_RUNS:
            raise AssertionError(f"job {job} can never run ({st['Reason']}): {st}")
        for dep in re.findall(r":(\d+)\(unfulfilled\)", st.get("Dependency", "")):
            dep_st = self.job_state(dep)
            if dep_st.get("JobState") == "PENDING" and dep_st.get("Reason") in NEVER_RUNS:
                raise AssertionError(f"job {job} waits on job {dep}, which can never run ({dep_st['Reason']}): "
                                     f"{dep_st.get('Command')} {dep_st}")

    def wait(self, job: str, timeout: float = 600, states=("COMPLETED",)) -> dict:
        deadline = time.time() + timeout
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                    "BOOT_FAIL", "DEADLINE"}
        while time.time() < deadline:
            st = self.job_state(job)
            if st.get("JobState") in terminal:
                return st
            self._fail_if_never_runs(job, st)
            time.sleep(0.5)
        raise TimeoutError(f"job {job} not finished after {timeout}s: {self.job_state(job)}")
