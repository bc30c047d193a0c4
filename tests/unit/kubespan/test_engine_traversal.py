"""Hole punching and the relay in the mesh engine, against the fake punch and relay ports (issue 14):
when punches start, what is published, which endpoint a peer gets, relay choice, NOTIFY, failover
and the upgrade back to a direct path."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from discovery.crypto import endpoint_from_addr
from kubespan.affiliate import PunchIntent, RemoteAffiliate, Traversal
from kubespan.dataplane.fake import FakeLinkManager, FakeNftManager
from kubespan.engine import Mesh, MeshOptions
from kubespan.hostinfo import StaticHost
from kubespan.identity import LinkInfo, generate_private_key, ula_prefix
from kubespan.nat.classify import NatClass, NatReport
from kubespan.nat.punch import PunchTimings
from kubespan.snapshot import PeerStatus
from kubespan.testing import Discovered, FakeDiscovery, FakeProber, FakePunch, FakeRelayClient, FakeStun
from kubespan.traversal import RELAY_KEEPALIVE
from kubespan.wireguard.diff import RemovePeer
from kubespan.wireguard.fake import FakeWireGuard
from kubespan.wireguard.types import AddrPort, PublicKey
from spanapi.discovery.client import affiliate_pb2
from spanutil.testing import ManualClock

CLUSTER = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
SECRET = bytes(range(32))
SERVERS = (("192.0.2.1", 3478), ("192.0.2.2", 3478))
RESPONDERS = (AddrPort.parse("192.0.2.1:3478"), AddrPort.parse("192.0.2.2:3478"))
TIMINGS = PunchTimings(lead=0.2, window=0.6, retry_initial=5.0, retry_max=10.0)


def report(cls: NatClass) -> NatReport:
    mapped = AddrPort.parse("198.51.100.7:40000")
    return NatReport(cls, mapped, RESPONDERS)


def mesh_addr(host: int) -> ipaddress.IPv6Address:
    addr = ula_prefix(CLUSTER)[host]
    assert isinstance(addr, ipaddress.IPv6Address)
    return addr


def remote(
    node_id: str,
    addr: str,
    host: int,
    key: PublicKey,
    *,
    nat: str = "unknown",
    relay: bool = False,
    punches: tuple[PunchIntent, ...] = (),
) -> Discovered:
    a = affiliate_pb2.Affiliate(node_id=node_id, nodename=node_id, hostname=node_id)
    a.addresses.append(ipaddress.ip_address(addr).packed)
    a.kubespan.public_key = key.b64
    a.kubespan.address = mesh_addr(host).packed
    a.kubespan.traversal.CopyFrom(Traversal(nat, relay, punches).to_pb())
    return Discovered(node_id, a, (endpoint_from_addr(ipaddress.ip_address(addr), 51820),))


def key_beside(own: PublicKey, *, above: bool) -> PublicKey:
    """A new public key ordered above (or below) ``own``: which side chooses the relay."""
    while True:
        k = generate_private_key().public_key()
        if (k.raw > own.raw) == above:
            return k


class Rig:
    def __init__(self, tmp_path: Path, nat: NatClass, *, relay_failover: float = 5.0) -> None:
        self.clock = ManualClock()
        self.disc = FakeDiscovery(public_ip=ipaddress.ip_address("203.0.113.9"))
        self.wg = FakeWireGuard(clock=time.time)
        self.punch = FakePunch()
        self.relay = FakeRelayClient()
        opts = MeshOptions(
            cluster_id=CLUSTER,
            cluster_secret=SECRET,
            state_dir=tmp_path / "state",
            nodename="self",
            stun_servers=SERVERS,
            punch_timings=TIMINGS,
            relay_failover=relay_failover,
        )
        self.m = Mesh(
            opts,
            backend=self.wg,
            links=FakeLinkManager(link_exists=True),
            nft=FakeNftManager(),
            host=StaticHost(
                [LinkInfo("eth0", bytes.fromhex("2e1ab6538169"), physical=True)],
                [ipaddress.ip_interface("10.5.0.1/24")],
            ),
            discovery=self.disc,
            prober=FakeProber(),
            stun=FakeStun(report=report(nat)),
            punch=self.punch,
            relay_client=self.relay,
            clock=self.clock,
        )

    @property
    def own(self) -> PublicKey:
        assert self.m.identity is not None
        return self.m.identity.public_key

    async def run(self, passes: int = 1, advance: float = 1.0) -> None:
        """Full passes ``advance`` seconds apart (monotonic), letting background tasks run between."""
        for _ in range(passes):
            for _ in range(5):
                await asyncio.sleep(0)
            self.clock.advance(advance)
            await self.m.reconcile()
            await asyncio.sleep(0)

    async def until(
        self, check: Callable[[], object], within: float = 3.0, each: Callable[[], None] | None = None
    ) -> None:
        """Run passes (calling ``each`` before every one) until ``check()`` holds."""
        deadline = time.monotonic() + within
        while not check():
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.05)
            if each is not None:
                each()
            await self.run()

    def traversal(self) -> Traversal:
        pb, endpoints, _ = self.disc.published[-1]
        return RemoteAffiliate.from_pb(pb, endpoints).traversal

    def endpoint(self, key: PublicKey) -> AddrPort | None:
        assert self.wg.device is not None
        peer = self.wg.device.peers.get(key)
        return peer.endpoint if peer is not None else None

    def status(self, key: PublicKey) -> PeerStatus:
        return next(p for p in self.m.status().peers if p.public_key == key.b64)

    def handshake(self, key: PublicKey, rx: int = 148) -> None:
        """A session on a working path: a probe through it is answered too (first contact's
        confirmation, kubespan.firstcontact)."""
        self.wg.traffic(key, rx=rx, tx=rx, handshake=True)
        self.m.prober.answer(key)

    def allocations_to(self, relay: PublicKey) -> list[PublicKey]:
        """The peers of the allocations requested on ``relay`` (by its mesh address)."""
        assert self.m.traversal is not None
        addr = next(a for a, k in self.m.traversal._who.items() if k == relay)
        return [p for r, p in self.relay.allocations if str(r) == addr]


@pytest.fixture
async def eim(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path, NatClass.EIM)
    await r.m.start()
    try:
        yield r
    finally:
        await r.m.stop()


@pytest.fixture
async def edm(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path, NatClass.EDM, relay_failover=3.0)
    await r.m.start()
    try:
        yield r
    finally:
        await r.m.stop()


async def test_punch_starts_at_the_agreed_start_only_once_the_peer_committed(eim: Rig) -> None:
    peer = generate_private_key().public_key()
    await eim.run()  # STUN done
    eim.disc.put(remote("b", "198.51.100.20", 2, peer, nat="eim"))
    await eim.run()
    mine = eim.traversal().punches
    assert [i.peer for i in mine] == [peer]
    start_ms = mine[0].start_ms
    # the peer has not committed yet: no punch even after the start
    await asyncio.sleep(max(0.0, start_ms / 1000 - time.time()) + 0.05)
    await eim.run()
    assert eim.punch.calls == []
    # a gated peer (both behind NAT) is not tried naively meanwhile
    assert eim.endpoint(peer) is None
    # the peer names us with the same start: the punch runs, not before the start
    eim.clock.advance(0)
    eim.disc.put(
        remote("b", "198.51.100.20", 2, peer, nat="eim", punches=(PunchIntent(peer, b"\0" * 8, start_ms),))
    )
    eim.disc.put(
        remote("b", "198.51.100.20", 2, peer, nat="eim", punches=(PunchIntent(eim.own, b"\0" * 8, start_ms),))
    )
    await eim.until(lambda: eim.punch.calls)
    call = eim.punch.calls[0]
    assert call.peer == peer and call.start_ms == start_ms and call.openers
    assert call.at >= start_ms / 1000
    assert call.candidates == (AddrPort.parse("198.51.100.20:51820"),)


async def _committed_peer(rig: Rig, found: AddrPort | None, host: int = 2) -> PublicKey:
    """A NAT'd peer that names us in its intent with our start; returns its key once a punch ran."""
    peer = generate_private_key().public_key()
    rig.punch.results[peer] = found
    await rig.run()
    rig.disc.put(remote(f"n{host}", f"198.51.100.{host}", host, peer, nat="eim"))
    await rig.run()
    start_ms = next(i.start_ms for i in rig.traversal().punches if i.peer == peer)
    intent = (PunchIntent(rig.own, b"\0" * 8, start_ms),)
    rig.disc.put(remote(f"n{host}", f"198.51.100.{host}", host, peer, nat="eim", punches=intent))
    await rig.until(lambda: any(c.peer == peer for c in rig.punch.calls))
    return peer


