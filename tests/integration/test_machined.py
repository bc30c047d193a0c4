"""machined end to end (root): three agents in two NATed clouds form the mesh from their config files,
and a three-member etcd cluster supervised by them runs over the mesh.

Lab (198.51.100.0/24 plays the internet)::

    internet   disc .2 (discovery-service :3000)   nat-a .11 (EIM)   nat-b .12 (EIM)
    cloud a    10.1.0.0/24: n1 .11, n2 .12  (behind nat-a)
    cloud b    10.2.0.0/24: n3 .11          (behind nat-b)

Every node runs ``machined --config FILE --state-dir DIR`` (real wireguard-go, nftables, policy
routing). etcd is a ServiceConfig that requires a mesh quorum and listens and peers only on mesh
addresses, so it can only form its cluster through the tunnels across both NATs. The test talks to
each agent through its machine API socket (the state directory is on the host filesystem, so the
test process reaches the unix socket directly).

Checked: etcd waits for the mesh and then reaches a healthy quorum; SIGTERM to one agent stops its
etcd and cleans its mesh up while the other two keep quorum; started again, it rejoins and sees the
data written meanwhile; a Watch on KubeSpanPeerStatuses sees the third node go down when its node
is killed (agent, wireguard-go and etcd) and come back up when its agent starts again.
"""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import empty_pb2

from kubespan.identity import mesh_address
from netns.lab import Lab, LabError, Node
from spanapi.talos.cosi import state_pb2, state_pb2_grpc
from spanapi.talos.machine import machine_pb2_grpc

pytestmark = pytest.mark.root

PY = sys.executable
NET = "198.51.100"
DISC = f"{NET}.2"
CLUSTER = "machined-it"
ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
PEER_STATUS = "KubeSpanPeerStatuses.kubespan.talos.dev"


@dataclass
class Agent:
    node: Node
    index: int
    config: Path
    state_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def socket(self) -> Path:
        return self.state_dir / "machined.sock"

    @property
    def mac(self) -> str:
        return f"02:00:00:00:00:{self.index:02x}"

    @property
    def mesh_ip(self) -> str:
        return str(mesh_address(CLUSTER, self.mac).ip)

    @property
    def log(self) -> Path:
        return self.node.lab.dir / f"machined-{self.name}.log"

    def start(self) -> None:
        self.proc = self.node.popen(
            PY, "-m", "machined.main", "--config", str(self.config), "--state-dir", str(self.state_dir),
            log=self.log,
        )  # fmt: skip

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.socket}")

    def services(self) -> dict[str, Any]:
        with self.channel() as ch:
            resp = machine_pb2_grpc.MachineServiceStub(ch).ServiceList(empty_pb2.Empty(), timeout=5)
        return {s.id: s for s in resp.messages[0].services}

    def peers(self) -> dict[str, dict[str, Any]]:
        """label -> KubeSpanPeerStatus spec, read through the resource API."""
        with self.channel() as ch:
            stream = state_pb2_grpc.StateStub(ch).List(
                state_pb2.ListRequest(namespace="kubespan", type=PEER_STATUS), timeout=5
            )
            specs = [yaml.safe_load(r.resource.spec.yaml_spec) for r in stream]
        return {s["label"]: s for s in specs}

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def etcd_service(agents: list[Agent], me: Agent) -> dict[str, Any]:
    cluster = ",".join(f"{a.name}=http://[{a.mesh_ip}]:2380" for a in agents)
    # fmt: off
    args = [
        "--name", me.name,
        "--data-dir", str(me.node.run_dir / "etcd"),
        "--listen-peer-urls", f"http://[{me.mesh_ip}]:2380",
        "--initial-advertise-peer-urls", f"http://[{me.mesh_ip}]:2380",
        "--listen-client-urls", f"http://[{me.mesh_ip}]:2379,http://127.0.0.1:2379",
        "--advertise-client-urls", f"http://[{me.mesh_ip}]:2379",
        "--initial-cluster", cluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", "machined-it",
        "--heartbeat-interval", "200",
        "--election-timeout", "2000",
    ]
    # fmt: on
    return {
        "apiVersion": "v1alpha1",
        "kind": "ServiceConfig",
        "name": "etcd",
        "command": ETCD,
        "args": args,
        "requiresMesh": {"quorum": 1},
        "restart": "always",
        "backoff": {"initial": "1s", "max": "5s"},
        "stopTimeout": "10s",
        "healthCheck": {"http": "http://127.0.0.1:2379/health", "interval": "1s", "timeout": "2s"},
        "logLines": 500,
    }


