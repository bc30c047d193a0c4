"""Mesh scenarios on top of :class:`netns.lab.Lab`: a discovery server and ``kubespan run`` nodes.

Used by integration tests, benchmarks and the demo. Every process runs inside
its node's namespace; status is read through ``kubespan status`` in the node.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns.lab import Lab, LabError, Node

PY = sys.executable
#: How a MeshLab starts its agents (see MeshLab).
LAUNCHES = ("exec", "fork")
#: What ``kubespan run`` imports, at module level or on its way to the mesh (kubespan.wiring's lazy
#: imports): a "fork" MeshLab's launcher imports them once. A module missing here is imported by each
#: agent again: slower, not wrong.
AGENT_PRELOAD: tuple[str, ...] = (
    "kubespan.cli",
    "kubespan.wireguard.userspace",
    "kubespan.wireguard.kernel",
    "kubespan.dataplane.links",
    "kubespan.dataplane.nft",
    "kubespan.dataplane.nftwatch",
    "kubespan.dataplane.steering",
    "kubespan.hostinfo",
    "kubespan.nat.stunclient",
    "kubespan.nat.opener",
    "kubespan.nat.probemsg",
    "kubespan.relay.agent",
    "discovery.client",
    "discovery.client.target",
    "cryptography.hazmat.primitives.asymmetric.x25519",
    "cryptography.hazmat.primitives.serialization",
)
STATUS_PORT = 51821  # kubespan run's default --http-addr port


def discovery_argv(addr: str, *extra: str) -> list[str]:
    """discovery-service on ``addr`` (``IP:PORT``) for a lab: gRPC only (no landing page, no metrics),
    state in memory; ``extra`` flags after those."""
    return [
        PY,
        "-m",
        "discovery.server.main",
        "--addr",
        addr,
        "--landing-addr",
        "",
        "--metrics-addr",
        "",
        "--snapshot-path",
        "",
        *extra,
    ]


@dataclass
class MeshNode:
    node: Node
    log: Path
    args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    def status(self) -> dict[str, Any]:
        """The agent's /status, read over HTTP from inside the node (no subprocess)."""
        try:
            code, body = self.node.http_get("127.0.0.1", STATUS_PORT, "/status")
        except OSError as e:
            raise LabError(f"kubespan status on {self.name}: {e}") from None
        if code != 200:
            raise LabError(f"kubespan status on {self.name}: HTTP {code}: {body[:200]!r}")
        return json.loads(body)

    def peer(self, label: str) -> dict[str, Any] | None:
        for p in self.status()["peers"]:
            if p["label"] == label:
                return p
        return None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return ""