async def test_punch_answer_becomes_the_endpoint_and_the_intent_goes(eim: Rig) -> None:
    found = AddrPort.parse("198.51.100.2:41000")  # the peer's NAT rewrote the port
    peer = await _committed_peer(eim, found)
    await eim.until(lambda: eim.endpoint(peer) == found)
    await eim.until(lambda: eim.status(peer).state == "up", each=lambda: eim.handshake(peer))
    await eim.run()
    st = eim.status(peer)
    assert (st.path, st.relay_via, st.why_not_direct) == ("direct", None, None)
    assert st.connect_time is not None and 0 <= st.connect_time < 3
    # direct and up: nothing more to punch, the intent is withdrawn
    await eim.run()
    assert eim.traversal().punches == ()


async def _relay_node(rig: Rig, host: int = 9, name: str = "relay", port: int = 40100) -> PublicKey:
    """A public node that announces relay, up (handshake seen), with the fake relay answering."""
    key = generate_private_key().public_key()
    rig.disc.put(remote(name, f"203.0.113.{host}", host, key, nat="public", relay=True))
    await rig.run()
    await rig.until(lambda: rig.status(key).state == "up", each=lambda: rig.handshake(key))
    rig.relay.ports[mesh_addr(host)] = port
    return key


async def test_symmetric_pair_is_relayed_by_the_lower_key(edm: Rig) -> None:
    await edm.run()
    await _relay_node(edm)
    assert edm.relay.started
    peer = key_beside(edm.own, above=True)  # we choose
    edm.disc.put(remote("b", "198.51.100.20", 2, peer, nat="edm"))
    relayed = AddrPort.parse("203.0.113.9:40100")
    await edm.until(lambda: edm.endpoint(peer) == relayed)
    assert edm.relay.allocations == [(mesh_addr(9), peer)]
    assert edm.punch.calls == []  # never punched: both symmetric
    assert edm.wg.device is not None and edm.wg.device.peers[peer].persistent_keepalive == RELAY_KEEPALIVE
    await edm.until(lambda: edm.status(peer).path == "relay", each=lambda: edm.handshake(peer))
    st = edm.status(peer)
    assert st.relay_via == "relay"
    assert st.why_not_direct == "both behind symmetric NAT"
    assert edm.traversal().punches == ()


