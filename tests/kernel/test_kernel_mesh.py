"""Kernel WireGuard for real: `kubespan run` with the default backend (`auto`) picks the kernel module,
a two-node mesh carries ping and TCP in both data-plane layouts (`--steering marks` and `routes`, the
latter under strict rp_filter), SIGTERM removes everything, outside removals are repaired and
`--keep-on-exit` restarts without tearing the tunnel down."""

from __future__ import annotations

import time

import pytest
from kernellab import REPAIR_TIMEOUT, UP_TIMEOUT, scenarios

from netns.lab import Lab
from netns.mesh import MeshLab, MeshNode

pytestmark = [pytest.mark.root, pytest.mark.kernel, pytest.mark.timeout(900)]

full_mesh, peers, status = scenarios.full_mesh, scenarios.peers, scenarios.status


def two_nodes(lab: Lab, *extra: str) -> tuple[MeshLab, MeshNode, MeshNode]:
    ml = scenarios.lan(lab, ["n1", "n2"])
    n1, n2 = (ml.start_node(lab.nodes[n], *extra) for n in ("n1", "n2"))
    took = ml.wait("2-node kernel mesh", lambda: full_mesh([n1, n2]), timeout=UP_TIMEOUT, interval=1)
    print(f"2-node mesh up in {took:.0f}s (emulated)")
    return ml, n1, n2


def node_ip_tcp_through_tunnel(ml: MeshLab, n1: MeshNode, n2: MeshNode, port: int, both: bool) -> None:
    """2 MiB of TCP to n2's node IP (and back to n1's with ``both``), counted on n1's tunnel for n2:
    else the traffic bypassed the mesh."""
    size = 2 << 20
    before = peers(n1)["n2"]["tx_bytes"]
    if both:
        assert scenarios.tcp_transfer(n2.node, n1.node, "10.60.0.11", port + 1, size, timeout=120) == size
    assert scenarios.tcp_transfer(n1.node, n2.node, "10.60.0.12", port, size, timeout=120) == size
    ml.wait(
        "node-IP traffic counted on the kernel tunnel",
        lambda: peers(n1)["n2"]["tx_bytes"] - before > size,
        timeout=30,
        interval=1,
    )


def steered_by_routes_under_strict_rp_filter(lab: Lab, ml: MeshLab) -> None:
    """``--steering routes`` with the kernel device (n1 and n2 restarted, both stopped first): node-IP
    traffic through the tunnel by a route per peer prefix, and WireGuard's own packets past strict
    reverse-path filtering by the exemption."""
    for name in ("n1", "n2"):
        for key in ("all", "default", "eth0"):
            lab.nodes[name].run("sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=1")
    n1, n2 = (ml.start_node(lab.nodes[n], "--steering", "routes") for n in ("n1", "n2"))
    ml.wait("2-node kernel mesh, routes", lambda: full_mesh([n1, n2]), timeout=UP_TIMEOUT, interval=1)
    node = n1.node
    assert status(n1)["backend"] == "kernel" and status(n1)["steering"] == "routes"
    assert "32499:\tfrom all ipproto udp sport 51820 lookup main" in node.run("ip", "rule").stdout
    assert "not from all fwmark 0x20/0x60 lookup 180" in node.run("ip", "rule").stdout
    assert "10.60.0.12 dev kubespan" in node.run("ip", "route", "show", "table", "180").stdout
    assert node.run("nft", "list", "chain", "inet", "kubespan", "output", check=False).returncode != 0
    node_ip_tcp_through_tunnel(ml, n1, n2, 7814, both=False)
    assert ml.stop_node("n1", timeout=60) == 0
    assert scenarios.stale_state(node) == []


def wg_peers(mn: MeshNode) -> list[str]:
    """Public keys of the peers the kernel device has, as the wg tool lists them."""
    return mn.node.run("wg", "show", "kubespan", "peers").stdout.split()


def test_auto_picks_kernel_mesh_carries_ping_and_tcp_then_sigterm_removes_everything(lab: Lab) -> None:
    """Steering by marks (the default), then both nodes again steered by routes."""
    ml, n1, n2 = two_nodes(lab)
    for mn, other in ((n1, n2), (n2, n1)):
        st = status(mn)
        assert st["backend"] == "kernel", st["backend"]
        assert "wireguard" in mn.node.run("ip", "-d", "link", "show", "kubespan").stdout
        assert mn.node.pids("wireguard-go") == []
        assert wg_peers(mn) == [status(other)["public_key"]]
    mesh1, mesh2 = status(n1)["mesh_address"], status(n2)["mesh_address"]
    assert n1.node.ping(mesh2, count=3, timeout=5) and n2.node.ping(mesh1, count=3, timeout=5)

    size = 2 << 20
    assert scenarios.tcp_transfer(n1.node, n2.node, mesh2, 7811, size, timeout=120) == size
    # node IP to node IP: marked by nftables, routed through table 180 into the kernel device
    node_ip_tcp_through_tunnel(ml, n1, n2, 7812, both=True)

    assert ml.stop_node("n1", timeout=60) == 0
    assert scenarios.stale_state(n1.node) == []
    ml.wait("n2 dropped the node that left", lambda: peers(n2) == {}, timeout=REPAIR_TIMEOUT, interval=1)
    assert wg_peers(n2) == []

    # the other data-plane layout in the same lab (a lab of its own cost ~20 s of the VM's budget)
    assert ml.stop_node("n2", timeout=60) == 0
    assert scenarios.stale_state(n2.node) == []
    steered_by_routes_under_strict_rp_filter(lab, ml)


