"""A real 2-node Slurm cluster on one machine: each node is a Linux network namespace on a private bridge.

Layout (all as root, all state under one temp dir, nothing of the machine's /etc touched):
  bridge <tag>br 10.<a>.<b>.1/24 in the host namespace, the controller's address: slurmctld runs there in its
  own UTS namespace (hostname == SlurmctldHost) and the test process talks to it through slurm.conf.
  node i: network namespace <tag>n<i>, veth pair to the bridge, address 10.<a>.<b>.(10+i), entered with
  `nsenter --net=... unshare --mount --uts` (not `ip netns exec`, which remounts /sys and hides the cgroup
  tree slurmd 22.05 needs), hostname node<i>, a private /etc/hosts bind-mounted in its own mount namespace
  (node names must resolve to bridge addresses, or gloo falls back to 127.0.0.1), `slurmd -N node<i>`.
  One private munged (its own key and socket) serves every namespace: a Unix socket is a file path.
  With proctrack/cgroup (tests/slurm_cluster.py) each node's mount namespace also has its own freezer
  subtree bind-mounted over the freezer hierarchy: Slurm names its cgroups by node (slurm_node1/...), and
  a second test cluster on the machine has nodes of the same names and job ids.
Teardown kills only the processes started here (by PID, plus whatever still runs inside our namespaces),
then deletes the namespaces (their veths go with them) and the bridge.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import (CGROUP_CONF, FREEZER, SlurmCluster, free_port, missing_binaries, proctrack, remove_freezer,
                           slurm_conf)

NETNS_TOOLS = ("ip", "nsenter", "unshare", "mount", "pgrep")


def netns_skip_reason() -> str | None:
    """Why the 2-node cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = missing_binaries() + [t for t in NETNS_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install slurmctld slurmd slurm-client munge iproute2"
    probe = f"ddprobe{os.getpid() % 100000}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces here (ip netns add failed)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 no interface of this machine uses (picked from the PID, so concurrent runs differ)."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    pid = os.getpid()
    for k in range(256):
        net = ipaddress.ip_network(f"10.{200 + (pid + k) % 50}.{(pid // 50 + k) % 256}.0/24")
        if f" {str(net.network_address)[:-1]}" not in used:  # " 10.x.y." of any address in it
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet")


class NetnsCluster(SlurmCluster):
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2):
        super().__init__(root, cpus)
        tag = f"dd{os.getpid() % 100000}"
        self.bridge, self.tag = f"{tag}br", tag
        self.netns = [f"{tag}n{i}" for i in range(1, nodes + 1)]
        self.names = [f"node{i}" for i in range(1, nodes + 1)]
        self.subnet = _free_subnet()
        self.ctl_addr = str(self.subnet.network_address + 1)
        self.addrs = [str(self.subnet.network_address + 10 + i) for i in range(1, nodes + 1)]
        self.host, self.made_links = f"{tag}ctl", False

    # ---- network
    def _network(self) -> None:
        self.made_links = True
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.ctl_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.netns, self.addrs), 1):
            host_end, node_end = f"{self.tag}h{i}", f"{self.tag}v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", node_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", node_end)
            _ip("-n", ns, "link", "set", node_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        hosts = ["127.0.0.1 localhost", f"{self.ctl_addr} {self.host}"]
        hosts += [f"{a} {n}" for a, n in zip(self.addrs, self.names)]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")

    def in_node(self, i: int, command: str) -> list[str]:
        """argv running `command` (sh) as node i: its network, its own mount + UTS namespaces, its /etc/hosts
        (and its freezer subtree, with proctrack/cgroup)."""
        mounts = f"mount --bind {self.root / 'hosts'} /etc/hosts"
        if proctrack() == "proctrack/cgroup":
            (FREEZER / self.tag).mkdir(exist_ok=True)
            mounts += f" && mount --bind {FREEZER / self.tag} {FREEZER}"
        return ["nsenter", f"--net=/run/netns/{self.netns[i]}", "unshare", "--mount", "--uts", "--propagation",
                "private", "sh", "-c", f"{mounts} && hostname {self.names[i]} && exec {command}"]

    def start(self) -> "NetnsCluster":
        r = self.root
        for d in ("state", "log", *(f"spool/{n}" for n in self.names)):
            (r / d).mkdir(parents=True, exist_ok=True)
        try:
            self._network()
            self._munge()
            nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} RealMemory={self._node_mem()} "
                              "State=UNKNOWN" for n, a in zip(self.names, self.addrs))
            self.conf.write_text(slurm_conf(r, f"{self.host}({self.ctl_addr})", free_port(), free_port(), nodes,
                                            spool=f"{r}/spool/%n", auth=f"socket={r}/munge/munge.sock,"))
            (r / "cgroup.conf").write_text(CGROUP_CONF)
            self._spawn(["unshare", "--uts", "sh", "-c", f"hostname {self.host} && exec /usr/sbin/slurmctld -D "
                         f"-f {self.conf}"], "slurmctld")
            for i, n in enumerate(self.names):
                self._spawn(self.in_node(i, f"/usr/sbin/slurmd -D -N {n} -f {self.conf}"), f"slurmd-{n}")
            self._wait_up(len(self.names))
        except BaseException:
            self.stop()
            raise
        return self

    def _node_mem(self) -> int:
        """Each node declares most of the machine's memory: a scheduling figure, not enforced (linuxproc)."""
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)

    def stop(self) -> None:
        """Cancel jobs, stop our daemons, kill what still runs in our namespaces, delete namespaces + bridge."""
        super().stop()
        for ns in self.netns:
            if not Path(f"/run/netns/{ns}").exists():
                continue
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in map(int, pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self.made_links:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        time.sleep(0.5)  # the processes killed above leave their cgroups
        remove_freezer(self.tag)