async def test_follower_applies_the_notify(edm: Rig) -> None:
    await edm.run()
    await _relay_node(edm)
    peer = key_beside(edm.own, above=False)  # the peer chooses
    edm.disc.put(remote("b", "198.51.100.20", 2, peer, nat="edm"))
    await edm.run(2)
    assert edm.relay.allocations == []  # waiting for the chooser's NOTIFY (grace 5 s)
    edm.relay.notify(mesh_addr(9), peer, 40222)
    await edm.until(lambda: edm.endpoint(peer) == AddrPort.parse("203.0.113.9:40222"))
    assert edm.relay.allocations == []


async def _relayed_via_a(edm: Rig) -> PublicKey:
    """Two relays (relay-a the nearer); a peer behind symmetric NAT that we allocate for: on relay-a."""
    await edm.run()
    first = await _relay_node(edm, 9, "relay-a", 40100)
    await _relay_node(edm, 10, "relay-b", 40200)
    edm.relay.rtts = {mesh_addr(9): 0.001, mesh_addr(10): 0.005}
    edm.m.traversal.rtt = {first: 0.001}  # type: ignore[union-attr]
    peer = key_beside(edm.own, above=True)
    edm.disc.put(remote("b", "198.51.100.20", 2, peer, nat="edm"))
    await edm.until(lambda: edm.endpoint(peer) == AddrPort.parse("203.0.113.9:40100"))
    return peer


