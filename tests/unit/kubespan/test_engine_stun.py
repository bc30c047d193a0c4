"""Endpoint discovery in the mesh engine, against the fake STUN port: when it runs, what is published."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from discovery.crypto import endpoint_from_addr
from kubespan.affiliate import RemoteAffiliate
from kubespan.dataplane.fake import FakeLinkManager, FakeNftManager
from kubespan.engine import Mesh, MeshOptions
from kubespan.hostinfo import StaticHost
from kubespan.identity import LinkInfo, generate_private_key, ula_prefix
from kubespan.nat.classify import NatClass, NatReport
from kubespan.testing import Discovered, FakeDiscovery, FakeProber, FakeStun
from kubespan.wireguard.fake import FakeWireGuard
from kubespan.wireguard.types import AddrPort
from spanapi.discovery.client import affiliate_pb2
from spanutil.testing import ManualClock

CLUSTER = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
SECRET = bytes(range(32))
SERVERS = (("192.0.2.1", 3478), ("192.0.2.2", 3478))
MAPPED = AddrPort.parse("198.51.100.7:40000")
EIM = NatReport(NatClass.EIM, MAPPED, (AddrPort.parse("192.0.2.1:3478"), AddrPort.parse("192.0.2.2:3478")))


def remote(node_id: str, addr: str, mesh_host: int) -> Discovered:
    a = affiliate_pb2.Affiliate(node_id=node_id, nodename=node_id, hostname=node_id)
    a.addresses.append(ipaddress.ip_address(addr).packed)
    a.kubespan.public_key = generate_private_key().public_key().b64
    a.kubespan.address = ula_prefix(CLUSTER)[mesh_host].packed
    return Discovered(node_id, a, (endpoint_from_addr(ipaddress.ip_address(addr), 51820),))


class StunRig:
    def __init__(self, tmp_path: Path, stun: FakeStun | None, servers: tuple[tuple[str, int], ...]) -> None:
        self.clock = ManualClock()
        self.disc = FakeDiscovery(public_ip=ipaddress.ip_address("203.0.113.9"))
        self.host = StaticHost(
            [LinkInfo("eth0", bytes.fromhex("2e1ab6538169"), physical=True)],
            [ipaddress.ip_interface("10.5.0.1/24")],
        )
        self.stun = stun
        opts = MeshOptions(
            cluster_id=CLUSTER,
            cluster_secret=SECRET,
            state_dir=tmp_path / "state",
            nodename="self",
            stun_servers=servers,
            stun_interval=60.0,
        )
        self.m = Mesh(
            opts,
            backend=FakeWireGuard(clock=lambda: self.clock.t),
            links=FakeLinkManager(link_exists=True),
            nft=FakeNftManager(),
            host=self.host,
            discovery=self.disc,
            prober=FakeProber(),
            stun=stun,
            clock=self.clock,
            wall=self.clock,
        )

    async def settle(self) -> None:
        """Let a finished discovery task end, run a pass (the one that takes its result), and let
        the discovery that pass started (if any) begin."""
        for _ in range(5):
            await asyncio.sleep(0)
        await self.m.reconcile()
        await asyncio.sleep(0)

    def published(self) -> RemoteAffiliate:
        pb, endpoints, _ = self.disc.published[-1]
        return RemoteAffiliate.from_pb(pb, endpoints)

    def published_pb(self) -> affiliate_pb2.Affiliate:
        return self.disc.published[-1][0]


async def started(tmp_path: Path, stun: FakeStun) -> AsyncIterator[StunRig]:
    r = StunRig(tmp_path, stun, SERVERS)
    await r.m.start()
    try:
        yield r
    finally:
        await r.m.stop()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[StunRig]:
    async for r in started(tmp_path, FakeStun(report=EIM)):
        yield r


@pytest.fixture
async def held(tmp_path: Path) -> AsyncIterator[StunRig]:
    """A rig whose discoveries wait for ``stun.release()`` (from the very first one)."""
    async for r in started(tmp_path, FakeStun(report=EIM, hold=True)):
        yield r


async def test_discovery_at_start_publishes_mapped_endpoint_and_class_in_the_next_pass(held: StunRig) -> None:
    rig = held
    await rig.m.reconcile()
    await asyncio.sleep(0)  # the discovery task starts
    assert len(rig.stun.calls) == 1
    call = rig.stun.calls[0]
    assert call.wg_port == 51820
    assert call.servers == SERVERS
    assert call.local_addrs == (ipaddress.ip_address("10.5.0.1"),)
    # the passes did not wait for the responders: they published what works without STUN
    assert rig.published().traversal.nat_class == "unknown"
    assert MAPPED not in rig.published().endpoints

    rig.stun.release()
    await rig.settle()
    aff = rig.published()
    # own addresses first, then the mapped endpoint, then discovery's public-IP guess (another IP)
    assert [str(e) for e in aff.endpoints] == ["10.5.0.1:51820", str(MAPPED), "203.0.113.9:51820"]
    assert aff.traversal.nat_class == "eim"
    assert len(rig.stun.calls) == 1  # nothing was due again

    st = rig.m.status()
    assert st.nat.nat_class == "eim"
    assert st.nat.mapped == st.nat.published == str(MAPPED)
    assert st.nat.responders == ("192.0.2.1:3478", "192.0.2.2:3478")
    assert st.nat.servers == ("192.0.2.1:3478", "192.0.2.2:3478")
    assert st.nat.error is None
    assert st.as_dict()["nat"]["nat_class"] == "eim"
    assert str(MAPPED) in st.endpoints


async def test_mapped_endpoint_replaces_the_public_ip_guess_for_its_ip(tmp_path: Path) -> None:
    mapped = AddrPort.parse("203.0.113.9:61000")  # the NAT did not keep 51820
    r = StunRig(tmp_path, FakeStun(report=EIM.__class__(NatClass.EIM, mapped, EIM.responders)), SERVERS)
    await r.m.start()
    try:
        await r.m.reconcile()
        assert "203.0.113.9:51820" in [str(e) for e in r.published().endpoints]
        await r.settle()
        assert [str(e) for e in r.published().endpoints] == ["10.5.0.1:51820", "203.0.113.9:61000"]
    finally:
        await r.m.stop()


async def test_runs_periodically_and_on_address_change(rig: StunRig) -> None:
    await rig.m.reconcile()
    await rig.settle()
    assert len(rig.stun.calls) == 1
    rig.clock.t += 30
    await rig.settle()
    assert len(rig.stun.calls) == 1  # not due yet
    rig.clock.t += 31
    await rig.settle()
    assert len(rig.stun.calls) == 2  # 60 s after the last run started

    rig.host.address_list = [ipaddress.ip_interface("10.5.0.1/24"), ipaddress.ip_interface("10.6.0.1/24")]
    await rig.m.links._emit("hostaddr", "new", "10.6.0.1/24 index 2")  # as the netlink watch reports it
    rig.clock.t += 0.01
    await rig.settle()  # the next pass re-reads the host's addresses
    assert len(rig.stun.calls) == 3
    assert rig.stun.calls[-1].local_addrs == (
        ipaddress.ip_address("10.5.0.1"),
        ipaddress.ip_address("10.6.0.1"),
    )


async def test_a_run_nobody_answered_is_retried_sooner(tmp_path: Path) -> None:
    stun = FakeStun(report=NatReport(NatClass.UNKNOWN, None, (), "192.0.2.1:3478: no answer in 2s"))
    r = StunRig(tmp_path, stun, SERVERS)  # stun_retry: 10 s
    await r.m.start()
    try:
        await r.m.reconcile()
        await r.settle()
        assert len(stun.calls) == 1
        stun.report = EIM  # the responders came up
        r.clock.t += 9
        await r.settle()
        assert len(stun.calls) == 1
        r.clock.t += 1.5
        await r.settle()
        assert len(stun.calls) == 2
        await r.settle()
        assert r.m.status().nat.nat_class == "eim"
        r.clock.t += 11  # answered: back to the 60 s interval
        await r.settle()
        assert len(stun.calls) == 2
    finally:
        await r.m.stop()


async def test_one_discovery_in_flight_and_passes_do_not_wait(held: StunRig) -> None:
    rig = held
    await rig.m.reconcile()
    await asyncio.sleep(0)
    assert rig.stun.in_flight == 1
    for _ in range(3):  # due twice over (interval and a new address) while the first one hangs
        rig.clock.t += 61
        rig.host.address_list = [*rig.host.address_list, ipaddress.ip_interface(f"10.7.0.{_ + 1}/24")]
        await asyncio.wait_for(rig.settle(), 1.0)  # a pass never waits for the responders
    assert len(rig.stun.calls) == 1
    assert rig.stun.max_in_flight == 1
    assert rig.m.status().nat.error == "STUN: discovery has not finished yet"

    rig.stun.hold = False
    rig.stun.release()
    await rig.settle()  # takes the result, and starts the run the address change asked for
    assert rig.m.status().nat.nat_class == "eim"
    assert len(rig.stun.calls) == 2
    assert rig.stun.max_in_flight == 1


@pytest.mark.parametrize(
    ("report", "error", "reason"),
    [
        (
            NatReport(NatClass.UNKNOWN, None, (), "no CAP_NET_RAW (raw sockets ...)"),
            None,
            "STUN: no CAP_NET_RAW",
        ),
        (
            NatReport(
                NatClass.UNKNOWN, None, (), "192.0.2.1:3478: no answer in 2s; 192.0.2.2:3478: no answer"
            ),
            None,
            "STUN: 192.0.2.1:3478: no answer",
        ),
        (None, RuntimeError("boom"), "STUN: discovery failed: boom"),
    ],
)
async def test_failure_falls_back_to_todays_endpoints_with_the_reason(
    tmp_path: Path, report: NatReport | None, error: Exception | None, reason: str
) -> None:
    stun = FakeStun(error=error) if report is None else FakeStun(report=report)
    r = StunRig(tmp_path, stun, SERVERS)
    await r.m.start()
    try:
        await r.m.reconcile()
        before = [str(e) for e in r.published().endpoints]
        await r.settle()
        assert [str(e) for e in r.published().endpoints] == before == ["10.5.0.1:51820", "203.0.113.9:51820"]
        # no traversal field at all: the bytes are Talos's own layout
        assert not r.published_pb().kubespan.HasField("traversal")
        nat = r.m.status().nat
        assert nat.nat_class == "unknown"
        assert nat.published is None
        assert nat.error is not None and nat.error.startswith(reason)
    finally:
        await r.m.stop()


async def test_symmetric_nat_publishes_the_class_but_not_the_mapping(tmp_path: Path) -> None:
    edm = NatReport(NatClass.EDM, MAPPED, EIM.responders)
    r = StunRig(tmp_path, FakeStun(report=edm), SERVERS)
    await r.m.start()
    try:
        await r.m.reconcile()
        await r.settle()
        aff = r.published()
        assert MAPPED not in aff.endpoints
        assert aff.traversal.nat_class == "edm"
        nat = r.m.status().nat
        assert (nat.nat_class, nat.mapped, nat.published) == ("edm", str(MAPPED), None)
        assert nat.error is not None and "symmetric" in nat.error
    finally:
        await r.m.stop()


async def test_no_responder_configured_runs_nothing_and_says_so(tmp_path: Path) -> None:
    r = StunRig(tmp_path, FakeStun(report=EIM), ())
    await r.m.start()
    try:
        await r.m.reconcile()
        r.clock.t += 120
        await r.settle()
        assert r.stun is not None and r.stun.calls == []
        assert r.m.status().nat.error == "STUN: no responder configured"
        assert not r.published_pb().kubespan.HasField("traversal")
    finally:
        await r.m.stop()


async def test_peer_status_shows_the_nat_class_the_peer_publishes(rig: StunRig) -> None:
    d = remote("peer-1", "10.5.0.2", 2)
    d.affiliate.kubespan.traversal.nat_class = 3  # edm
    rig.disc.put(d)
    await rig.m.reconcile()
    (peer,) = rig.m.status().peers
    assert peer.nat_class == "edm"
    d2 = affiliate_pb2.Affiliate()
    d2.CopyFrom(d.affiliate)
    d2.kubespan.traversal.nat_class = 2  # eim
    rig.disc.put(Discovered(d.id, d2, d.endpoints))
    await rig.m.reconcile()
    (peer,) = rig.m.status().peers
    assert peer.nat_class == "eim"


async def test_stop_cancels_a_discovery_in_flight(tmp_path: Path) -> None:
    stun = FakeStun(report=EIM, hold=True)
    r = StunRig(tmp_path, stun, SERVERS)
    await r.m.start()
    await r.m.reconcile()
    await asyncio.sleep(0)
    assert stun.in_flight == 1
    await asyncio.wait_for(r.m.stop(), 2.0)
    assert stun.in_flight == 0