class MeshLab:
    """A lab with one discovery server and any number of mesh nodes."""

    def __init__(self, lab: Lab, cluster_id: str = "lab-cluster", launch: str = "exec") -> None:
        """``launch``: how agents start: "exec" (``python -m kubespan.cli`` each) or "fork" (from
        the lab's fork server, sharing the imports: netns.launcher)."""
        if launch not in LAUNCHES:
            raise LabError(f"launch must be one of {', '.join(LAUNCHES)}, not {launch!r}")
        self.lab = lab
        self.launch = launch
        if launch == "fork":
            lab.launcher(AGENT_PRELOAD)
        self.cluster_id = cluster_id
        self.secret_file = lab.dir / "cluster-secret"
        self.secret_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        self.secret_file.chmod(0o600)
        self.discovery_urls: list[str] = []
        self.nodes: dict[str, MeshNode] = {}

    def start_discovery(self, node: Node, addr: str, *extra: str) -> str:
        """Run discovery-service in ``node`` listening on ``addr`` (``IP:PORT`` or ``[IPv6]:PORT``)."""
        node.popen(
            *discovery_argv(addr, "--rate-limit", "0", *extra),
            log=self.lab.dir / f"discovery-{node.name}.log",
            private_run=False,
        )
        url = f"http://{addr}"
        self.discovery_urls.append(url)
        return url

    def start_node(
        self,
        node: Node,
        *extra: str,
        discovery: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> MeshNode:
        """Start ``kubespan run`` in ``node``; ``env``: variables added to this process's environment
        (e.g. kubespan.wiring.WG_LOG_LEVEL_ENV for wireguard-go's debug log)."""
        cli = [
            "run",
            "--cluster-id",
            self.cluster_id,
            "--cluster-secret-file",
            str(self.secret_file),
            "--state-dir",
            str(node.run_dir / "state"),
            "--nodename",
            node.name,
            *[a for url in (discovery or self.discovery_urls) for a in ("--discovery", url)],
            *extra,
        ]
        log = self.lab.dir / f"kubespan-{node.name}.log"
        full_env = {**os.environ, **env} if env else None
        if self.launch == "fork":
            node.fork("kubespan.cli", *cli, log=log, env=full_env)
        else:
            node.popen(PY, "-m", "kubespan.cli", *cli, log=log, env=full_env)
        mn = MeshNode(node, log, [PY, "-m", "kubespan.cli", *cli])
        self.nodes[node.name] = mn
        return mn

    def start_nodes(
        self, nodes: Sequence[Node], *extra: str, env: dict[str, str] | None = None
    ) -> list[MeshNode]:
        """:meth:`start_node` for each of ``nodes`` (forked ones in one batch: netns.launcher)."""
        batch = (
            self.lab.launcher(AGENT_PRELOAD).batch() if self.launch == "fork" else contextlib.nullcontext()
        )
        with batch:
            return [self.start_node(node, *extra, env=env) for node in nodes]

    def start_two_paths(self, disc_port: int) -> tuple[MeshNode, MeshNode]:
        """Discovery and two nodes on two segments (10.61/24 with discovery at 10.61.0.2, and 10.62/24):
        every node has two candidate endpoints, so a failover has somewhere to go. Does not wait."""
        lab = self.lab
        seg_a, seg_b = lab.segment("a"), lab.segment("b")
        disc = lab.node("disc")
        lab.attach(disc, seg_a, ["10.61.0.2/24"])
        self.start_discovery(disc, f"10.61.0.2:{disc_port}")
        nodes = []
        for i in (1, 2):
            node = lab.node(f"n{i}")
            lab.attach(node, seg_a, [f"10.61.0.1{i}/24"], ifname="eth0")
            lab.attach(node, seg_b, [f"10.62.0.1{i}/24"], ifname="eth1")
            nodes.append(self.start_node(node))
        return nodes[0], nodes[1]

    def stop_node(self, name: str, timeout: float = 15) -> int | None:
        """SIGTERM the node's kubespan process and wait for it."""
        mn = self.nodes[name]
        for p in mn.node.procs:
            if p.args and "kubespan.cli" in " ".join(map(str, p.args)) and p.poll() is None:
                os.killpg(p.pid, 15)
                return p.wait(timeout)
        return None

    def wait(self, what: str, pred: Callable[[], bool], timeout: float = 60, interval: float = 0.5) -> float:
        """Poll ``pred`` until true; return the seconds it took; raise with node logs on timeout."""
        t0 = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - t0 < timeout:
            try:
                if pred():
                    return time.monotonic() - t0
            except (LabError, ValueError, KeyError) as e:
                last = e
            time.sleep(interval)
        logs = "\n".join(f"--- {n}\n{mn.log_tail()}" for n, mn in self.nodes.items())
        raise TimeoutError(f"{what}: not reached in {timeout}s (last error: {last})\n{logs}")

    def all_up(self, expected_peers: int | None = None) -> bool:
        for mn in self.nodes.values():
            st = mn.status()
            want = len(self.nodes) - 1 if expected_peers is None else expected_peers
            if len(st["peers"]) != want or not all(p["state"] == "up" for p in st["peers"]):
                return False
        return True


def stop_agents(lab: Lab, timeout: float = 15) -> None:
    """SIGTERM every ``kubespan run`` at once while discovery still runs (Lab.close goes node by node in
    creation order, discovery first, so agents would each wait for a delete ack from a server gone)."""
    procs = [
        p
        for node in lab.nodes.values()
        for p in node.procs
        if p.poll() is None and "kubespan.cli" in " ".join(map(str, p.args))
    ]
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))


@contextlib.contextmanager
def mesh_lab(stop_timeout: float = 15) -> Iterator[Lab]:
    """A :class:`Lab` whose agents are stopped together (:func:`stop_agents`) before it closes."""
    with Lab() as lab:
        try:
            yield lab
        finally:
            stop_agents(lab, stop_timeout)


def lan_pair(
    subnet: str, flags: Sequence[Sequence[str]] = ((), ()), timeout: float = 60
) -> tuple[Lab, MeshLab, list[MeshNode]]:
    """A started lab: a registry (``SUBNET.2``) and two ``kubespan run`` nodes ``n1``/``n2``
    (``SUBNET.11``/``.12``, each with its ``flags``) on one LAN segment, both up. The caller owns the
    lab: :func:`stop_agents`, then ``lab.__exit__``; on a failure here the lab is closed."""
    lab = Lab()
    lab.__enter__()
    try:
        ml = MeshLab(lab)
        seg = lab.segment("lan")
        disc = lab.node("disc")
        lab.attach(disc, seg, [f"{subnet}.2/24"])
        ml.start_discovery(disc, f"{subnet}.2:3000")
        nodes = []
        for i, extra in enumerate(flags, 1):
            node = lab.node(f"n{i}")
            lab.attach(node, seg, [f"{subnet}.1{i}/24"])
            nodes.append(ml.start_node(node, *extra))
        ml.wait("both nodes up", ml.all_up, timeout=timeout)
    except BaseException:
        stop_agents(lab)
        lab.__exit__(None, None, None)
        raise
    return lab, ml, nodes
