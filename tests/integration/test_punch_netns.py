"""Hole punching with TTL-limited openers and MAC'd probes between real wireguard-go nodes (root, netns).

Layout: nodes a and b, each behind a ``netns.natprofiles`` profile built by ``Lab.site`` (a-nat, b-nat),
each NAT behind its own plain ISP router (a-isp, b-isp), as on the internet: an opener with TTL 3 passes
its own NAT (TTL 3 -> 2), its ISP (2 -> 1) and dies at the peer's ISP, never reaching the peer's NAT.

In each node a driver process (``DRIVER``) runs what the engine will run at a punch: the probe
responder, openers at the given wall-clock times, then probes; it prints the address that answered.
The test then points WireGuard at that address (keepalive on) and waits for a handshake.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from kubespan.identity import generate_private_key
from kubespan.wireguard import UserspaceBackend, sync
from kubespan.wireguard.types import AddrPort, DeviceConfig, PeerConfig, PresharedKey, PrivateKey
from netns import Lab, Node
from netns.natprofiles import WG_PORT, direct_possible

pytestmark = pytest.mark.root

PY = sys.executable
STAGGER = 7.0  # b starts this much before a (nat.md §0's pollution case)
NAIVE_WINDOW = 15.0  # the naive control: no handshake this long after a's start (nat.md: none in 75 s)
PROBE_TIMEOUT = 5.0
SECRET = os.urandom(32)

# Runs in a node: the probe responder from the start, openers at each time of "early_openers_at" (wall
# seconds), then one punch (openers at "start_ms", probes a second later until an answer or the
# timeout); prints one JSON line, keeps answering for "linger" seconds (the peer may still be
# probing), then prints the responder's counters.
DRIVER = """
import asyncio, json, sys, time
from kubespan.nat import opener, probemsg
from kubespan.wireguard.types import AddrPort, PublicKey
cfg = json.loads(sys.argv[1])
key = probemsg.probe_key(bytes.fromhex(cfg["secret"]))
own, peer = PublicKey.from_b64(cfg["own"]), PublicKey.from_b64(cfg["peer"])
candidates = [AddrPort.parse(c) for c in cfg["candidates"]]
async def until(t):
    await asyncio.sleep(max(0.0, t - time.time()))
async def main():
    async with opener.ProbeResponder(cfg["port"], key, own, lambda k: k == peer) as r:
        for t in cfg["early_openers_at"]:
            await until(t)
            sent = opener.send_openers(cfg["port"], candidates, ttl=cfg["ttl"])
            print(json.dumps({"openers": sent, "at": time.time()}), flush=True)
        found = await opener.punch(cfg["port"], candidates, cfg["start_ms"], key=key, own=own, peer=peer,
                                   ttl=cfg["ttl"], timeout=cfg["timeout"])
        print(json.dumps({"found": None if found is None else str(found), "at": time.time()}), flush=True)
        await asyncio.sleep(cfg["linger"])
        print(json.dumps({"answered": r.answered, "dropped": dict(r.dropped)}), flush=True)
