"""The data plane against the real kernel, in lab namespaces: pyroute2 links/routes/rules, nft -j.

There is no WireGuard module on the CI machines (and no ``dummy`` module either), so a veth
named ``kubespan`` stands in for the mesh link; its peer end sits in a "mesh" node that
counts what arrives through the mesh, while an "underlay" node counts what took the normal
route. No traffic leaves the namespaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from kubespan.dataplane import (
    SET_IPV4,
    SET_IPV6,
    LinkManager,
    LinkNotFoundError,
    NetlinkEvent,
    NftManager,
    targets,
)
from kubespan.dataplane.nft import run_subprocess
from netns.lab import Lab, Node

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

MESH_ADDR = ipaddress.ip_interface("fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/64")


def make_link(node: Node, peer: Node | None = None) -> None:
    """A stand-in ``kubespan`` link (veth; the peer end optionally in another node as ``ks0``)."""
    if peer is None:
        node.run("ip", "link", "add", "kubespan", "type", "veth", "peer", "name", "ks0")
        node.run("ip", "link", "set", "ks0", "up")
    else:
        node.run("ip", "link", "add", "kubespan", "type", "veth", "peer", "name", "ks0", "netns", peer.ns)
        peer.run("ip", "link", "set", "ks0", "up")


def ip_json(node: Node, *args: str) -> list[dict]:
    out = node.run("ip", "-j", *args).stdout
    return json.loads(out) if out.strip() else []


def our_rules(node: Node, family: str, priority: int = 32500) -> list[dict]:
    return [r for r in ip_json(node, family, "rule", "show") if r.get("priority") == priority]


def table_routes(node: Node, family: str, table: int = 180) -> list[dict]:
    return ip_json(node, family, "route", "show", "table", str(table))


def link_addrs(node: Node) -> list[str]:
    info = ip_json(node, "addr", "show", "dev", "kubespan")
    return [
        f"{a['local']}/{a['prefixlen']}" for a in info[0]["addr_info"] if not a["local"].startswith("fe80:")
    ]


def nft_table(node: Node, name: str = "kubespan") -> dict | None:
    r = node.run("nft", "-j", "list", "table", "inet", name, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def set_elems(node: Node, name: str) -> list:
    data = nft_table(node)
    assert data is not None
    for obj in data["nftables"]:
        if "set" in obj and obj["set"]["name"] == name:
            return obj["set"].get("elem", [])
    raise AssertionError(f"set {name} missing")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


# --- 1 + 2: create, no-op, self-healing, watch --------------------------------------------------


async def test_create_then_noop(lab: Lab) -> None:
    n = lab.node("n")
    make_link(n)
    async with LinkManager(netns=n.ns) as lm:
        changes = await lm.reconcile([MESH_ADDR])
        assert len(changes) == 7, changes  # mtu, up, address, 2 routes, 2 rules
        assert await lm.reconcile([MESH_ADDR]) == []

    link = ip_json(n, "link", "show", "kubespan")[0]
    assert link["mtu"] == 1420 and "UP" in link["flags"]
    assert link_addrs(n) == [str(MESH_ADDR)]
    for fam in ("-4", "-6"):
        (route,) = table_routes(n, fam)
        assert route["dst"] == "default" and route["dev"] == "kubespan"
        assert route["metric"] == 1 and route["protocol"] == "static"
        assert {"mtu": 1420} in route.get("metrics", [])
        (rule,) = our_rules(n, fam)
        assert rule["fwmark"] == "0x40" and rule["fwmask"] == "0x60" and rule["table"] == "180"

    nm = NftManager(netns=n.ns)
    assert await nm.reconcile(targets(["10.99.0.0/24", "2001:db8:99::/64"])) == [
        "nft table inet kubespan: created"
    ]
    assert await nm.reconcile(targets(["10.99.0.0/24", "2001:db8:99::/64"])) == []
    assert nm.transactions == []  # nothing written


async def test_configurable_table_priority_marks(lab: Lab) -> None:
    n = lab.node("n")
    make_link(n)
    async with LinkManager(
        mtu=1280, table=4242, priority=31000, fwmark=0x400, fwmask=0x600, netns=n.ns
    ) as lm:
        await lm.reconcile([MESH_ADDR])
        assert await lm.reconcile([MESH_ADDR]) == []
    for fam in ("-4", "-6"):
        (rule,) = our_rules(n, fam, 31000)
        assert (rule["fwmark"], rule["fwmask"], rule["table"]) == ("0x400", "0x600", "4242")
        (route,) = table_routes(n, fam, 4242)
        assert {"mtu": 1280} in route["metrics"]
    assert our_rules(n, "-4") == []


async def test_outside_removal_is_restored_exactly_and_watch_fires(lab: Lab) -> None:
    n = lab.node("n")
    make_link(n)
    events: asyncio.Queue[NetlinkEvent] = asyncio.Queue()
    async with LinkManager(netns=n.ns) as lm:
        nm = NftManager(netns=n.ns)
        desired = targets(["10.99.0.0/24", "192.0.2.7", "2001:db8:99::/64"])
        await lm.reconcile([MESH_ADDR])
        await nm.reconcile(desired)

        ready = asyncio.Event()
        seen: list[NetlinkEvent] = []

        def on_event(ev: NetlinkEvent) -> None:
            seen.append(ev)
            events.put_nowait(ev)

        watcher = asyncio.create_task(lm.watch(on_event, ready=ready))
        try:
            await asyncio.wait_for(ready.wait(), 5)

            async def expect(kind: str) -> NetlinkEvent:
                while True:
                    ev = await asyncio.wait_for(events.get(), 5)
                    if ev.kind == kind and ev.action == "del":
                        return ev

            def drain() -> None:
                while not events.empty():
                    events.get_nowait()

            # address
            n.run("ip", "addr", "del", str(MESH_ADDR), "dev", "kubespan")
            await expect("addr")
            assert await lm.reconcile_link([MESH_ADDR]) == [f"address kubespan: add {MESH_ADDR}"]
            assert await lm.reconcile_routes() == [] and await lm.reconcile_rules() == []

            # one route
            n.run("ip", "-6", "route", "del", "default", "table", "180")
            await expect("route")
            assert await lm.reconcile_link([MESH_ADDR]) == []
            assert await lm.reconcile_routes() == ["route table 180: add inet6 default dev kubespan mtu 1420"]
            assert await lm.reconcile_rules() == []

            # a route changed from outside (MTU) is put back
            n.run(
                "ip",
                "route",
                "change",
                "default",
                "dev",
                "kubespan",
                "table",
                "180",
                "metric",
                "1",
                "mtu",
                "1300",
            )
            changes = await lm.reconcile_routes()
            assert (
                changes[-1] == "route table 180: add inet default dev kubespan mtu 1420" and len(changes) == 2
            )
            assert {"mtu": 1420} in table_routes(n, "-4")[0]["metrics"]

            # one rule
            drain()
            n.run("ip", "-4", "rule", "del", "priority", "32500")
            await expect("rule")
            assert await lm.reconcile_rules() == ["rule: add inet priority 32500 fwmark 0x40/0x60 lookup 180"]
            assert await lm.reconcile_link([MESH_ADDR]) == [] and await lm.reconcile_routes() == []

            # the nft table (elements included), then a flushed chain
            n.run("nft", "delete", "table", "inet", "kubespan")
            assert await nm.reconcile(desired) == ["nft table inet kubespan: created"]
            assert set_elems(n, SET_IPV4) == [{"prefix": {"addr": "10.99.0.0", "len": 24}}, "192.0.2.7"]
            n.run("nft", "flush", "chain", "inet", "kubespan", "output")
            (change,) = await nm.reconcile(desired)
            assert change.startswith("nft table inet kubespan: replaced (rules of chain output")
            assert await nm.reconcile(desired) == []

            # the link itself belongs to the WireGuard backend: reported, restored once it is back
            drain()
            n.run("ip", "link", "del", "kubespan")
            await expect("link")
            with pytest.raises(LinkNotFoundError):
                await lm.reconcile_link([MESH_ADDR])
            assert await lm.reconcile_rules() == []  # rules do not depend on the link
            make_link(n)
            assert len(await lm.reconcile([MESH_ADDR])) == 5  # mtu, up, address, 2 routes
            assert not [ev for ev in seen if ev.kind == "resync"]
            assert {ev.kind for ev in seen} == {"link", "addr", "route", "rule"}
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher


async def test_watch_driven_repair_within_5s(lab: Lab) -> None:
    """The engine's loop in miniature: an event wakes a reconcile that repairs the rule."""
    n = lab.node("n")
    make_link(n)
    async with LinkManager(netns=n.ns) as lm:
        await lm.reconcile([MESH_ADDR])
        wake = asyncio.Event()
        ready = asyncio.Event()

        async def loop() -> None:
            while True:
                await wake.wait()
                wake.clear()
                await lm.reconcile([MESH_ADDR])

        tasks = [
            asyncio.create_task(lm.watch(lambda ev: wake.set(), ready=ready)),
            asyncio.create_task(loop()),
        ]
        try:
            await asyncio.wait_for(ready.wait(), 5)
            n.run("ip", "-6", "rule", "del", "priority", "32500")
            n.run("ip", "route", "del", "default", "table", "180")
            deadline = asyncio.get_running_loop().time() + 5
            while asyncio.get_running_loop().time() < deadline:
                if our_rules(n, "-6") and table_routes(n, "-4"):
                    break
                await asyncio.sleep(0.05)
            assert our_rules(n, "-6") and table_routes(n, "-4")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# --- 3: traffic marking ---------------------------------------------------------------------------

