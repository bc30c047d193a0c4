"""Relay → direct upgrade with real agents (root, netns; issue 14).

Two agents, ``h`` behind the ``hard`` profile (``masquerade fully-random``: symmetric) and ``e`` behind
``easy-fw``, run with ``--punch-retry-initial 5s --punch-retry-max 5s``: their pair cannot connect
directly (nat.md §2), so it is relayed through the public relay node. With a steady ping running from
``e`` to ``h`` across the mesh, ``h``'s router is turned into the easy one (the nat rule becomes a bare
``masquerade``) and ``h`` gets a new address (what makes an agent re-run STUN before its 60 s interval).
Its next STUN run finds an endpoint-independent mapping and publishes it; the next punch retry answers,
both sides move the pair to ``path: direct``, the relay allocation is released (its forwarder ports close)
and the ping loses (almost) nothing during the switch.

Conntrack: a flow's NAT mapping is fixed when its first packet passes, so the old random-port entries
(``h``'s STUN flows, and the punch flow towards ``e`` that every failed retry refreshes) must end before
the new rule can apply. There is no ``conntrack`` tool in the lab; the hard router's *unreplied* UDP
timeout is set to 1 s at the change (the relayed flow, replied and long-lived, keeps the 120 s stream
timeout) and the test waits until no STUN entry is left in the router's conntrack table.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from netns import Lab
from netns.lab import Node
from netns.mesh import MeshNode, mesh_lab
from netns.nat import NAT_TABLE
from netns.traversal import RELAY, STUN_PORT, build

pytestmark = pytest.mark.root

RETRY = ("--punch-retry-initial", "5s", "--punch-retry-max", "5s")
PING_INTERVAL = 0.1


@pytest.fixture
def lab() -> Iterator[Lab]:
    with mesh_lab() as lab:
        yield lab


def _path(n: MeshNode, label: str) -> str:
    p = n.peer(label)
    return "none" if p is None or p["state"] != "up" else str(p["path"])


def _udp_ports(node: Node) -> set[int]:
    out = node.run("ss", "-Hlun").stdout
    return {int(m) for m in re.findall(r":(\d+)\s", out)}


def _stun_entries(router: Node) -> int:
    table = router.run("cat", "/proc/net/nf_conntrack").stdout
    return sum(1 for line in table.splitlines() if f"dport={STUN_PORT} " in line)


def test_relayed_pair_moves_to_direct_when_the_nat_allows(lab: Lab) -> None:
    t_start = time.monotonic()
    tl = build(lab, {"h": "hard", "e": "easy-fw"}, agent_flags=RETRY, cluster_id="upgrade")
    h, e = tl.agents["h"], tl.agents["e"]
    tl.ml.wait("h<->e relayed", lambda: _path(h, "e") == "relay" and _path(e, "h") == "relay", 45)
    relay_ip = tl.sites[RELAY].public_ip
    legs = set()
    for n, other in ((h, "e"), (e, "h")):
        peer = n.peer(other)
        assert peer is not None
        ip, _, port = str(peer["endpoint"]).rpartition(":")
        assert ip == relay_ip, peer
        legs.add(int(port))
    relay_node = tl.sites[RELAY].node
    assert legs <= _udp_ports(relay_node), "the relay's forwarder ports are not open"

    # a steady ping e -> h across the mesh, over the relay for now
    mesh_h = h.status()["mesh_address"]
    assert e.node.ping(mesh_h, count=2, timeout=3), "no ping over the relayed path"
    log = lab.dir / "upgrade-ping.log"
    with log.open("wb") as out:
        ping = subprocess.Popen(
            e.node.argv("ping", "-6", "-n", "-i", str(PING_INTERVAL), "-W", "1", mesh_h, private_run=False),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        time.sleep(1.0)
        # the hard router becomes the easy one (same table, same firewall)
        router = tl.sites["h"].routers[0]
        t_change = time.monotonic()
        router.run("nft", "flush", "chain", "ip", NAT_TABLE, "postrouting")
        router.run(
            "nft", "add", "rule", "ip", NAT_TABLE, "postrouting", "oifname", router.outside_if, "masquerade"
        )
        router.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=1")
        tl.ml.wait("h's old STUN mappings gone", lambda: _stun_entries(router) == 0, 40, 0.5)
        # a new address on h: its agent re-runs STUN now instead of at the 60 s interval
        site = tl.sites["h"]
        prefix = site.lan_ip.rsplit(".", 1)[0]
        dev = next(iter(site.node.links))
        site.node.run("ip", "addr", "add", f"{prefix}.200/24", "dev", dev)
        t_stun = time.monotonic()
        tl.ml.wait(
            "h's STUN finds an endpoint-independent mapping",
            lambda: h.status()["nat"]["nat_class"] == "eim",
            15,
            0.2,
        )
        tl.ml.wait("h<->e direct", lambda: _path(h, "e") == "direct" and _path(e, "h") == "direct", 30, 0.2)
        t_direct = time.monotonic()
        for n, other in ((h, "e"), (e, "h")):
            peer = n.peer(other)
            assert peer is not None
            assert not str(peer["endpoint"]).startswith(f"{relay_ip}:"), peer
            assert peer["relay_via"] is None and peer["why_not_direct"] is None, peer
        tl.ml.wait("the relay allocation released", lambda: not legs & _udp_ports(relay_node), 15, 0.2)
        t_released = time.monotonic()
        time.sleep(3.0)  # the ping keeps running on the direct path
    finally:
        os.killpg(ping.pid, signal.SIGINT)
        try:
            ping.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(ping.pid, signal.SIGKILL)
            ping.wait(5)
    text = log.read_text()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    assert m, text[-2000:]
    sent, received = int(m[1]), int(m[2])
    seqs = sorted(int(s) for s in re.findall(r"icmp_seq=(\d+) ttl=", text))
    gaps = [b - a - 1 for a, b in itertools.pairwise(seqs)]
    lost = sent - received
    missing = sum(gaps)  # lost between the first and last reply (not the one in flight at the end)
    print(
        f"relay -> direct: STUN re-run to direct {t_direct - t_stun:.1f} s (NAT change to direct "
        f"{t_direct - t_change:.1f} s), relay ports closed {t_released - t_direct:.1f} s later; ping every "
        f"{PING_INTERVAL} s: {sent} sent, {lost} lost ({100 * lost / sent:.1f} %; {missing} between replies), longest gap "
        f"{max(gaps, default=0)}; whole test {time.monotonic() - t_start:.0f} s"
    )
    assert sent > 50, text[-2000:]
    assert lost <= max(3, sent // 50), text[-3000:]  # ≤ 2 % (a few at most) lost across the switch
    assert max(gaps, default=0) <= 5, text[-3000:]  # no outage longer than half a second
