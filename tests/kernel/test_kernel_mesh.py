"""Kernel WireGuard for real: `kubespan run` with the default backend (`auto`) picks the kernel module,
a two-node mesh carries ping and TCP, SIGTERM removes everything, outside removals are repaired and
`--keep-on-exit` restarts without tearing the tunnel down."""

from __future__ import annotations

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


def wg_peers(mn: MeshNode) -> list[str]:
    """Public keys of the peers the kernel device has, as the wg tool lists them."""
    return mn.node.run("wg", "show", "kubespan", "peers").stdout.split()


def test_auto_picks_kernel_mesh_carries_ping_and_tcp_then_sigterm_removes_everything(lab: Lab) -> None:
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
    before = peers(n1)["n2"]["tx_bytes"]
    assert scenarios.tcp_transfer(n2.node, n1.node, "10.60.0.11", 7812, size, timeout=120) == size
    assert scenarios.tcp_transfer(n1.node, n2.node, "10.60.0.12", 7813, size, timeout=120) == size
    ml.wait(
        "node-IP traffic counted on the kernel tunnel",
        lambda: peers(n1)["n2"]["tx_bytes"] - before > size,
        timeout=30,
        interval=1,
    )

    assert ml.stop_node("n1", timeout=60) == 0
    assert scenarios.stale_state(n1.node) == []
    ml.wait("n2 dropped the node that left", lambda: peers(n2) == {}, timeout=REPAIR_TIMEOUT, interval=1)
    assert wg_peers(n2) == []
