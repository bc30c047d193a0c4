"""Lab routers behave like the NAT types they model (shared/reference/nat.md §0, §4), observed from outside:
small UDP echo servers on "internet" hosts report the source address each datagram arrived from. The six
profiles of netns.natprofiles are each built with ``Lab.site`` and checked against what they declare."""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pytest

from netns import Lab, Node, PortForward, Router, ping, tcp_transfer, udp_echo, udp_mapped
from netns.lab import Site
from netns.natprofiles import PROFILES, WG_PORT
from netns.reflect import ask, parse_addr, receive, udp_socket
from netns.reflect import start as start_reflector

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


# -- the six profiles of netns.natprofiles, each measured against its declaration ---------------------------

CGN_SPACE = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598: between a CPE and a carrier NAT
O3 = "203.0.113.13"  # a third internet host that never got a packet from the sites
REFLECTORS = (f"{O1}:3478", f"{O2}:3478")


@dataclass
class World:
    lab: Lab
    o1: Node
    o3: Node
    sites: dict[str, Site]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """One lab: two reflectors on different internet addresses, a stranger, and one site per profile."""
    with Lab() as lab:
        net = lab.internet()
        hosts = {}
        for name, ip in (("o1", O1), ("o2", O2), ("o3", O3)):
            hosts[name] = lab.node(name)
            lab.attach(hosts[name], net, [f"{ip}/24"])
        start_reflector(hosts["o1"], O1, 3478)
        start_reflector(hosts["o2"], O2, 3478)
        sites = {name: lab.site(name, name) for name in PROFILES}
        yield World(lab, hosts["o1"], hosts["o3"], sites)


@pytest.mark.parametrize("name", list(PROFILES))
def test_profile_maps_and_filters_as_declared(world: World, name: str) -> None:
    site = world.sites[name]
    p = site.profile
    node, routers = site
    assert len(routers) == p.layers
    with udp_socket(node, "0.0.0.0", WG_PORT) as s:
        # mapping: one source port, two reflectors on different addresses
        m1, m2 = (ask(s, r) for r in REFLECTORS)
        assert m1 is not None and m2 is not None, (m1, m2)
        (ip1, port1), (ip2, port2) = parse_addr(m1), parse_addr(m2)
        assert ip1 == ip2 == site.public_ip  # for cgnat the carrier's address, not the CPE's
        assert all(ipaddress.ip_address(r.outside_ip) in CGN_SPACE for r in routers[:-1])
        if p.mapping == "none":
            assert site.public_ip == site.lan_ip
        assert (m1 == m2) == (p.mapping != "edm"), (m1, m2)
        assert (port1 == port2 == WG_PORT) == p.port_preserved, (m1, m2)
        # filtering: to the mapping towards reflector 1, from a stranger and from reflector 1's host
        # on another port
        with udp_socket(world.o3, O3) as stranger, udp_socket(world.o1, O1) as same_host:
            stranger.sendto(b"stranger", (ip1, port1))
            same_host.sendto(b"same-host", (ip1, port1))
            got = {data for data, _ in receive(s, 2.0)}
    want = {"open": {b"stranger", b"same-host"}, "adf": {b"same-host"}, "apdf": set()}[p.filtering]
    assert got == want
    if routers and p.filtering != "open":  # what kept them out: the firewall, or only the NAT
        assert (routers[-1].unsolicited_dropped() > 0) == p.wan_input_drop


@pytest.mark.parametrize("name", list(PROFILES))
def test_a_stray_inbound_packet_changes_the_port_only_where_declared(world: World, name: str) -> None:
    """nat.md §0: without a WAN input drop, an unsolicited packet leaves an UNREPLIED conntrack entry,
    and the node's first packet to that remote then leaves from a random port (the pollution case)."""
    site = world.sites[name]
    p = site.profile
    with udp_socket(world.o3, O3, 7000) as remote, udp_socket(site.node, "0.0.0.0", WG_PORT) as s:
        remote.sendto(b"stray", (site.public_ip, WG_PORT))
        assert bool(receive(s, 0.3)) == (p.filtering == "open")
        s.sendto(b"hello", (O3, 7000))
        got = receive(remote, 1.0)
    assert [data for data, _ in got] == [b"hello"]
    seen_ip, seen_port = parse_addr(got[0][1])
    assert seen_ip == site.public_ip
    assert (seen_port == WG_PORT) == p.keeps_port_after_stray_inbound, got