async def test_relay_failover_to_the_next_relay(edm: Rig) -> None:
    peer = await _relayed_via_a(edm)
    # the first route of a peer without a session re-creates it: WireGuard would hold the initiation
    # for up to 5 s after the one it could not send without an endpoint
    first_removed = [op.public_key for ops in edm.wg.applies for op in ops if isinstance(op, RemovePeer)]
    assert first_removed == [peer]
    edm.handshake(peer)
    await edm.run()
    # relay-a dies: no rx on the relayed path for longer than failover_after (3 s here)
    await edm.run(5)
    assert edm.endpoint(peer) == AddrPort.parse("203.0.113.10:40200")
    assert edm.relay.allocations[-1] == (mesh_addr(10), peer)
    # moved from one relay to another: the peer was re-created, so a new handshake latches the new legs
    removed = [op for ops in edm.wg.applies for op in ops if isinstance(op, RemovePeer)]
    assert [op.public_key for op in removed] == [peer, peer]
    await edm.until(lambda: edm.status(peer).path == "relay", each=lambda: edm.handshake(peer))
    assert edm.status(peer).relay_via == "relay-b"


async def test_a_counter_reset_is_no_progress_on_a_relayed_path(edm: Rig) -> None:
    """A re-created peer's counters start over (the endpoint machine re-creates a peer whose only path
    died): that drop is not receive progress, so the relay's stall still fails over on time."""
    peer = await _relayed_via_a(edm)
    edm.handshake(peer, rx=5000)
    await edm.run()
    await edm.run(2)  # relay-a went silent
    dev = edm.wg.device
    assert dev is not None
    reset = replace(dev.peers[peer], rx_bytes=0, tx_bytes=0)  # as after a re-creation
    edm.wg.device = replace(dev, peers={**dev.peers, peer: reset})
    # failover_after (3 s) counts from the last rx, not from the reset (which would take 6 passes)
    await edm.run(4)
    assert edm.endpoint(peer) == AddrPort.parse("203.0.113.10:40200")


async def test_relay_then_upgrade_to_direct(eim: Rig) -> None:
    await eim.run()
    relay = await _relay_node(eim)
    peer = await _committed_peer(eim, None, host=3)  # the first punch finds nothing
    await eim.until(lambda: "no direct answer" in (eim.status(peer).why_not_direct or ""))
    if not (eim.own.raw < peer.raw):
        eim.relay.notify(mesh_addr(9), peer, 40100)  # the peer chose
    await eim.until(lambda: eim.endpoint(peer) == AddrPort.parse("203.0.113.9:40100"), within=5)
    await eim.until(lambda: eim.status(peer).path == "relay", each=lambda: eim.handshake(peer))
    assert "no direct answer" in (eim.status(peer).why_not_direct or "")
    assert eim.status(peer).relay_via == "relay"
    # a later punch (retry after the backoff) answers: the peer moves to the direct path
    direct = AddrPort.parse("198.51.100.3:51820")
    eim.punch.results[peer] = direct
    calls = len(eim.punch.calls)
    eim.clock.advance(TIMINGS.retry_initial)
    await eim.run()
    start_ms = next(i.start_ms for i in eim.traversal().punches if i.peer == peer)
    intent = (PunchIntent(eim.own, b"\1" * 8, start_ms),)
    eim.disc.put(remote("n3", "198.51.100.3", 3, peer, nat="eim", punches=intent))
    await eim.until(lambda: len(eim.punch.calls) > calls)
    await eim.until(lambda: eim.endpoint(peer) == direct)
    await eim.until(lambda: eim.status(peer).path == "direct", each=lambda: eim.handshake(peer))
    assert eim.status(peer).why_not_direct is None
    assert eim.wg.device is not None and eim.wg.device.peers[peer].persistent_keepalive == 25
    if eim.own.raw < peer.raw:
        assert (mesh_addr(9), peer) in eim.relay.releases
    assert relay in eim.m.peers  # the relay node itself is untouched