def write_config(agents: list[Agent], me: Agent, secret: str) -> None:
    docs = [
        {
            "version": "v1alpha1",
            "machine": {"type": "controlplane"},
            "cluster": {
                "id": CLUSTER,
                "secret": secret,
                "clusterName": "it",
                "discovery": {"enabled": False},
            },
        },
        {"apiVersion": "v1alpha1", "kind": "KubeSpanConfig", "enabled": True},
        {
            "apiVersion": "v1alpha1",
            "kind": "DiscoveryServiceConfig",
            "name": "lab",
            "endpoint": f"http://{DISC}:3000",
        },
        {
            "apiVersion": "v1alpha1",
            "kind": "AgentConfig",
            "nodename": me.name,
            "httpStatusAddr": "",
            "wireguard": {"backend": "userspace", "listenPort": me.port},
            "mesh": {"mac": me.mac},
        },
        etcd_service(agents, me),
    ]
    me.config.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def wait(what: str, pred: Callable[[], Any], timeout: float, agents: list[Agent], every: float = 0.5) -> Any:
    t0 = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            value = pred()
            if value:
                return value
        except (grpc.RpcError, LabError, KeyError, OSError, subprocess.SubprocessError) as e:
            last = e
        time.sleep(every)
    logs = "\n".join(f"--- {a.name}\n{a.tail()}" for a in agents)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last error: {last})\n{logs}")


def full_mesh(agents: list[Agent]) -> bool:
    for a in agents:
        ps = a.peers()
        want = {b.name for b in agents if b is not a}
        if set(ps) != want or any(p["state"] != "up" for p in ps.values()):
            return False
    return True


def etcd_ok(a: Agent) -> bool:
    s = a.services().get("etcd")
    return s is not None and s.state == "Running" and s.health.healthy


def etcdctl(node: Node, endpoints: list[Agent], *args: str) -> subprocess.CompletedProcess[str]:
    eps = ",".join(f"http://[{a.mesh_ip}]:2379" for a in endpoints)
    return node.run(ETCDCTL, "--endpoints", eps, "--dial-timeout", "3s", "--command-timeout", "5s", *args,
                    check=False, timeout=20)  # fmt: skip


class Watcher:
    """A cosi.resource.State/Watch on KubeSpanPeerStatuses, consumed by a thread: (label, state) pairs."""

    def __init__(self, agent: Agent) -> None:
        self.events: queue.Queue[tuple[str, str, str]] = queue.Queue()
        self.channel = agent.channel()
        self.call = state_pb2_grpc.StateStub(self.channel).Watch(
            state_pb2.WatchRequest(
                namespace="kubespan",
                type=PEER_STATUS,
                options=state_pb2.WatchOptions(bootstrap_contents=True),
                api_version=1,
            )
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for resp in self.call:
                for ev in resp.event:
                    if not ev.resource.spec.yaml_spec:
                        self.events.put((state_pb2.EventType.Name(ev.event_type), "", ""))
                        continue
                    spec = yaml.safe_load(ev.resource.spec.yaml_spec)
                    self.events.put((state_pb2.EventType.Name(ev.event_type), spec["label"], spec["state"]))

    def expect(self, label: str, state: str, timeout: float) -> list[tuple[str, str, str]]:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(ev)
            if ev[1] == label and ev[2] == state and ev[0] != "DESTROYED":
                return seen
        raise AssertionError(f"watch: no {label} {state} within {timeout:.0f}s; saw {seen}")

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()
        self.thread.join(5)


def kill_node(node: Node) -> None:
    """The node goes away: every process in it is SIGKILLed (agent, wireguard-go, etcd)."""
    for pid in node.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in node.procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)


@pytest.fixture
def lab() -> Iterator[Lab]:
    if not (os.path.exists(ETCD) and os.path.exists(ETCDCTL)):
        pytest.skip("etcd is not installed (apt-get install etcd-server etcd-client)")
    with Lab() as lab:
        yield lab


