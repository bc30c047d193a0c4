"""Shared by the root machined/apid lab tests: machined agents in network namespaces, two NATed
clouds and a discovery server on a lab internet.

Lab (198.51.100.0/24 plays the internet)::

    internet   disc .2 (discovery-service :3000)   nat-a .11 (EIM)   nat-b .12 (EIM)
    cloud a    10.1.0.0/24: nodes .11, .12, ...  (behind nat-a)
    cloud b    10.2.0.0/24: nodes .11, ...       (behind nat-b)

:func:`start_host_machined` runs one agent on the host instead (no namespace, no root needed).

Each agent runs ``machined --config FILE --state-dir DIR`` (real wireguard-go, nftables, policy
routing). The state directory is on the host filesystem, so the test process reaches each agent's
machine API unix socket directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import empty_pb2

from kubespan.identity import mesh_address
from netns.lab import Lab, LabError, Node
from netns.mesh import discovery_argv
from netns.nat import PortForward
from spanapi.talos.cosi import state_pb2, state_pb2_grpc
from spanapi.talos.machine import machine_pb2_grpc

PY = sys.executable
NET = "198.51.100"
DISC = f"{NET}.2"
PEER_STATUS = "KubeSpanPeerStatuses.kubespan.talos.dev"
CLOUDS = {"a": ("10.1.0", f"{NET}.11"), "b": ("10.2.0", f"{NET}.12")}


@dataclass
class Agent:
    node: Node
    index: int
    cloud: str
    ip: str  # the node's address in its cloud
    config: Path
    state_dir: Path
    port: int  # WireGuard listen port
    cluster_id: str = ""
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
        return str(mesh_address(self.cluster_id, self.mac).ip)

    @property
    def log(self) -> Path:
        return self.node.lab.dir / f"machined-{self.name}.log"

    def agent_config(self) -> dict[str, Any]:
        """The AgentConfig document every lab agent needs (userspace WireGuard, fixed MAC)."""
        return {
            "apiVersion": "v1alpha1",
            "kind": "AgentConfig",
            "nodename": self.name,
            "httpStatusAddr": "",
            "wireguard": {"backend": "userspace", "listenPort": self.port},
            "mesh": {"mac": self.mac},
        }

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


def start_host_machined(
    d: Path, config: str, *extra: str, config_mode: int = 0o600
) -> tuple[subprocess.Popen[bytes], Path]:
    """``machined`` on the host with ``config`` written to ``d/config.yaml`` (mode ``config_mode``) and
    its state in ``d/state``; returns the process and its output log (``d/machined.log``)."""
    cfg = d / "config.yaml"
    cfg.write_text(config)
    cfg.chmod(config_mode)
    log = d / "machined.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PY, "-m", "machined.main", "--config", str(cfg), "--state-dir", str(d / "state"), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    return proc, log


def start_discovery(lab: Lab, segment: str, address: str) -> Node:
    """A ``disc`` node on ``segment`` running discovery-service on ``address:3000`` (in memory)."""
    disc = lab.node("disc")
    lab.attach(disc, segment, [f"{address}/24"])
    disc.popen(
        *discovery_argv(f"{address}:3000", "--rate-limit", "0", "--no-rpc-log"),
        log=lab.dir / "discovery.log",
        private_run=False,
    )
    return disc


def json_objects(text: str) -> list[Any]:
    """The objects of a stream of JSON documents (``spanctl -o json`` prints one per resource)."""
    dec = json.JSONDecoder()
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        obj, end = dec.raw_decode(text, pos)
        out.append(obj)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def build(
    lab: Lab,
    layout: dict[str, Sequence[str]],
    *,
    forwards: dict[str, Sequence[PortForward]] | None = None,
) -> list[Agent]:
    """Discovery on the internet and one NATed cloud per ``layout`` key (``a``, ``b``) holding the
    named nodes; ``forwards`` adds port forwards to a cloud's NAT. Configs are the caller's to write."""
    net = lab.internet()
    start_discovery(lab, net, DISC)
    agents: list[Agent] = []
    for cloud, names in layout.items():
        lan, wan = CLOUDS[cloud]
        seg = lab.segment(f"lan-{cloud}")
        lab.router(f"nat-{cloud}", seg, net, f"{lan}.1/24", f"{wan}/24", nat="eim",
                   port_forward=list((forwards or {}).get(cloud, ())))  # fmt: skip
        for i, name in enumerate(names):
            node = lab.node(name)
            ip = f"{lan}.{11 + i}"
            lab.attach(node, seg, [f"{ip}/24"])
            n = len(agents) + 1
            agents.append(
                Agent(
                    node, n, cloud, ip, lab.dir / f"{name}.yaml", node.run_dir / "state", 51820 + 10 * (n - 1)
                )
            )
    return agents


def wait(what: str, pred: Callable[[], Any], timeout: float, agents: list[Agent], every: float = 0.5) -> Any:
    """Poll ``pred`` until it returns something truthy; fail with every agent's log tail."""
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


def kill_node(node: Node) -> None:
    """The node goes away: every process in it is SIGKILLed (agent, wireguard-go, the rest)."""
    for pid in node.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in node.procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