PROBE = """
table inet probe {
    counter ping4 {}
    counter ping6 {}
    counter syn4_clamped {}
    counter syn6_clamped {}
    counter syn4_small {}
    counter fwd_syn4_clamped {}
    counter syn_any {}
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        icmp type echo-request counter name "ping4"
        icmpv6 type echo-request counter name "ping6"
        tcp dport 9 tcp flags & (syn | ack) == syn counter name "syn_any"
        ip saddr 192.0.2.1 tcp dport 9 tcp flags & (syn | ack) == syn tcp option maxseg size 1368 counter name "syn4_clamped"
        ip saddr 192.0.2.1 tcp dport 9 tcp flags & (syn | ack) == syn tcp option maxseg size 1000 counter name "syn4_small"
        ip6 saddr 2001:db8:1::1 tcp dport 9 tcp flags & (syn | ack) == syn tcp option maxseg size 1348 counter name "syn6_clamped"
        ip saddr 198.51.100.2 tcp dport 9 tcp flags & (syn | ack) == syn tcp option maxseg size 1368 counter name "fwd_syn4_clamped"
    }
}
"""

MARK_PROBE = """
table inet markprobe {
    counter kept {}
    counter plain {}
    chain post {
        type filter hook postrouting priority 0; policy accept;
        oifname "kubespan" meta mark 0x00010040 counter name "kept"
        oifname "kubespan" meta mark 0x00000040 counter name "plain"
    }
}
"""