def build(lab: Lab) -> list[Agent]:
    net = lab.internet()
    disc = lab.node("disc")
    lab.attach(disc, net, [f"{DISC}/24"])
    disc.popen(
        PY, "-m", "discovery.server.main", "--addr", f"{DISC}:3000", "--landing-addr", "", "--metrics-addr", "",
        "--snapshot-path", "", "--rate-limit", "0", "--no-rpc-log",
        log=lab.dir / "discovery.log", private_run=False,
    )  # fmt: skip
    clouds = {"a": ("10.1.0", f"{NET}.11", ["n1", "n2"]), "b": ("10.2.0", f"{NET}.12", ["n3"])}
    agents: list[Agent] = []
    for cloud, (lan, wan, names) in clouds.items():
        seg = lab.segment(f"lan-{cloud}")
        lab.router(f"nat-{cloud}", seg, net, f"{lan}.1/24", f"{wan}/24", nat="eim")
        for i, name in enumerate(names):
            node = lab.node(name)
            lab.attach(node, seg, [f"{lan}.{11 + i}/24"])
            n = len(agents) + 1
            agents.append(
                Agent(node, n, lab.dir / f"{name}.yaml", node.run_dir / "state", 51820 + 10 * (n - 1))
            )
    secret = base64.b64encode(os.urandom(32)).decode()
    for a in agents:
        write_config(agents, a, secret)
    return agents


def test_three_agents_mesh_across_nats_and_run_etcd_over_it(lab: Lab) -> None:
    agents = build(lab)
    n1, n2, n3 = agents
    for a in agents:
        a.start()
    wait("machine API sockets", lambda: all(a.socket.exists() for a in agents), 30, agents)
    assert all((a.socket.stat().st_mode & 0o777) == 0o660 for a in agents)

    # etcd waits for the mesh, then forms its cluster over the mesh addresses across both NATs
    t0 = time.monotonic()
    wait("full mesh (every agent sees the other two up)", lambda: full_mesh(agents), 90, agents)
    mesh_s = time.monotonic() - t0
    for a in agents:  # the first start waited for the mesh
        trail = [e.msg for e in a.services()["etcd"].events.events]
        waited = next(i for i, m in enumerate(trail) if m.startswith("Waiting for the mesh"))
        started = trail.index("Running pre state") if "Running pre state" in trail else len(trail)
        assert waited < started, trail
    wait("etcd healthy on all three agents", lambda: all(etcd_ok(a) for a in agents), 60, agents)
    health = etcdctl(n1.node, agents, "endpoint", "health")
    out = health.stdout + health.stderr  # etcdctl 3.4 reports health on stderr
    assert health.returncode == 0 and out.count("is healthy") == 3, out
    assert etcdctl(n1.node, agents, "put", "k1", "before").returncode == 0

    # SIGTERM n3's agent: its etcd stops, its mesh is cleaned up, the other two keep quorum
    assert n3.proc is not None
    n3.proc.send_signal(signal.SIGTERM)  # the netns wrapper execs machined: this is machined itself
    assert n3.proc.wait(40) == 0, n3.tail()
    assert not n3.node.pids("etcd") and not n3.node.pids("wireguard-go")
    assert "kubespan" not in n3.node.run("ip", "link").stdout
    put = etcdctl(n1.node, [n1, n2], "put", "k2", "while-n3-was-away")
    assert put.returncode == 0, put.stderr

    # started again: it rejoins the mesh and etcd, and sees what was written meanwhile
    n3.start()
    wait("n3 back in the mesh", lambda: full_mesh(agents), 90, agents)
    wait("n3's etcd healthy again", lambda: etcd_ok(n3), 60, agents)
    got = etcdctl(n3.node, [n3], "get", "k2", "--print-value-only", "--consistency=s")
    assert got.stdout.strip() == "while-n3-was-away", got.stdout + got.stderr

    # the node dies (agent, wireguard-go, etcd killed): n1's watch sees it go down, then up again
    w = Watcher(n1)
    try:
        w.expect("n3", "up", 15)  # bootstrap
        kill_node(n3.node)
        w.expect("n3", "down", 60)
        n3.start()
        w.expect("n3", "up", 90)
    finally:
        w.close()
    wait("etcd healthy on all three after the crash", lambda: all(etcd_ok(a) for a in agents), 90, agents)
    health = etcdctl(n2.node, agents, "endpoint", "health")
    out = health.stdout + health.stderr  # etcdctl 3.4 reports health on stderr
    assert health.returncode == 0 and out.count("is healthy") == 3, out
    got = etcdctl(n2.node, agents, "get", "k1", "--print-value-only")
    assert got.stdout.strip() == "before"
    print(f"mesh formed in {mesh_s:.1f}s")
    if os.environ.get("MACHINED_IT_LOGS"):
        for a in agents:
            Path(os.environ["MACHINED_IT_LOGS"], a.log.name).write_bytes(a.log.read_bytes())