# -- the transit ("ISP") hop of Lab.site: TTL-limited openers die between two NATs ---------------------------

TTL_TABLE = "kslab_ttl"


def count_udp(router: Router, ports: Iterable[int]) -> None:
    """Count udp datagrams to each of ``ports`` arriving at ``router`` (before conntrack and routing), by
    the TTL they arrive with."""
    lines = [
        f"table ip {TTL_TABLE} {{",
        "  chain pre { type filter hook prerouting priority raw; policy accept;",
    ]
    for p in ports:
        lines += [f"    udp dport {p} ip ttl {t} counter" for t in (1, 2, 3)]
        lines.append(f"    udp dport {p} counter")
    lines += ["  }", "}"]
    router.run("nft", "-f", "-", input=("\n".join(lines) + "\n").encode())


def arrivals(router: Router) -> dict[tuple[int, int | None], int]:
    """``(port, ttl) -> packets`` from ``count_udp``'s counters (``ttl`` None: any TTL)."""
    out = router.run("nft", "list", "table", "ip", TTL_TABLE).stdout
    got: dict[tuple[int, int | None], int] = {}
    for m in re.finditer(r"udp dport (\d+) (?:ip ttl (\d+) )?counter packets (\d+)", out):
        got[(int(m.group(1)), int(m.group(2)) if m.group(2) else None)] = int(m.group(3))
    return got


def send_with_ttl(node: Node, dst: str, port: int, ttl: int, count: int = 3) -> None:
    with udp_socket(node) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        for _ in range(count):
            s.sendto(b"opener", (dst, port))


def test_sites_reach_the_internet_through_a_transit_router_so_ttl3_dies_before_the_peer_nat() -> None:
    """``Lab.site`` puts a plain ISP router in front of each NAT: node -> own NAT (TTL 3 -> 2) -> own ISP
    (2 -> 1) -> peer's ISP, which drops it. So an opener with TTL 3 never reaches the peer's NAT, while
    TTL 4 arrives there with TTL 1 and TTL 64 arrives too; an internet host is one hop (the ISP) from a
    site's public address. With ``transit=False`` two sites' NATs are neighbours and TTL 2 arrives."""
    with Lab() as lab:
        o1 = lab.node("o1")
        lab.attach(o1, lab.internet(), [f"{O1}/24"])
        a, b = lab.site("a", "easy"), lab.site("b", "easy")
        x, y = lab.site("x", "easy", transit=False), lab.site("y", "easy", transit=False)
        assert a.isp is not None and b.isp is not None and x.isp is None and y.isp is None
        assert b.public_ip == "203.0.113.102" and b.routers[-1].outside_ip == b.public_ip
        assert "nat" not in b.isp.run("nft", "list", "ruleset").stdout  # plain routing
        assert o1.ping(b.public_ip) and a.node.ping(b.public_ip) and x.node.ping(b.public_ip)
        count_udp(b.routers[-1], (9003, 9004, 9064, 9101, 9102))
        count_udp(b.isp, (9003,))
        count_udp(y.routers[-1], (9002,))
        for ttl in (3, 4, 64):
            send_with_ttl(a.node, b.public_ip, 9000 + ttl, ttl)
        send_with_ttl(o1, b.public_ip, 9101, 1)
        send_with_ttl(o1, b.public_ip, 9102, 2)
        send_with_ttl(x.node, y.public_ip, 9002, 2)
        time.sleep(0.3)
        at_nat, at_isp, flat = arrivals(b.routers[-1]), arrivals(b.isp), arrivals(y.routers[-1])
        assert at_isp[(9003, 1)] == 3  # got as far as the peer's ISP, with TTL 1 left
        assert at_nat[(9003, None)] == 0  # ... and died there
        assert at_nat[(9004, 1)] == 3  # one more hop of TTL reaches the NAT, exactly spent
        assert at_nat[(9064, None)] == 3
        assert at_nat[(9101, None)] == 0 and at_nat[(9102, 1)] == 3  # internet host -> ISP -> NAT
        assert flat[(9002, 1)] == 3  # without transit: node -> NAT x -> NAT y
