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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from machined_lab import DISC, PEER_STATUS, Agent, build, full_mesh, kill_node, wait

from machined.config.testing import config_yaml
from netns.lab import Lab, Node
from spanapi.talos.cosi import state_pb2, state_pb2_grpc

pytestmark = pytest.mark.root

CLUSTER = "machined-it"
ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


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
    me.config.write_text(
        config_yaml(
            cluster_id=CLUSTER,
            secret=secret,
            discovery=[f"http://{DISC}:3000"],
            agent=me.agent_config(),
            services=[etcd_service(agents, me)],
            machine_type="controlplane",
        )
    )


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


@pytest.fixture
def lab() -> Iterator[Lab]:
    if not (os.path.exists(ETCD) and os.path.exists(ETCDCTL)):
        pytest.skip("etcd is not installed (apt-get install etcd-server etcd-client)")
    with Lab() as lab:
        yield lab


def setup(lab: Lab) -> list[Agent]:
    agents = build(lab, {"a": ["n1", "n2"], "b": ["n3"]})
    secret = base64.b64encode(os.urandom(32)).decode()
    for a in agents:
        a.cluster_id = CLUSTER
    for a in agents:
        write_config(agents, a, secret)
    return agents


def test_three_agents_mesh_across_nats_and_run_etcd_over_it(lab: Lab) -> None:
    agents = setup(lab)
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
