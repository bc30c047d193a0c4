"""spanctl against a real machined, as subprocesses over the machine API socket (``--socket``).

``TestLocalAgent`` runs machined on the host with the mesh switched off (``KubeSpanConfig enabled:
false``: no netlink, no WireGuard) and one chatty service, and checks version, ``get`` in the three
output formats, ``service`` and ``logs --tail``. ``test_mesh_two_nodes`` (root) runs two agents in a
netns lab with a discovery server so the peer statuses are real, and checks ``get
kubespanpeerstatuses`` in every format, ``mesh``, ``mesh health`` and ``health``.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from machined_lab import json_objects, start_discovery, start_host_machined

from machined.apid.testing import stop_processes
from machined.config.testing import config_yaml
from machined.spanctl.testing import PEER_STATUS_HEADER

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
PEER_STATUS = "KubeSpanPeerStatuses.kubespan.talos.dev"
SECRET = base64.b64encode(b"s" * 32).decode()


SPANCTL_ENV = {**os.environ, "SPANCTL_CONFIG": "/nonexistent/spanctl-config"}


def spanctl_argv(socket: Path, *args: str) -> list[str]:
    return [PY, "-m", "machined.spanctl.main", "--socket", str(socket), *args]


def spanctl(
    socket: Path, *args: str, timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        spanctl_argv(socket, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=SPANCTL_ENV,
    )
    if check:
        assert p.returncode == 0, f"spanctl {' '.join(args)}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def spanctl_watch(socket: Path, *args: str) -> subprocess.Popen[str]:
    """spanctl in the background (``get -w``), its output on text pipes."""
    return subprocess.Popen(
        spanctl_argv(socket, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=SPANCTL_ENV,
    )


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


# -- one agent on the host, mesh off ---------------------------------------------------------------


def local_config(node: str) -> str:
    ticker = {
        "name": "ticker",
        "command": "/bin/sh",
        "args": ["-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"],
        "restart": "always",
    }
    return config_yaml(
        cluster_id="spanctl-it",
        secret=SECRET,
        discovery=(),
        kubespan=False,
        agent={"nodename": node, "httpStatusAddr": ""},
        services=[ticker],
        machine_type="controlplane",
    )


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("spanctl-agent")
    sock = d / "state" / "machined.sock"
    proc, log = start_host_machined(d, local_config("spanctl-node"))
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 20, "machined socket")
        if proc.poll() is not None:
            pytest.fail(f"machined exited: {log.read_text()[-2000:]}")
        yield sock
    finally:
        stop_processes([proc], 15)


class TestLocalAgent:
    def test_version(self, agent: Path) -> None:
        out = spanctl(agent, "version").stdout
        assert out.startswith("Client:\n")
        assert "Server:\n\tNODE:        spanctl-node\n" in out

    def test_get_peer_statuses_in_every_format(self, agent: Path) -> None:
        # mesh off: no peers, but the type resolves by alias and every format is well formed
        table = spanctl(agent, "get", "kubespanpeerstatuses").stdout.splitlines()
        assert table[0].split() == PEER_STATUS_HEADER
        assert len(table) == 1
        assert spanctl(agent, "get", "kubespanpeerstatuses", "-o", "json").stdout.strip() == ""
        assert spanctl(agent, "get", "kubespanpeerstatuses", "-o", "yaml").stdout.strip() == ""

    def test_get_services_in_every_format(self, agent: Path) -> None:
        def ticker_running() -> bool:
            objs = json_objects(spanctl(agent, "get", "services", "ticker", "-o", "json").stdout)
            return bool(objs) and objs[0]["spec"]["state"] == "Running"

        wait_for(ticker_running, 20, "ticker running")
        rows = spanctl(agent, "get", "services").stdout.splitlines()
        assert rows[0].split()[:5] == ["NODE", "NAMESPACE", "TYPE", "ID", "VERSION"]
        ids = {r.split()[3] for r in rows[1:]}
        assert {"ticker", "machined"} <= ids
        assert all(r.split()[0] == "spanctl-node" for r in rows[1:])
        objs = json_objects(spanctl(agent, "get", "services", "ticker", "-o", "json").stdout)
        assert len(objs) == 1
        assert objs[0]["node"] == "spanctl-node"
        assert objs[0]["metadata"]["id"] == "ticker" and objs[0]["metadata"]["namespace"] == "runtime"
        docs = list(yaml.safe_load_all(spanctl(agent, "get", "services", "-o", "yaml").stdout))
        assert {d["metadata"]["id"] for d in docs} >= {"ticker", "machined"}
        assert all(list(d)[:3] == ["node", "metadata", "spec"] for d in docs)

    def test_get_unknown_type_fails_clearly(self, agent: Path) -> None:
        p = spanctl(agent, "get", "nosuchtype", check=False)
        assert p.returncode == 1
        assert p.stderr.strip() == 'spanctl: resource "nosuchtype" is not registered'

    def test_service_list_and_status(self, agent: Path) -> None:
        lines = spanctl(agent, "service").stdout.splitlines()
        assert lines[0].split() == ["NODE", "SERVICE", "STATE", "HEALTH", "LAST", "CHANGE", "LAST", "EVENT"]
        rows = {line.split()[1]: line.split() for line in lines[1:]}
        assert rows["ticker"][0] == "spanctl-node"
        assert rows["ticker"][2] == "Running"
        status = spanctl(agent, "service", "ticker").stdout
        assert "ID       ticker" in status and "STATE    Running" in status
        p = spanctl(agent, "service", "nope", check=False)
        assert p.returncode == 1 and p.stderr == 'error from node spanctl-node: service "nope" not found\n'

    def test_logs_tail(self, agent: Path) -> None:
        wait_for(lambda: len(spanctl(agent, "logs", "ticker").stdout.splitlines()) >= 5, 20, "5 log lines")
        lines = spanctl(agent, "logs", "ticker", "--tail", "3").stdout.splitlines()
        assert len(lines) == 3
        assert all(line.startswith("spanctl-node: tick ") for line in lines)
        n = [int(line.rsplit(" ", 1)[1]) for line in lines]
        assert n == sorted(n) and n[2] - n[0] == 2

    def test_missing_log_is_a_node_error(self, agent: Path) -> None:
        p = spanctl(agent, "logs", "nope", check=False)
        assert p.returncode == 1
        assert p.stderr.startswith("error from node spanctl-node: not found")

    def test_get_watch_flushes_after_bootstrap(self, agent: Path) -> None:
        w = spanctl_watch(agent, "get", "services", "-w")
        try:
            assert w.stdout is not None
            header = w.stdout.readline().split()
            assert header[:3] == ["NODE", "*", "NAMESPACE"]  # talosctl's order
            rows = [w.stdout.readline() for _ in range(2)]
            assert all(r.split()[:4] == ["spanctl-node", "+", "runtime", "Services"] for r in rows), rows
            spanctl(agent, "service", "ticker", "restart")
            later = w.stdout.readline()  # an update after the bootstrap is flushed at once, blank mark
            assert later.split()[:2] == ["spanctl-node", "runtime"], later
            assert later.split()[3] == "ticker", later
        finally:
            w.terminate()
            w.wait(10)

    def test_talosctl_flags_against_a_real_machined(self, agent: Path) -> None:
        """Issue 16 item 16 on a real machined: Identities, -o jsonpath, g/svc, version --short, logs
        -k, events --duration."""
        node_id = (agent.parent / "node-id").read_text().strip()  # the state directory's node id
        rows = spanctl(agent, "get", "identities").stdout.splitlines()
        assert rows[0].split() == ["NODE", "NAMESPACE", "TYPE", "ID", "VERSION", "ID"]
        assert rows[1].split()[1:4] == ["cluster", "Identities", "local"] and rows[1].split()[-1] == node_id
        out = spanctl(agent, "g", "identities", "local", "-o", "jsonpath={.spec.nodeId}").stdout
        assert out == node_id + "\n"
        ids = spanctl(agent, "get", "svc", "-o", "jsonpath={.metadata.id}").stdout.splitlines()
        assert {"ticker", "machined"} <= set(ids)
        p = spanctl(agent, "get", "svc", "-o", "jsonpath={.spec.nope}", check=False)
        assert p.returncode == 1 and "nope is not found" in p.stderr
        out = spanctl(agent, "version", "--short").stdout
        assert out.splitlines()[1].startswith("spanctl ") and "\tNODE:        spanctl-node" in out
        p = spanctl(agent, "logs", "-k", "ticker", check=False)
        assert p.returncode == 1 and "no Kubernetes containers" in p.stderr
        w = spanctl_watch(agent, "events", "--duration", "1h")  # the past hour: machined's start
        try:
            assert w.stdout is not None
            assert w.stdout.readline().split()[:3] == ["NODE", "ID", "EVENT"]
            assert w.stdout.readline().split()[0] == "spanctl-node"
        finally:
            w.terminate()
            w.wait(10)

    def test_missing_socket_is_a_clear_error(self, tmp_path: Path) -> None:
        p = spanctl(tmp_path / "none.sock", "version", check=False)
        assert p.returncode == 1
        assert "cannot connect to" in p.stderr


# -- two agents in a netns lab, mesh on (root) -----------------------------------------------------

LAN = "10.77.0"
DISC = f"{LAN}.2"


def mesh_config(node: str, mac: str, port: int) -> str:
    agent = {
        "nodename": node,
        "httpStatusAddr": "",
        "wireguard": {"backend": "userspace", "listenPort": port},
        "mesh": {"mac": mac},
    }
    return config_yaml(
        cluster_id="spanctl-mesh",
        secret=SECRET,
        discovery=[f"http://{DISC}:3000"],
        agent=agent,
        machine_type="controlplane",
    )


def peer_states(socket: Path) -> dict[str, str]:
    p = spanctl(socket, "get", "kubespanpeerstatuses", "-o", "json", check=False)
    if p.returncode != 0:
        return {}
    return {o["spec"]["label"]: o["spec"]["state"] for o in json_objects(p.stdout)}


@pytest.mark.root
def test_mesh_two_nodes() -> None:
    from netns.lab import Lab

    with Lab() as lab:
        seg = lab.segment("lan")
        start_discovery(lab, seg, DISC)
        sockets: dict[str, Path] = {}
        for i, name in enumerate(("n1", "n2"), start=1):
            node = lab.node(name)
            lab.attach(node, seg, [f"{LAN}.{10 + i}/24"])
            cfg = lab.dir / f"{name}.yaml"
            cfg.write_text(mesh_config(name, f"02:00:00:00:01:{i:02x}", 51820 + i))
            state = node.run_dir / "state"
            node.popen(
                PY, "-m", "machined.main", "--config", str(cfg), "--state-dir", str(state),
                log=lab.dir / f"machined-{name}.log",
            )  # fmt: skip
            sockets[name] = state / "machined.sock"

        s1, s2 = sockets["n1"], sockets["n2"]
        wait_for(
            lambda: peer_states(s1) == {"n2": "up"} and peer_states(s2) == {"n1": "up"}, 90, "both peers up"
        )

        table = spanctl(s1, "get", "kubespanpeerstatuses").stdout.splitlines()
        assert table[0].split() == PEER_STATUS_HEADER
        row = table[1].split()
        assert row[:3] == ["n1", "kubespan", "KubeSpanPeerStatuses"]
        assert row[5] == "n2" and row[6].startswith(f"{LAN}.12:") and row[7] == "up"
        docs = list(yaml.safe_load_all(spanctl(s2, "get", "kubespanpeerstatuses", "-o", "yaml").stdout))
        assert len(docs) == 1 and docs[0]["node"] == "n2"
        assert docs[0]["metadata"]["type"] == PEER_STATUS and docs[0]["spec"]["label"] == "n1"
        objs = json_objects(spanctl(s1, "get", "kubespanpeerstatus", "-o", "json").stdout)
        assert [o["spec"]["label"] for o in objs] == ["n2"] and objs[0]["node"] == "n1"
        p = spanctl(s1, "get", "ksps", check=False)  # KubeSpanPeerSpecs too: refused, not guessed
        assert p.returncode == 1 and "ambiguous" in p.stderr

        assert spanctl(s1, "mesh").stdout.splitlines() == ["NODE   n1   n2", "n1     -    up"]
        health = spanctl(s1, "mesh", "health", "--wait-timeout", "60s", timeout=90)
        assert health.stdout == "n1: mesh OK (1/1 peers up)\n"
        health = spanctl(s1, "health", "--wait-timeout", "60s", timeout=90)  # services, etcd, mesh
        assert health.stdout == "" and "waiting for the mesh to be healthy: OK" in health.stderr

        # get -w: the bootstrap listing is flushed with the `*` column
        w = spanctl_watch(s1, "get", "kubespanpeerstatuses", "-w")
        try:
            assert w.stdout is not None
            header = w.stdout.readline().split()
            first = w.stdout.readline()
            assert header[:2] == ["NODE", "*"]
            assert first.split()[:2] == ["n1", "+"] and " n2 " in first
        finally:
            w.terminate()
            w.wait(10)
