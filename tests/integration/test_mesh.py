"""The mesh end to end: real discovery-service, real `kubespan run`, real wireguard-go and nftables,
in network namespaces this test creates."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from collections.abc import Iterator

import pytest

from netns.lab import Lab
from netns.mesh import MeshLab, MeshNode

pytestmark = pytest.mark.root

PY = sys.executable


def build(lab: Lab, n: int, *extra: str, ipv6: bool = False) -> tuple[MeshLab, list[MeshNode]]:
    ml = MeshLab(lab)
    seg = lab.segment("lan")
    disc = lab.node("disc")
    if ipv6:
        lab.attach(disc, seg, ["fd60::2/64"])
        ml.start_discovery(disc, "[fd60::2]:3000")
    else:
        lab.attach(disc, seg, ["10.60.0.2/24"])
        ml.start_discovery(disc, "10.60.0.2:3000")
    nodes = []
    for i in range(1, n + 1):
        node = lab.node(f"n{i}")
        lab.attach(node, seg, [f"fd60::1{i}/64"] if ipv6 else [f"10.60.0.1{i}/24"])
        nodes.append(ml.start_node(node, *extra))
    return ml, nodes


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def tcp_transfer(src: MeshNode, dst: MeshNode, addr: str, size: int = 1 << 20) -> int:
    """Send ``size`` bytes from ``src`` to a one-shot server on ``dst``; return what the server received."""
    port = 7788
    server = textwrap.dedent(
        f"""
        import socket, sys
        s = socket.socket(socket.AF_INET6 if ":" in {addr!r} else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(({addr!r}, {port})); s.listen(1); s.settimeout(20)
        c, _ = s.accept(); c.settimeout(20); n = 0
        while True:
            b = c.recv(65536)
            if not b: break
            n += len(b)
        print(n)
        """
    )
    client = textwrap.dedent(
        f"""
        import socket, time
        for _ in range(50):
            try:
                c = socket.create_connection(({addr!r}, {port}), timeout=10); break
            except OSError: time.sleep(0.1)
        c.sendall(b"x" * {size}); c.close()
        """
    )
    import subprocess

    srv = subprocess.Popen(
        dst.node.argv(PY, "-c", server, private_run=False), stdout=subprocess.PIPE, text=True
    )
    try:
        dst.node.run(PY, "-c", "import time; time.sleep(0.3)")
        src.node.run(PY, "-c", client, timeout=60)
        out, _ = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
    return int(out.strip() or 0)


def test_two_nodes_mesh_and_marked_node_traffic(lab: Lab) -> None:
    ml, (n1, n2) = build(lab, 2)
    ml.wait("both peers up", ml.all_up, timeout=60)
    s1, s2 = n1.status(), n2.status()
    assert s1["ready"] and s2["ready"]
    assert s1["mesh_address"].startswith("fd") and s1["mesh_address"] != s2["mesh_address"]
    # mesh address to mesh address
    assert n1.node.ping(s2["mesh_address"], count=2)
    assert tcp_transfer(n1, n2, s2["mesh_address"]) == 1 << 20
    # node IP to node IP: marked 0x40 by nftables and routed through table 180 into the tunnel
    before = n1.peer("n2")
    assert before is not None
    assert tcp_transfer(n1, n2, "10.60.0.12") == 1 << 20
    # the status polls WireGuard's counters once a second
    ml.wait(
        "node-IP traffic counted on the tunnel (else it bypassed the mesh)",
        lambda: n1.peer("n2")["tx_bytes"] - before["tx_bytes"] > 1 << 20,
        timeout=10,
    )
    route = n1.node.run("ip", "route", "get", "10.60.0.12", "mark", "0x40").stdout
    assert "dev kubespan" in route and "table 180" in route


def test_three_nodes(lab: Lab) -> None:
    ml, nodes = build(lab, 3)
    ml.wait("all peers up", ml.all_up, timeout=90)
    for a in nodes:
        st = a.status()
        assert sorted(p["label"] for p in st["peers"]) == sorted(n.name for n in nodes if n is not a)
        for p in st["peers"]:
            assert a.node.ping(p["mesh_address"], count=1)


def test_ipv6_only_underlay(lab: Lab) -> None:
    ml, (n1, n2) = build(lab, 2, ipv6=True)
    ml.wait("both peers up over IPv6", ml.all_up, timeout=60)
    p = n1.peer("n2")
    assert p is not None and p["endpoint"] == "[fd60::12]:51820"
    assert n1.node.ping(n2.status()["mesh_address"], count=2)
    before = n1.peer("n2")["tx_bytes"]
    assert tcp_transfer(n1, n2, "fd60::12") == 1 << 20
    ml.wait("traffic counted on the tunnel", lambda: n1.peer("n2")["tx_bytes"] - before > 1 << 20, timeout=10)


def test_self_healing_and_wireguard_go_restart(lab: Lab) -> None:
    # about wireguard-go: userspace explicitly (with a WireGuard module, auto would pick the kernel;
    # tests/kernel/test_kernel_mesh.py covers self-healing there)
    ml, (n1, n2) = build(lab, 2, "--backend", "userspace")
    ml.wait("both peers up", ml.all_up, timeout=60)
    node = n1.node
    mesh_addr = n2.status()["mesh_address"]
    node.run("ip", "rule", "del", "priority", "32500")
    node.run("ip", "route", "del", "default", "table", "180")
    node.run("nft", "delete", "table", "inet", "kubespan")

    def healed() -> bool:
        rules = node.run("ip", "rule").stdout
        routes = node.run("ip", "route", "show", "table", "180").stdout
        nft = node.run("nft", "list", "table", "inet", "kubespan", check=False).returncode == 0
        return "32500:" in rules and "default dev kubespan" in routes and nft

    took = ml.wait("rule, route and nft table restored", healed, timeout=20, interval=0.2)
    print(f"restored in {took:.1f}s")
    # wireguard-go killed: the supervisor restarts it and the mesh re-applies peers and addresses
    pids = node.pids("wireguard-go")
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    ml.wait("mesh back after wireguard-go was killed", lambda: node.ping(mesh_addr, count=1), timeout=40)
    # the link itself deleted from outside
    node.run("ip", "link", "del", "kubespan")
    ml.wait("mesh back after the link was deleted", lambda: node.ping(mesh_addr, count=1), timeout=40)


def test_a_change_to_the_table_from_outside_is_reported_and_repaired(lab: Lab) -> None:
    """The agent's own nftables writes are not reported as changes; another process's are, by name,
    and repaired at once (not at the 30 s safety-net read-back the watch leaves)."""
    ml, (n1, _n2) = build(lab, 2)
    ml.wait("both peers up", ml.all_up, timeout=60)
    node = n1.node
    line = "nftables table changed from outside"
    assert line not in n1.log.read_text(), "the agent's own writes were reported as foreign"

    def elements() -> str:
        out = node.run("nft", "list", "set", "inet", "kubespan", "targets_ipv4", check=False).stdout
        return out.split("elements =", 1)[1] if "elements =" in out else ""

    assert elements(), "the peer's prefixes are in the set"
    node.run("nft", "flush", "set", "inet", "kubespan", "targets_ipv4")  # only a read-back would see it
    ml.wait("the set refilled", lambda: bool(elements()), timeout=20, interval=0.2)
    reported = [entry for entry in n1.log.read_text().splitlines() if line in entry]
    assert reported and "by nft (task " in reported[0], n1.log_tail()


def test_sigterm_removes_everything(lab: Lab) -> None:
    ml, (n1, n2) = build(lab, 2)
    ml.wait("both peers up", ml.all_up, timeout=60)
    node = n1.node
    assert ml.stop_node("n1") == 0
    assert "kubespan" not in node.run("ip", "link").stdout
    assert "32500:" not in node.run("ip", "rule").stdout
    assert "32500:" not in node.run("ip", "-6", "rule").stdout
    assert node.run("ip", "route", "show", "table", "180").stdout.strip() == ""
    assert node.run("nft", "list", "table", "inet", "kubespan", check=False).returncode != 0
    assert node.pids("wireguard-go") == []
    # it left the mesh: its discovery entry is gone, so the peer drops it now, not after the 30 min TTL
    ml.wait("peer removed the node that left", lambda: n2.status()["peers"] == [], timeout=15)