def ifindex(mn: MeshNode) -> int:
    return int(mn.node.run("cat", "/sys/class/net/kubespan/ifindex").stdout)


def routing_intact(mn: MeshNode) -> bool:
    node = mn.node
    return (
        "32500:" in node.run("ip", "rule").stdout
        and "32500:" in node.run("ip", "-6", "rule").stdout
        and "default dev kubespan" in node.run("ip", "route", "show", "table", "180").stdout
        and node.run("nft", "list", "table", "inet", "kubespan", check=False).returncode == 0
    )


def test_outside_removals_repaired_then_keep_on_exit_restart_keeps_the_tunnel(lab: Lab) -> None:
    ml, n1, n2 = two_nodes(lab, "--keep-on-exit")
    node = n1.node
    key2, mesh1, mesh2 = status(n2)["public_key"], status(n1)["mesh_address"], status(n2)["mesh_address"]

    def mesh_ok() -> bool:
        return node.ping(mesh2, count=1, timeout=3)

    # a peer removed from the kernel device with the wg tool
    node.run("wg", "set", "kubespan", "peer", key2, "remove")
    took = ml.wait("peer re-added", lambda: wg_peers(n1) == [key2] and mesh_ok(), timeout=REPAIR_TIMEOUT)
    print(f"peer removed with wg: back in {took:.1f}s")
    # a rule, a route and the nft table
    node.run("ip", "rule", "del", "priority", "32500")
    node.run("ip", "-6", "route", "del", "default", "table", "180")
    node.run("nft", "delete", "table", "inet", "kubespan")
    took = ml.wait("rule, route and nft table restored", lambda: routing_intact(n1), timeout=REPAIR_TIMEOUT)
    print(f"rule, route, nft table removed: back in {took:.1f}s")
    # the link itself
    before = ifindex(n1)
    node.run("ip", "link", "del", "kubespan")
    took = ml.wait(
        "link re-created, peers and routing back",
        lambda: wg_peers(n1) == [key2] and routing_intact(n1) and mesh_ok(),
        timeout=REPAIR_TIMEOUT,
    )
    print(f"link deleted: back in {took:.1f}s")
    assert ifindex(n1) != before and status(n1)["backend"] == "kernel"
    assert scenarios.tcp_transfer(n2.node, n1.node, "10.60.0.11", 7821, 1 << 20, timeout=120) == 1 << 20

    # --keep-on-exit: SIGTERM leaves the kernel device configured; traffic keeps flowing while no
    # agent runs, and the restarted agent takes the same link over without re-creating it
    link = ifindex(n1)
    ping = scenarios.Ping.start(n2.node, mesh1, interval=0.2, count=3000, name="keep")
    try:
        ml.wait("baseline pings", lambda: len(ping.replies()) >= 5, timeout=60, interval=0.5)
        t_stop = time.time()
        assert ml.stop_node("n1", timeout=60) == 0
        assert ifindex(n1) == link and wg_peers(n1) == [key2] and routing_intact(n1)
        ml.wait(
            "pings answered while the agent is down",
            lambda: any(t > t_stop + 2 for t in ping.replies().values()),
            timeout=60,
            interval=0.5,
        )
        t_start = time.time()
        n1 = ml.start_node(node, "--keep-on-exit")
        ml.wait("restarted agent up", lambda: full_mesh([n1, n2]), timeout=UP_TIMEOUT, interval=1)
        ml.wait(
            "pings after the restart",
            lambda: sum(t > time.time() - 3 for t in ping.replies().values()) >= 5,
            timeout=60,
            interval=0.5,
        )
    finally:
        sent, received = ping.stop()
    replies = ping.replies()
    print(
        f"keep-on-exit restart: {sent - received}/{sent} pings lost (0.2 s interval) from SIGTERM to "
        f"the restarted agent up; longest gap {scenarios.longest_gap(replies, t_stop):.1f}s; "
        f"agent down {t_start - t_stop:.0f}s"
    )
    assert ifindex(n1) == link, "the restarted agent re-created the link"
    assert status(n1)["mesh_address"] == mesh1