asyncio.run(main())
"""


@dataclass
class Side:
    node: Node
    public_ip: str
    lan_ip: str
    key: PrivateKey
    tunnel: str
    backend: UserspaceBackend | None = None

    @property
    def candidates(self) -> list[str]:
        """What the peer would know from discovery: the mapped endpoint (the port is kept, or for a
        symmetric NAT is the peer's guess) and the LAN address (unreachable from the other site)."""
        return [str(AddrPort(ip_address(ip), WG_PORT)) for ip in dict.fromkeys((self.public_ip, self.lan_ip))]


def build(lab: Lab, a_profile: str, b_profile: str) -> tuple[Side, Side]:
    """Two sites (``Lab.site``, with their transit routers) and the WireGuard side of each."""
    sides = []
    for k, (name, prof_name) in enumerate((("a", a_profile), ("b", b_profile)), start=1):
        site = lab.site(name, prof_name)
        assert site.isp is not None, "the openers need a transit hop between the NATs"
        sides.append(Side(site.node, site.public_ip, site.lan_ip, generate_private_key(), f"10.88.0.{k}"))
    return sides[0], sides[1]


PSK = PresharedKey(SECRET)


def peer_config(me: Side, other: Side, endpoint: str | None, keepalive: int) -> DeviceConfig:
    peer = PeerConfig(
        other.key.public_key(),
        frozenset({ip_network(f"{other.tunnel}/32")}),
        AddrPort.parse(endpoint) if endpoint else None,
        keepalive,
        PSK,
    )
    return DeviceConfig.of(me.key, WG_PORT, 0, [peer])


async def wg_up(me: Side, other: Side, endpoint: str | None = None) -> None:
    """wireguard-go on ``me`` with ``other`` as its peer; keepalive (and so an initiation) only when
    an endpoint is known."""
    me.backend = UserspaceBackend(
        "kubespan",
        socket_dir=me.node.run_dir / "wireguard",
        command_prefix=["ip", "netns", "exec", me.node.ns],
    )
    await me.backend.ensure_device()
    await sync(me.backend, peer_config(me, other, endpoint, 25 if endpoint else 0))
    me.node.run("ip", "addr", "replace", f"{me.tunnel}/24", "dev", "kubespan")
    me.node.run("ip", "link", "set", "kubespan", "up")


async def set_endpoint(me: Side, other: Side, endpoint: str) -> None:
    assert me.backend is not None
    await sync(me.backend, peer_config(me, other, endpoint, 25))  # keepalive 0 -> 25: initiate now


async def handshake_at(me: Side, within: float) -> float | None:
    """Wall time of ``me``'s first handshake, polled until ``within`` seconds from now."""
    assert me.backend is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        dev = await me.backend.get()
        if dev is not None:
            for p in dev.peers.values():
                if p.last_handshake:
                    return p.last_handshake
        await asyncio.sleep(0.05)
    return None


async def close(*sides: Side) -> None:
    for s in sides:
        if s.backend is not None:
            await s.backend.close(remove=True)


async def driver(
    me: Side, other: Side, start: float, linger: float, ttl: int = 3, early: tuple[float, ...] = ()
) -> Any:
    """The punch driver in ``me``: a punch at ``start`` (wall seconds), openers also at ``early``."""
    cfg = {
        "port": WG_PORT,
        "secret": SECRET.hex(),
        "own": me.key.public_key().b64,
        "peer": other.key.public_key().b64,
        "candidates": other.candidates,
        "early_openers_at": list(early),
        "start_ms": int(start * 1000),
        "ttl": ttl,
        "timeout": PROBE_TIMEOUT,
        "linger": linger,
    }
    return await me.node.spawn(PY, "-c", DRIVER, json.dumps(cfg), name="punch", private_run=False)


async def driver_line(proc: Any, key: str, within: float) -> dict[str, Any]:
    """The driver's first JSON line holding ``key``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in proc.log.read_text().splitlines():
            if line.startswith("{") and key in (doc := json.loads(line)):
                return doc
        assert proc.running or proc.returncode == 0, proc.tail()
        await asyncio.sleep(0.05)
    raise AssertionError(f"driver printed no {key!r} in {within} s: {proc.tail()}")


async def test_naive_endpoints_deadlock_on_a_bare_nat_when_one_side_is_late() -> None:
    """The control (nat.md §0): b points WireGuard at a at once, a at b 7 s later; b's initiations left
    a stray conntrack entry on a's NAT, so a's flow is remapped to a random port and nothing meets."""
    async with Lab() as lab:
        a, b = build(lab, "easy", "easy")
        try:
            await wg_up(b, a, f"{a.public_ip}:{WG_PORT}")
            await asyncio.sleep(STAGGER)
            await wg_up(a, b, f"{b.public_ip}:{WG_PORT}")
            assert await handshake_at(a, NAIVE_WINDOW) is None, "the naive path connected: no pollution?"
            conntrack = lab.nodes["a-nat"].run("cat", "/proc/net/nf_conntrack", check=False).stdout
            remapped = [
                ln for ln in conntrack.splitlines() if "dport=51820" in ln and f"src={a.lan_ip} " in ln
            ]
            assert remapped and all(
                f"dport={WG_PORT} " not in ln.split(f"src={b.public_ip} ")[-1] for ln in remapped
            )
        finally:
            await close(a, b)


@pytest.mark.parametrize("ttl", [3, 64])
async def test_openers_then_probes_connect_the_late_pair_on_a_bare_nat(
    ttl: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same NATs and stagger, punching: b opens at its start, both open at the shared start time (a's),
    probe a second later and set WireGuard to the answer: handshake and ping. With full-TTL openers
    (64) b's first opener reaches a's NAT and pollutes it exactly like the naive initiation: nothing
    answers, which shows it is the TTL limit that avoids the deadlock."""
    async with Lab() as lab:
        a, b = build(lab, "easy", "easy")
        try:
            await wg_up(b, a)
            t_b = time.time() + 1.5  # the drivers need about a second to start
            t_a = t_b + STAGGER
            pb = await driver(b, a, t_a, linger=4, ttl=ttl, early=(t_b,))
            await asyncio.sleep(max(0.0, t_a - 1.5 - time.time()))
            await wg_up(a, b)
            pa = await driver(a, b, t_a, linger=4, ttl=ttl)
            found_a = (await driver_line(pa, "found", STAGGER + PROBE_TIMEOUT + 5))["found"]
            found_b = (await driver_line(pb, "found", PROBE_TIMEOUT + 5))["found"]
            if ttl > 3:
                assert (found_a, found_b) == (None, None)
                return
            assert found_a == f"{b.public_ip}:{WG_PORT}" and found_b == f"{a.public_ip}:{WG_PORT}"
            await set_endpoint(a, b, found_a)
            await set_endpoint(b, a, found_b)
            hs = await handshake_at(a, 10)
            assert hs is not None, "no handshake after the probes answered"
            assert a.node.ping(b.tunnel, count=3, timeout=2)
            stats = await driver_line(pb, "answered", 10)
            assert stats["answered"] >= 1 and not stats["dropped"], stats
            with capsys.disabled():
                print(
                    f"\neasy<->easy, b {STAGGER:g} s early: first handshake {hs - t_a:.2f} s after a's start"
                )
        finally:
            await close(a, b)


@pytest.mark.parametrize(("pa", "pb"), [("forward", "hard"), ("easy-fw", "hard"), ("hard", "hard")])
async def test_probing_finds_a_path_exactly_where_nat_md_says_one_exists(
    pa: str, pb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both start together. ``forward`` <-> ``hard``: the hard side's probe gets through the port forward
    and its answer back through the hard side's fresh mapping; the forward side finds nothing (the hard
    side's mapping towards it is unknowable) and learns the path from WireGuard's roaming instead.
    ``easy-fw`` <-> ``hard`` and ``hard`` <-> ``hard``: endpoint-dependent mapping against port-restricted
    filtering, nothing answers within the timeout (nat.md §2: relay)."""
    async with Lab() as lab:
        a, b = build(lab, pa, pb)
        try:
            await wg_up(a, b)
            await wg_up(b, a)
            t = time.time() + 1.5
            procs = [await driver(a, b, t, linger=2), await driver(b, a, t, linger=2)]
            if not direct_possible(pa, pb):
                found = [(await driver_line(p, "found", PROBE_TIMEOUT + 8))["found"] for p in procs]
                assert found == [None, None]
                return
            found_b = (await driver_line(procs[1], "found", PROBE_TIMEOUT + 8))["found"]
            assert found_b == f"{a.public_ip}:{WG_PORT}"
            await set_endpoint(b, a, found_b)  # at once, as the engine would
            hs = await handshake_at(a, 10)
            assert (await driver_line(procs[0], "found", PROBE_TIMEOUT + 8))["found"] is None
            assert hs is not None and a.node.ping(b.tunnel, count=3, timeout=2)
            dev = await a.backend.get()  # type: ignore[union-attr]
            (seen,) = dev.peers.values()  # type: ignore[union-attr]
            assert seen.endpoint is not None and str(seen.endpoint.ip) == b.public_ip  # roamed to b's mapping
            with capsys.disabled():
                print(
                    f"\n{pa}<->{pb}: first handshake {hs - t:.2f} s after the start, a roamed to {seen.endpoint}"
                )
        finally:
            await close(a, b)


async def test_probes_and_answers_over_ipv6() -> None:
    """The IPv6 socket path (kernel checksum, hop limit, the filter seeing the UDP header, the answer's
    source chosen with IPV6_PKTINFO) between two directly linked nodes, both probing."""
    async with Lab() as lab:
        na, nb = lab.node("a"), lab.node("b")
        lab.link(na, nb, ["2001:db8::1/64"], ["2001:db8::2/64"])
        a = Side(na, "2001:db8::1", "2001:db8::1", generate_private_key(), "")
        b = Side(nb, "2001:db8::2", "2001:db8::2", generate_private_key(), "")
        t = time.time() + 1.5
        procs = [await driver(a, b, t, linger=1), await driver(b, a, t, linger=1)]
        found = [(await driver_line(p, "found", PROBE_TIMEOUT + 8))["found"] for p in procs]
        assert found == ["[2001:db8::2]:51820", "[2001:db8::1]:51820"]
        stats = [await driver_line(p, "answered", 5) for p in procs]
        assert all(st["answered"] >= 1 and not st["dropped"] for st in stats), stats
