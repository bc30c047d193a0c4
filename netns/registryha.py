"""Registry replicas on an etcd cluster in a netns lab (issue 15).

One segment ``10.70.0.0/24``: etcd members ``etcd<i>`` at ``.1<i>`` (client port 2379, peer port 2380),
discovery-service replicas ``reg<i>`` at ``.2<i>`` (``--store etcd``, port 3000), and whatever else a
test attaches (clients, mesh nodes at ``.3x``/``.5x``). Each member and replica is its own namespace,
so ``kill -9`` of one is the loss of that host's process, the others keep running. Used by
tests/integration/test_registry_ha_netns.py and bench/registry_ha.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from discovery.testing import etcd_store_flags
from netns.lab import Lab, LabError, Node
from netns.mesh import discovery_argv
from spanutil.etcdlab import EtcdLab, EtcdMember

NET = "10.70.0"
REG_PORT = 3000
ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
T = TypeVar("T")


@dataclass
class Member:
    name: str
    node: Node
    spec: EtcdMember  # address, ports, data directory (spanutil.etcdlab)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return self.spec.client_url


@dataclass
class Replica:
    name: str
    node: Node
    ip: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.ip}:{REG_PORT}"


@dataclass
class RegistryHA:
    lab: Lab
    segment: str
    members: dict[str, Member] = field(default_factory=dict)
    replicas: dict[str, Replica] = field(default_factory=dict)
    etcd: EtcdLab | None = None  # the members' command lines (started here, inside their nodes)

    # -- etcd ----------------------------------------------------------------------------------------

    def etcd_endpoints(self) -> list[str]:
        return [m.client_url for m in self.members.values()]

    def start_member(self, m: Member, state: str = "new") -> None:
        assert self.etcd is not None
        m.proc = m.node.popen(
            *self.etcd.argv(m.spec, state), "--heartbeat-interval", "100", "--election-timeout", "1000",
            log=self.lab.dir / f"etcd-{m.name}.log",
            private_run=False,
        )  # fmt: skip

    def status(self) -> dict[str, dict]:
        """Each member's ``etcdctl endpoint status`` (leader id, own id, raft term), from a member's node."""
        out: dict[str, dict] = {}
        for m in self.members.values():
            if m.proc is None or m.proc.poll() is not None:
                continue
            r = m.node.run(
                ETCDCTL,
                f"--endpoints={m.client_url}",
                "endpoint",
                "status",
                "-w",
                "json",
                check=False,
                timeout=5,
            )
            if r.returncode == 0:
                try:
                    out[m.name] = json.loads(r.stdout)[0]["Status"]
                except (ValueError, KeyError, IndexError):
                    continue
        return out

    def leader(self) -> Member | None:
        """The member that leads, as the live members see it (None: no agreement yet)."""
        st = self.status()
        leaders = {s["leader"] for s in st.values()}
        if len(leaders) != 1:
            return None
        lead = leaders.pop()
        for name, s in st.items():
            if s["header"]["member_id"] == lead:
                return self.members[name]
        return None

    def wait_etcd(self, timeout: float = 60) -> Member:
        return _wait("an etcd leader", self.leader, timeout)

    def kill_member(self, m: Member) -> None:
        _kill9(m.proc)

    # -- registry replicas ---------------------------------------------------------------------------

    def start_replica(self, r: Replica, *extra: str) -> None:
        r.proc = r.node.popen(
            *discovery_argv(r.addr, "--rate-limit", "0", *etcd_store_flags(self.etcd_endpoints()), *extra),
            log=self.lab.dir / f"discovery-{r.name}.log",
            private_run=False,
        )

    def replica_serving(self, r: Replica) -> bool:
        log = self.lab.dir / f"discovery-{r.name}.log"
        return log.exists() and '"serving"' in log.read_text()

    def wait_replicas(self, timeout: float = 60) -> None:
        _wait(
            "every replica serving",
            lambda: all(self.replica_serving(r) for r in self.replicas.values()),
            timeout,
        )

    def kill_replica(self, r: Replica) -> None:
        _kill9(r.proc)

    def replica_addrs(self) -> list[str]:
        return [r.addr for r in self.replicas.values()]

    def discovery_url(self) -> str:
        """One discovery endpoint naming every replica (the client fails over between them)."""
        return "http://" + ",".join(self.replica_addrs())

    def attach(self, name: str, host: int) -> Node:
        """Another node on the segment at ``10.70.0.<host>``."""
        node = self.lab.node(name)
        self.lab.attach(node, self.segment, [f"{NET}.{host}/24"])
        return node


def build(lab: Lab, members: int = 3, replicas: int = 3) -> RegistryHA:
    """The etcd members and registry replicas, started and serving."""
    if not os.access(ETCD, os.X_OK):
        raise LabError(f"{ETCD} is missing (Debian package etcd-server)")
    ha = RegistryHA(lab, lab.segment("reg"))
    ips = [f"{NET}.{10 + i}" for i in range(1, members + 1)]
    # wrap: the members run inside their nodes (fixed ports 2379/2380), started by start_member
    ha.etcd = EtcdLab(lab.dir / "etcd", members, hosts=ips, wrap=lambda _m: [], token="lab-registry-ha")
    for i, (ip, spec) in enumerate(zip(ips, ha.etcd.members, strict=True), 1):
        node = lab.node(f"etcd{i}")
        lab.attach(node, ha.segment, [f"{ip}/24"])
        ha.members[f"etcd{i}"] = Member(f"etcd{i}", node, spec)
    for m in ha.members.values():
        ha.start_member(m)
    ha.wait_etcd()
    for i in range(1, replicas + 1):
        node = lab.node(f"reg{i}")
        ip = f"{NET}.{20 + i}"
        lab.attach(node, ha.segment, [f"{ip}/24"])
        ha.replicas[f"reg{i}"] = Replica(f"reg{i}", node, ip)
    for r in ha.replicas.values():
        ha.start_replica(r)
    ha.wait_replicas()
    return ha


def _kill9(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the process (its whole group: ``ip netns exec`` execs it, so the group is the daemon)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=10)


def _wait(what: str, probe: Callable[[], T | None], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