async def test_without_raw_sockets_nat_pairs_are_relayed(tmp_path: Path) -> None:
    r = Rig(tmp_path, NatClass.EIM)
    r.punch.error = PermissionError("no CAP_NET_RAW")
    await r.m.start()
    try:
        await r.run()
        await _relay_node(r)
        assert r.relay.started  # the relay client runs without punching
        peer = key_beside(r.own, above=True)
        r.disc.put(remote("b", "198.51.100.20", 2, peer, nat="eim"))
        await r.until(lambda: r.endpoint(peer) == AddrPort.parse("203.0.113.9:40100"))
        assert r.punch.calls == []
        assert (r.status(peer).why_not_direct or "").startswith("no hole punching: no CAP_NET_RAW")
    finally:
        await r.m.stop()


async def test_no_traversal_ports_no_change(tmp_path: Path) -> None:
    """Without punch and relay ports the engine publishes no intents and keeps today's paths."""
    r = Rig(tmp_path, NatClass.EIM)
    r.m.punch = None
    r.m.relay_client = None
    await r.m.start()
    try:
        peer = generate_private_key().public_key()
        await r.run()
        r.disc.put(remote("b", "198.51.100.20", 2, peer, nat="eim"))
        await r.run(2)
        assert r.m.traversal is None
        assert r.traversal().punches == ()
        assert r.endpoint(peer) == AddrPort.parse("198.51.100.20:51820")
    finally:
        await r.m.stop()


async def test_failed_allocations_back_off(edm: Rig) -> None:
    await edm.run()
    relay = await _relay_node(edm)
    del edm.relay.ports[mesh_addr(9)]  # the relay does not answer
    peer = key_beside(edm.own, above=True)  # we choose
    edm.disc.put(remote("b", "198.51.100.20", 2, peer, nat="edm"))
    # 3 s of passes 0.1 s apart: retries 0.5, 1, 2 s after failures, not one per pass
    await edm.run(30, advance=0.1)
    tries = edm.allocations_to(relay)
    assert 2 <= len(tries) <= 4, tries
    # the relay answers again: the next retry takes it
    edm.relay.ports[mesh_addr(9)] = 40100
    await edm.until(lambda: edm.endpoint(peer) == AddrPort.parse("203.0.113.9:40100"), within=6)


async def test_a_notify_before_the_peer_is_known_is_kept(edm: Rig) -> None:
    await edm.run()
    await _relay_node(edm)
    peer = key_beside(edm.own, above=False)  # the peer chooses
    edm.relay.notify(mesh_addr(9), peer, 40222)  # the relay knew the pair before we knew the peer
    await edm.run()
    edm.disc.put(remote("b", "198.51.100.20", 2, peer, nat="edm"))
    await edm.until(lambda: edm.endpoint(peer) == AddrPort.parse("203.0.113.9:40222"))
    assert edm.relay.allocations == [], "followed the early NOTIFY"
