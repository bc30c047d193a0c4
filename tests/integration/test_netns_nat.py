"""Lab routers behave like the NAT types they model (shared/reference/nat.md §0, §4), observed from outside:
small UDP echo servers on "internet" hosts report the source address each datagram arrived from."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netns import Lab, Node, PortForward, Router, ping, tcp_transfer, udp_echo, udp_mapped

pytestmark = pytest.mark.root

WAN = "203.0.113.1"
O1, O2 = "203.0.113.11", "203.0.113.12"
H = "192.168.1.10"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def home(lab: Lab, nat: str | None = "eim", **kw: object) -> tuple[Node, Router, Node, Node]:
    """h (192.168.1.10) behind router r (WAN 203.0.113.1) on the internet with o1 and o2."""
    net, lan = lab.internet(), lab.segment("lan")
    o1, o2, h = lab.node("o1"), lab.node("o2"), lab.node("h")
    lab.attach(o1, net, [f"{O1}/24"])
    lab.attach(o2, net, [f"{O2}/24"])
    lab.attach(h, lan, [f"{H}/24"])  # before the router: it still gets the default route
    r = lab.router("r", lan, net, "192.168.1.1/24", f"{WAN}/24", nat=nat, **kw)  # type: ignore[arg-type]
    return h, r, o1, o2


def echo_servers(o1: Node, o2: Node) -> list[str]:
    udp_echo(o1, O1, 3478)
    udp_echo(o2, O2, 3478)
    udp_echo(o2, O2, 3479)
    return [f"{O1}:3478", f"{O2}:3478", f"{O2}:3479"]


def test_eim_keeps_one_external_port_for_every_destination(lab: Lab) -> None:
    h, r, o1, o2 = home(lab, "eim")
    assert "default via 192.168.1.1" in h.run("ip", "route").stdout
    assert ping(h, O1, count=2, interval=0.05).ok
    targets = echo_servers(o1, o2)
    # one inside socket, three destinations (two hosts, two ports): one mapping, and the port is kept
    assert udp_mapped(h, targets, sport=40000) == [f"{WAN}:40000"] * 3
    # a second inside socket gets its own mapping, equally stable
    assert udp_mapped(h, targets, sport=40001) == [f"{WAN}:40001"] * 3
    assert r.unsolicited_dropped() == 0  # the echo replies were all expected


def test_symmetric_nat_picks_a_new_port_per_destination(lab: Lab) -> None:
    h, _r, o1, o2 = home(lab, "symmetric")
    targets = echo_servers(o1, o2)
    mapped = udp_mapped(h, [*targets, targets[0]], sport=40000)
    assert all(m is not None and m.startswith(f"{WAN}:") for m in mapped), mapped
    ports = [m.rsplit(":", 1)[1] for m in mapped if m]
    assert len(set(ports[:3])) == 3, f"one external port per destination expected: {mapped}"
    assert ports[3] == ports[0], "a destination asked again keeps its mapping"


def test_unsolicited_inbound_udp_is_dropped_and_does_not_pollute_the_mapping(lab: Lab) -> None:
    h, r, o1, _o2 = home(lab, "eim")
    listener = udp_echo(r, WAN, 40000)  # something on the router would answer, if the packet got there
    assert udp_mapped(o1, [f"{WAN}:40000"], sport=7000, timeout=0.3, tries=2) == [None]
    assert listener.seen() == []
    assert r.unsolicited_dropped() >= 2
    # nat.md §0: had the stray packet been let in, this flow (same 4-tuple, reversed) would get a random port
    udp_echo(o1, O1, 7000)
    assert udp_mapped(h, [f"{O1}:7000"], sport=40000) == [f"{WAN}:40000"]


def test_without_the_firewall_a_stray_packet_makes_eim_pick_a_random_port(lab: Lab) -> None:
    """The trap the firewall exists for (nat.md §0), kept as a check that the lab still reproduces it."""
    h, r, o1, _o2 = home(lab, "eim", firewall=False)
    assert udp_mapped(o1, [f"{WAN}:40000"], sport=7000, timeout=0.2, tries=1) == [None]
    udp_echo(o1, O1, 7000)
    (mapped,) = udp_mapped(h, [f"{O1}:7000"], sport=40000)
    assert mapped is not None and mapped.startswith(f"{WAN}:") and mapped != f"{WAN}:40000"
    assert r.unsolicited_dropped() == 0


def test_port_forward_reaches_the_inside_host(lab: Lab) -> None:
    h, r, o1, _o2 = home(lab, "eim", port_forward=[PortForward(5555, H), PortForward(7788, H, "tcp")])
    inside = udp_echo(h, "0.0.0.0", 5555)
    (seen,) = udp_mapped(o1, [f"{WAN}:5555"], sport=6000)
    assert seen == f"{O1}:6000"  # DNAT only: the inside host sees the real outside source
    assert inside.seen() == [f"{O1}:6000"]
    # TCP to the router's 7788 lands on h (the server there listens on any address)
    t = tcp_transfer(o1, h, WAN, size=256 << 10, timeout=10, port=7788, bind="")
    assert t.received == 256 << 10 and not t.error, t
    # a port that is not forwarded stays closed, though h listens on it
    udp_echo(h, "0.0.0.0", 5556)
    assert udp_mapped(o1, [f"{WAN}:5556"], timeout=0.3, tries=1) == [None]
    # forwards added and removed at run time (a fresh source port each time: conntrack keeps old flows)
    fwd = r.forward(5556, H)
    assert udp_mapped(o1, [f"{WAN}:5556"]) != [None]
    fwd.remove()
    assert udp_mapped(o1, [f"{WAN}:5556"], timeout=0.3, tries=1) == [None]


def test_routers_in_series_model_cgnat(lab: Lab) -> None:
    net, isp, lan = lab.internet(), lab.segment("isp"), lab.segment("lan")
    o1, h = lab.node("o1"), lab.node("h")
    lab.attach(o1, net, [f"{O1}/24"])
    lab.router("cgnat", isp, net, "100.64.0.1/24", f"{WAN}/24", nat="eim")
    home_r = lab.router("home", lan, isp, "192.168.1.1/24", "100.64.0.2/24", nat="eim")
    lab.attach(h, lan, [f"{H}/24"])
    assert "default via 100.64.0.1" in home_r.run("ip", "route").stdout
    udp_echo(o1, O1, 3478)
    assert udp_mapped(h, [f"{O1}:3478"], sport=40000) == [f"{WAN}:40000"]
