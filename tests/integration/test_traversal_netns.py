"""NAT traversal end to end (root, netns; issue 14): real ``kubespan run`` agents with ``--stun-server``,
a real discovery-service answering STUN on two internet addresses, one public relay node (``open``,
``--relay``), two nodes behind ``hard`` (symmetric) NATs and two behind ``easy`` NATs (a bare
``masquerade`` with no WAN input drop: the pollution case).

The hard pair cannot connect directly (nat.md §2): it is relayed through the public node (``path:
relay``, ``relay_via: relay``, "both behind symmetric NAT") and a ping crosses the mesh. The easy pair
connects directly through a coordinated punch. Every pair ends up connected. One node of each pair
steers by routes (``--steering routes``), the other by marks: the layouts are local and interoperate.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Iterator

import pytest

from netns import Lab
from netns.mesh import MeshNode, mesh_lab
from netns.traversal import RELAY, build

pytestmark = pytest.mark.root


@pytest.fixture
def lab() -> Iterator[Lab]:
    with mesh_lab() as lab:
        yield lab


def _path(n: MeshNode, label: str) -> tuple[str, str | None, str | None]:
    p = n.peer(label)
    if p is None or p["state"] != "up":
        return ("none", None, None)
    return (p["path"], p["relay_via"], p["why_not_direct"])


def test_hard_pair_relayed_easy_pair_punched(lab: Lab) -> None:
    t0 = time.monotonic()
    by_routes = ("--steering", "routes")
    tl = build(
        lab,
        {"h1": "hard", "h2": "hard", "e1": "easy", "e2": "easy"},
        node_flags={"h1": by_routes, "e1": by_routes},
        cluster_id="traversal",
    )
    ml = tl.ml
    ml.wait("every pair up", ml.all_up, timeout=60)
    h1, h2, e1, e2 = (tl.agents[n] for n in ("h1", "h2", "e1", "e2"))
    assert [n.status()["steering"] for n in (h1, h2, e1, e2)] == ["routes", "marks", "routes", "marks"]
    assert "not from all fwmark 0x20/0x60 lookup 180" in h1.node.run("ip", "rule").stdout

    ml.wait("h1-h2 relayed", lambda: _path(h1, "h2")[0] == "relay" and _path(h2, "h1")[0] == "relay", 30)
    assert _path(h1, "h2") == ("relay", RELAY, "both behind symmetric NAT")
    assert _path(h2, "h1")[1] == RELAY
    relay_ip = tl.sites[RELAY].public_ip
    assert str(h1.peer("h2")["endpoint"]).startswith(f"{relay_ip}:")
    mesh_h2 = h2.status()["mesh_address"]
    assert ipaddress.ip_address(mesh_h2).version == 6
    assert h1.node.ping(mesh_h2, count=3, timeout=5), "no ping over the relayed path"

    ml.wait("e1-e2 direct", lambda: _path(e1, "e2")[0] == "direct" and _path(e2, "e1")[0] == "direct", 30)
    assert _path(e1, "e2") == ("direct", None, None)
    assert e1.node.ping(e2.status()["mesh_address"], count=3, timeout=5)
    ct = e1.peer("e2")["connect_time"]
    assert ct is not None and ct < 10, ct

    # the relay node reaches everyone directly; easy<->hard is relayed (no direct answer)
    for n in (h1, h2, e1, e2):
        assert _path(n, RELAY)[0] == "direct"

    def easy_hard_relayed() -> bool:
        for a in (e1, e2):
            for b in ("h1", "h2"):
                path, via, why = _path(a, b)
                if (path, via) != ("relay", RELAY) or why is None or "no direct answer" not in why:
                    return False
        return True

    ml.wait("easy<->hard relayed", easy_hard_relayed, timeout=30)
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize("how", ["leaves", "dies"])
def test_relay_failover(lab: Lab, how: str) -> None:
    """Two public relays; the hard pair's relay leaves the cluster (its agent stops) or dies (blackholed,
    its affiliate stays): the pair moves to the other one, ping works again within 10 s."""
    tl = build(lab, {"h1": "hard", "h2": "hard"}, relays=("ra", "rb"), cluster_id="relay-failover")
    ml = tl.ml
    h1, h2 = tl.agents["h1"], tl.agents["h2"]
    ml.wait("every pair up", ml.all_up, timeout=60)
    ml.wait("h1-h2 relayed", lambda: _path(h1, "h2")[0] == "relay" and _path(h2, "h1")[0] == "relay", 30)
    used = _path(h1, "h2")[1]
    assert used in ("ra", "rb")
    other = "rb" if used == "ra" else "ra"
    mesh_h2 = h2.status()["mesh_address"]
    assert h1.node.ping(mesh_h2, count=2, timeout=5)

    t0 = time.monotonic()
    if how == "leaves":
        ml.stop_node(used)
    else:
        lab.blackhole(tl.sites[used].node)
    del ml.nodes[used]

    def moved() -> bool:
        return _path(h1, "h2")[:2] == ("relay", other) and _path(h2, "h1")[:2] == ("relay", other)

    ml.wait(f"h1-h2 relayed via {other}", moved, timeout=30, interval=0.2)
    ml.wait("ping over the new relay", lambda: h1.node.ping(mesh_h2, count=1, timeout=1), 15, 0.2)
    took = time.monotonic() - t0
    print(f"relay failover ({how}): {took:.1f} s")
    assert took < 10, f"{took:.1f} s; the agents' last log lines:\n{tl.logs(40)}"


def test_a_relayed_pair_recovers_from_a_nat_rebind_in_seconds(lab: Lab) -> None:
    """h1's NAT forgets its mappings (conntrack flushed on its router): h1's packets reach the relay
    from a new port, which the relay drops until a handshake initiation from there re-latches h1's leg
    (docs/design/relay.md). WireGuard alone initiates again only after 15 s without an answer; the
    agent, whose only path died (nothing else to try), re-creates the peer, which initiates at once."""
    tl = build(lab, {"h1": "hard", "h2": "hard"}, cluster_id="relay-rebind")
    ml = tl.ml
    h1, h2 = tl.agents["h1"], tl.agents["h2"]
    ml.wait("every pair up", ml.all_up, timeout=60)
    ml.wait("h1-h2 relayed", lambda: _path(h1, "h2")[0] == "relay" and _path(h2, "h1")[0] == "relay", 30)
    mesh_h2 = h2.status()["mesh_address"]
    assert h1.node.ping(mesh_h2, count=2, timeout=5)
    before = h1.peer("h2")["endpoint"]

    router = tl.sites["h1"].routers[0]
    router.run(sys.executable, "-c", "from pyroute2 import Conntrack; Conntrack().flush()")
    t0 = time.monotonic()
    # traffic meanwhile (a ping a second at most): the agent notices the silence by it
    ml.wait("ping over the relay again", lambda: h1.node.ping(mesh_h2, count=1, timeout=1), 30, 0.0)
    took = time.monotonic() - t0
    print(f"relayed pair after a NAT rebind: ping again after {took:.1f} s")
    ml.wait("h1 reports h2 up", lambda: _path(h1, "h2")[:2] == ("relay", RELAY), 10, 0.2)
    assert h1.peer("h2")["endpoint"] == before, "the same allocation: its leg re-latched"
    assert took < 5, f"{took:.1f} s; the agents' last log lines:\n{tl.logs(40)}"