def counters(node: Node, table: str = "probe") -> dict[str, int]:
    data = json.loads(node.run("nft", "-j", "list", "counters", "table", "inet", table).stdout)
    return {o["counter"]["name"]: o["counter"]["packets"] for o in data["nftables"] if "counter" in o}


def expect_counts(node: Node, table: str = "probe", timeout: float = 3, **want: int) -> None:
    """Wait (briefly) until the named counters have exactly these values (a packet may still be
    waiting for ARP/ND when the sender gives up)."""
    deadline = time.monotonic() + timeout
    while True:
        got = counters(node, table)
        if all(got[k] == v for k, v in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {k: got[k] for k in want} == want


SYN = (
    "import socket,sys\n"
    "fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
    "s = socket.socket(fam, socket.SOCK_STREAM)\n"
    "if len(sys.argv) > 2: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, int(sys.argv[2]))\n"
    "s.settimeout(0.3)\n"
    "try: s.connect((sys.argv[1], 9))\n"
    "except OSError: pass\n"
)


@dataclass
class Topo:
    a: Node  # the node under test
    u: Node  # underlay: where 10.99.0.1 lives when not routed through the mesh
    s: Node  # the far end of the stand-in mesh link
    c: Node  # a client behind a (forwarded traffic)

    def ping(self, target: str, *mark: str) -> None:
        fam = "-6" if ":" in target else "-4"
        self.a.run("ping", fam, "-c", "1", "-W", "0.3", *mark, target, check=False, timeout=5)

    def syn(self, node: Node, target: str, *extra: str) -> None:
        node.run(sys.executable, "-c", SYN, target, *extra, check=False, timeout=5)


def build_topo(lab: Lab) -> Topo:
    a, u, s, c = lab.node("a"), lab.node("u"), lab.node("s"), lab.node("c")
    lab.link(a, u, ["192.0.2.1/24", "2001:db8:1::1/64"], ["192.0.2.2/24", "2001:db8:1::2/64"])
    lab.link(c, a, ["198.51.100.2/24"], ["198.51.100.1/24"], b_if="eth1")
    make_link(a, s)
    a.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    # the mesh destinations are reachable through the underlay too: only the marks pick the mesh
    u.addr("lo", "10.99.0.1/32")
    u.addr("lo", "2001:db8:99::1/128")
    u.route("198.51.100.0/24", "via", "192.0.2.1")
    a.route("10.99.0.0/24", "via", "192.0.2.2")
    a.route("2001:db8:99::/64", "via", "2001:db8:1::2")
    c.route("default", "via", "198.51.100.1")
    s.addr("ks0", "10.99.0.1/24")
    s.addr("ks0", "2001:db8:99::1/64")
    for node in (u, s):
        node.run("nft", "-f", "-", input=PROBE.encode())
    a.run("nft", "-f", "-", input=MARK_PROBE.encode())
    return Topo(a, u, s, c)


async def test_marking_routes_mesh_destinations_into_table_180(lab: Lab) -> None:
    t = build_topo(lab)
    async with LinkManager(netns=t.a.ns) as lm:
        await lm.reconcile([MESH_ADDR])
    nm = NftManager(netns=t.a.ns)

    # without the set entries everything takes the underlay
    await nm.reconcile({})
    t.ping("10.99.0.1")
    t.ping("2001:db8:99::1")
    expect_counts(t.u, ping4=1, ping6=1)
    expect_counts(t.s, ping4=0, ping6=0)

    await nm.reconcile(targets(["10.99.0.0/24", "2001:db8:99::/64"]))
    ruleset = json.loads(t.a.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    chains = {
        o["chain"]["name"]: o["chain"] for o in ruleset if o.get("chain", {}).get("table") == "kubespan"
    }
    assert chains["output"]["type"] == "route" and chains["output"]["hook"] == "output"
    assert chains["prerouting"]["hook"] == "prerouting" and chains["forward"]["hook"] == "forward"

    # the policy route for marked packets
    got = t.a.run("ip", "route", "get", "10.99.0.1", "mark", "0x40").stdout
    assert "dev kubespan" in got and "table 180" in got
    got6 = t.a.run("ip", "-6", "route", "get", "2001:db8:99::1", "mark", "0x40").stdout
    assert "dev kubespan" in got6 and "table 180" in got6
    assert "eth0" in t.a.run("ip", "route", "get", "10.99.0.1").stdout

    # now local traffic to the mesh prefixes is marked 0x40 and leaves through the mesh link
    t.ping("10.99.0.1")
    t.ping("2001:db8:99::1")
    expect_counts(t.s, ping4=1, ping6=1)
    expect_counts(t.u, ping4=1, ping6=1)
    assert counters(t.a, "markprobe")["plain"] >= 2

    # WireGuard's own packets (mark 0x20) are not re-marked: they keep the underlay
    t.ping("10.99.0.1", "-m", str(0x20))
    expect_counts(t.u, ping4=2)
    expect_counts(t.s, ping4=1)

    # other bits of the mark survive the marking
    t.ping("10.99.0.1", "-m", str(0x10000))
    expect_counts(t.s, ping4=2)
    expect_counts(t.a, "markprobe", kept=1)

    # a non-mesh destination is left alone
    assert "eth0" in t.a.run("ip", "route", "get", "192.0.2.2").stdout

    # MSS: local SYNs clamped to MTU-52 / MTU-72, forwarded ones too, a smaller MSS never raised
    t.syn(t.a, "10.99.0.1")
    t.syn(t.a, "2001:db8:99::1")
    t.syn(t.a, "10.99.0.1", "1000")
    t.syn(t.c, "10.99.0.1")
    expect_counts(t.s, syn4_clamped=1, syn6_clamped=1, syn4_small=1, fwd_syn4_clamped=1, syn_any=4)
    expect_counts(t.u, syn_any=0)

    # no rule of ours needs connection tracking: after all that traffic the node tracks nothing
    # (a ``ct`` match would turn conntrack on for every packet of the namespace)
    tracked = t.a.run("sh", "-c", "cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0")
    assert tracked.stdout.strip() == "0"


# --- 4: set diffs -----------------------------------------------------------------------------------


async def test_set_diff_collapse_and_fallback(lab: Lab) -> None:
    n = lab.node("n")
    nm = NftManager(netns=n.ns)
    base = ["10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/24", "2001:db8:1::/64"]
    await nm.reconcile(targets(base))

    # one prefix changed: one delete and one add in one transaction
    changes = await nm.reconcile(targets(["10.1.0.0/24", "10.2.0.0/24", "10.4.0.0/24", "2001:db8:1::/64"]))
    assert changes == ["nft set targets_ipv4: add 1, delete 1"]
    (tx,) = nm.transactions
    assert tx.kind == "diff" and tx.ok
    assert tx.document == {
        "nftables": [
            {
                "delete": {
                    "element": {
                        "family": "inet",
                        "table": "kubespan",
                        "name": SET_IPV4,
                        "elem": [{"prefix": {"addr": "10.3.0.0", "len": 24}}],
                    }
                }
            },
            {
                "add": {
                    "element": {
                        "family": "inet",
                        "table": "kubespan",
                        "name": SET_IPV4,
                        "elem": [{"prefix": {"addr": "10.4.0.0", "len": 24}}],
                    }
                }
            },
        ]
    }
    assert (await nm.read_sets())[SET_IPV4] == [
        ipaddress.ip_network(p) for p in ("10.1.0.0/24", "10.2.0.0/24", "10.4.0.0/24")
    ]

    # overlapping and adjacent prefixes are collapsed before they reach nft (which rejects overlaps)
    await nm.reconcile(
        targets(
            ["10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24", "10.0.0.7", "2001:db8::/32", "2001:db8:5::/48"]
        )
    )
    assert set_elems(n, SET_IPV4) == [{"prefix": {"addr": "10.0.0.0", "len": 23}}]
    assert set_elems(n, SET_IPV6) == [{"prefix": {"addr": "2001:db8::", "len": 32}}]

    # a diff that fails (the set changed under us between read and write) falls back to flush + re-add
    async def racing_runner(
        argv: Sequence[str], stdin: bytes | None, limit: float
    ) -> tuple[int, bytes, bytes]:
        if stdin is not None and b'"delete"' in stdin and b'"flush"' not in stdin:
            n.run("nft", "delete", "element", "inet", "kubespan", SET_IPV4, "{ 10.0.0.0/23 }")
            n.run("nft", "add", "element", "inet", "kubespan", SET_IPV4, "{ 10.8.0.0/16 }")
        return await run_subprocess(argv, stdin, limit)

    racing = NftManager(netns=n.ns, runner=racing_runner)
    want = targets(["10.8.1.0/24", "10.9.0.0/16", "2001:db8::/32"])
    changes = await racing.reconcile(want)
    assert [t.kind for t in racing.transactions] == ["diff", "flush"]
    assert not racing.transactions[0].ok and "Error" in (racing.transactions[0].error or "")
    assert racing.transactions[1].ok
    assert changes == ["nft set targets_ipv4: flushed and re-added 2"]
    assert await racing.read_sets() == {
        SET_IPV4: [ipaddress.ip_network("10.8.1.0/24"), ipaddress.ip_network("10.9.0.0/16")],
        SET_IPV6: [ipaddress.ip_network("2001:db8::/32")],
    }
    assert await racing.reconcile(want) == []


# --- 5: teardown ------------------------------------------------------------------------------------


async def test_teardown_removes_ours_only(lab: Lab) -> None:
    n = lab.node("n")
    make_link(n)
    lab.link(n, lab.node("m"), ["192.0.2.1/24"], ["192.0.2.2/24"])
    # unrelated state that must survive
    n.run("ip", "rule", "add", "priority", "100", "fwmark", "0x1", "lookup", "100")
    n.run("ip", "rule", "add", "priority", "32500", "fwmark", "0x40/0x60", "lookup", "200")
    n.run("ip", "-6", "rule", "add", "priority", "32501", "fwmark", "0x40/0x60", "lookup", "180")
    n.run("ip", "route", "add", "10.5.0.0/16", "via", "192.0.2.2", "table", "180")
    n.run("ip", "route", "add", "10.6.0.0/16", "via", "192.0.2.2")
    n.run("nft", "add", "table", "inet", "other")

    async with LinkManager(netns=n.ns) as lm:
        await lm.reconcile([MESH_ADDR])
        assert await lm.reconcile([MESH_ADDR]) == []  # the unrelated rule at 32500 (table 200) is not ours
        nm = NftManager(netns=n.ns)
        await nm.reconcile(targets(["10.99.0.0/24"]))

        await nm.teardown()
        await lm.teardown()
        await nm.teardown()  # idempotent
        await lm.teardown()

    assert nft_table(n) is None and nft_table(n, "other") is not None
    assert link_addrs(n) == []
    assert ip_json(n, "link", "show", "kubespan")  # the link is the WireGuard backend's
    assert [r["dst"] for r in table_routes(n, "-4")] == ["10.5.0.0/16"]
    assert table_routes(n, "-6") == []
    rules4 = {(r["priority"], r.get("table")) for r in ip_json(n, "-4", "rule", "show")}
    assert (100, "100") in rules4 and (32500, "200") in rules4 and (32500, "180") not in rules4
    rules6 = {(r["priority"], r.get("table")) for r in ip_json(n, "-6", "rule", "show")}
    assert (32501, "180") in rules6 and (32500, "180") not in rules6
    assert "10.6.0.0/16" in n.run("ip", "route").stdout

    async with LinkManager(netns=n.ns) as lm:
        await lm.teardown(remove_link=True)
    assert n.run("ip", "link", "show", "kubespan", check=False).returncode != 0


HOST_ADDRESSES = """
import asyncio, json, sys
from kubespan.hostinfo import NetlinkHost
async def main():
    h = NetlinkHost()
    try:
        out = {}
        for name, exclude in (("none", ()), ("mesh", ("kubespan",)), ("absent", ("nosuchlink",))):
            out[name] = sorted(str(a) for a in await h.addresses(exclude_links=exclude))
        print(json.dumps(out))
    finally:
        await h.close()
asyncio.run(main())
"""


def test_host_addresses_leave_out_the_mesh_link_loopback_and_link_local(lab: Lab) -> None:
    """The mesh's host view (kubespan.hostinfo.NetlinkHost, read inside the node): global addresses
    of every link except the excluded ones (by name; a name no link has excludes nothing)."""
    node = lab.node("h")
    make_link(node)
    node.run("ip", "addr", "add", "10.77.0.1/24", "dev", "ks0")
    node.run("ip", "addr", "add", "2001:db8:77::1/64", "dev", "ks0", "nodad")
    node.run("ip", "addr", "add", str(MESH_ADDR), "dev", "kubespan", "nodad")
    node.run("ip", "addr", "add", "10.78.0.1/24", "dev", "kubespan")
    node.run("ip", "addr", "add", "fe80::77/64", "dev", "ks0", "nodad")
    got = json.loads(node.run(sys.executable, "-c", HOST_ADDRESSES).stdout)
    ks0 = ["10.77.0.1/24", "2001:db8:77::1/64"]
    mesh = ["10.78.0.1/24", str(MESH_ADDR)]
    assert got["mesh"] == sorted(ks0)
    assert got["none"] == got["absent"] == sorted(ks0 + mesh)
