"""Steering "routes" for real: a route per peer prefix in table 180, a ``not fwmark`` rule, the
WireGuard port's exemption, no marking chains; under strict reverse-path filtering too; and the
switch from the marking layout leaving nothing of it behind. Namespaces, wireguard-go, nftables and
the agents are real."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator

import pytest

from kubespan.dataplane.links import LinkManager
from kubespan.dataplane.nft import NftManager
from kubespan.dataplane.ruleset import targets
from kubespan.dataplane.steering import RouteSteering
from netns.lab import Lab, Node
from netns.mesh import MeshLab, MeshNode
from tests.integration.test_mesh import build, tcp_transfer

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

ROUTES = ("--steering", "routes")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def ip_json(node: Node, *args: str) -> list[dict]:
    out = node.run("ip", "-j", *args).stdout
    return json.loads(out) if out.strip() else []


def chains(node: Node) -> set[str]:
    data = json.loads(node.run("nft", "-j", "list", "table", "inet", "kubespan").stdout)
    return {o["chain"]["name"] for o in data["nftables"] if "chain" in o}


def rp_filter(node: Node, value: int) -> None:
    """1 strict, 2 loose (Debian's default); ``all`` and eth0 (the kernel uses the larger)."""
    for key in ("all", "default", "eth0"):
        node.run("sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter={value}", check=False)


def exemption(node: Node) -> list[dict]:
    return [r for fam in ("-4", "-6") for r in ip_json(node, fam, "rule", "show") if r["priority"] == 32499]


def two_nodes(lab: Lab, *extra: str, strict: bool = False) -> tuple[MeshLab, MeshNode, MeshNode]:
    ml = MeshLab(lab)
    seg = lab.segment("lan")
    disc = lab.node("disc")
    lab.attach(disc, seg, ["10.60.0.2/24"])
    ml.start_discovery(disc, "10.60.0.2:3000")
    nodes = []
    for i in (1, 2):
        node = lab.node(f"n{i}")
        lab.attach(node, seg, [f"10.60.0.1{i}/24"])
        rp_filter(node, 1 if strict else 2)
        nodes.append(ml.start_node(node, *extra))
    return ml, nodes[0], nodes[1]


def input_route_ok(node: Node, src: str, dst: str, *selectors: str) -> bool:
    """Does the kernel route a packet from ``src`` to ``dst`` arriving on eth0 (its reverse-path
    check included)?"""
    r = node.run("ip", "route", "get", dst, "from", src, "iif", "eth0", *selectors, check=False)
    return r.returncode == 0 and "table local" in r.stdout


def test_two_nodes_steered_by_routes(lab: Lab) -> None:
    ml, n1, n2 = two_nodes(lab, *ROUTES)
    ml.wait("both peers up", ml.all_up, timeout=60)
    node, peer_mesh = n1.node, n2.status()["mesh_address"]
    # the layout: a route per peer prefix, no default route; the inverted rule (no exemption: loose
    # reverse-path filtering passes tunnel packets)
    dsts = {r["dst"]: r for r in ip_json(node, "-4", "route", "show", "table", "180")}
    assert "default" not in dsts and dsts["10.60.0.12"]["dev"] == "kubespan"
    assert {"mtu": 1420} in dsts["10.60.0.12"]["metrics"]
    # the mesh subnet is the link's own (its connected route); the peers' other prefixes are IPv4 here
    assert ip_json(node, "-6", "route", "show", "table", "180") == []
    assert "dev kubespan" in node.run("ip", "-6", "route", "get", peer_mesh).stdout
    for fam in ("-4", "-6"):
        rules = {r["priority"]: r for r in ip_json(node, fam, "rule", "show")}
        assert "not" in rules[32500] and rules[32500]["fwmark"] == "0x20", rules[32500]
        assert rules[32500]["fwmask"] == "0x60" and rules[32500]["table"] == "180"
    assert exemption(node) == []
    assert chains(node) == {"forward"}  # no marking chains on the packet path
    # unmarked traffic to the peer goes into the mesh; WireGuard's own (marked) goes to main
    assert "dev kubespan" in node.run("ip", "route", "get", "10.60.0.12").stdout
    assert "dev eth0" in node.run("ip", "route", "get", "10.60.0.12", "mark", "0x20").stdout
    # traffic: mesh address and node IP, counted on the tunnel
    assert node.ping(peer_mesh, count=2)
    before = n1.peer("n2")["tx_bytes"]
    assert tcp_transfer(n1, n2, "10.60.0.12") == 1 << 20
    ml.wait(
        "node-IP traffic counted on the tunnel (else it bypassed the mesh)",
        lambda: n1.peer("n2")["tx_bytes"] - before > 1 << 20,
        timeout=10,
    )
    # strict reverse-path filtering switched on at run time: the netconf event brings the exemption
    rp_filter(node, 1)
    ml.wait("exemption rule added", lambda: len(exemption(node)) == 1, timeout=10, interval=0.1)
    (rule,) = exemption(node)
    assert (rule["ipproto"], rule["sport"], rule["table"]) == ("udp", 51820, "main"), rule
    assert node.ping(peer_mesh, count=1)
    rp_filter(node, 2)
    ml.wait("exemption rule removed", lambda: exemption(node) == [], timeout=10, interval=0.1)
    # the agent leaves nothing behind
    assert ml.stop_node("n1") == 0
    assert node.run("ip", "route", "show", "table", "180").stdout.strip() == ""
    for fam in ("-4", "-6"):
        assert {r["priority"] for r in ip_json(node, fam, "rule", "show")} & {32499, 32500} == set()


def test_ipv6_underlay_steered_by_routes(lab: Lab) -> None:
    """Neighbour discovery needs no exemption: replies go out on the device without a route lookup."""
    ml, (n1, n2) = build(lab, 2, *ROUTES, ipv6=True)
    ml.wait("both peers up over IPv6", ml.all_up, timeout=60)
    node = n1.node
    assert n1.peer("n2")["endpoint"] == "[fd60::12]:51820"
    assert "dev kubespan" in node.run("ip", "-6", "route", "get", "fd60::12").stdout
    before = n1.peer("n2")["tx_bytes"]
    assert tcp_transfer(n1, n2, "fd60::12") == 1 << 20
    ml.wait("traffic counted on the tunnel", lambda: n1.peer("n2")["tx_bytes"] - before > 1 << 20, timeout=10)


def test_strict_reverse_path_filter_needs_the_exemption(lab: Lab) -> None:
    ml, n1, n2 = two_nodes(lab, *ROUTES, strict=True)
    ml.wait("both peers up under rp_filter=1", ml.all_up, timeout=60)
    node = n1.node
    (rule,) = exemption(node)  # IPv4 only: IPv6 has no rp_filter
    assert (rule["ipproto"], rule["sport"], rule["table"]) == ("udp", 51820, "main"), rule
    assert node.ping(n2.status()["mesh_address"], count=2)
    assert tcp_transfer(n1, n2, "10.60.0.12") == 1 << 20
    # the kernel's own verdict on a tunnel packet from the peer: accepted thanks to the exemption;
    # any other packet from the peer's underlay address fails the check (the reverse lookup has no
    # mark, so table 180 answers "via kubespan"), as every tunnel packet would without the exemption
    assert input_route_ok(
        node, "10.60.0.12", "10.60.0.11", "ipproto", "udp", "sport", "40000", "dport", "51820"
    )
    assert not input_route_ok(
        node, "10.60.0.12", "10.60.0.11", "ipproto", "udp", "sport", "40000", "dport", "40001"
    )
    assert not input_route_ok(
        node, "10.60.0.12", "10.60.0.11", "ipproto", "tcp", "sport", "1000", "dport", "22"
    )


async def test_switch_from_marks_leaves_nothing_of_it(lab: Lab) -> None:
    n = lab.node("n")
    n.run("ip", "link", "add", "kubespan", "type", "veth", "peer", "name", "ks0")
    n.run("ip", "link", "set", "ks0", "up")
    addr = ipaddress.ip_interface("fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/64")
    want = targets(["10.99.0.0/24", "10.98.0.7/32", "2001:db8:99::/64"])
    async with LinkManager(netns=n.ns) as marks:
        await marks.reconcile([addr])
    await NftManager(netns=n.ns).reconcile(want)
    assert chains(n) >= {"prerouting", "output"}

    async with LinkManager(fwmark=0x20, steering="routes", netns=n.ns) as lm:
        nft = NftManager(netns=n.ns, steering="routes")
        steer = RouteSteering(lm, nft)
        changes = await lm.reconcile([addr]) + await steer.reconcile(want)
        assert await lm.reconcile([addr]) == [] and await steer.reconcile(want) == [], changes
        dsts = sorted(r["dst"] for r in ip_json(n, "-4", "route", "show", "table", "180"))
        assert dsts == ["10.98.0.7", "10.99.0.0/24"]
        assert [r["dst"] for r in ip_json(n, "-6", "route", "show", "table", "180")] == ["2001:db8:99::/64"]
        assert chains(n) == {"forward"}
        (rule,) = [r for r in ip_json(n, "-4", "rule", "show") if r["priority"] == 32500]
        assert "not" in rule and rule["fwmark"] == "0x20"
        # a change is a diff (the cache), and a route removed from outside comes back on a re-read
        fewer = targets(["10.99.0.0/24", "2001:db8:99::/64"])
        assert await steer.reconcile(fewer, trust_cache=True) == [
            "routes in table 180 dev kubespan: add 0, delete 1"
        ]
        n.run("ip", "route", "del", "10.99.0.0/24", "table", "180")
        assert await steer.reconcile(fewer, trust_cache=True) == []  # trusted: not noticed
        assert await steer.reconcile(fewer) == ["routes in table 180 dev kubespan: add 1, delete 0"]
        await lm.teardown()
        await nft.teardown()
    assert ip_json(n, "-4", "route", "show", "table", "180") == []
    assert ip_json(n, "-6", "route", "show", "table", "180") == []
