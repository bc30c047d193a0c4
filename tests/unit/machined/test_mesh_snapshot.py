"""The engine's published MeshSnapshot: immutable, what status() shows, reused when nothing changed, and
the only thing machined's controllers read (affiliates decoded once, by the engine)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from discovery.crypto import endpoint_from_addr
from kubespan.dataplane.fake import FakeLinkManager, FakeNftManager
from kubespan.engine import Mesh, MeshOptions
from kubespan.hostinfo import StaticHost
from kubespan.identity import LinkInfo, generate_private_key, ula_prefix
from kubespan.snapshot import MeshSnapshot
from kubespan.testing import Discovered, FakeDiscovery, FakeProber
from kubespan.wireguard.fake import FakeWireGuard
from machined.controllers import AffiliateController, KubeSpanPeerSpecController, KubeSpanPeerStatusController
from machined.runtime import Runtime
from machined.state import DEFINITIONS, State, register_all
from machined.state.catalog import (
    AFFILIATE,
    KUBESPAN_PEER_SPEC,
    KUBESPAN_PEER_STATUS,
    NS_CLUSTER,
    NS_KUBESPAN,
)

CLUSTER = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="


def remote(i: int, addr: str, *extra: str, machine_type: str = "worker") -> Discovered:
    from spanapi.discovery.client import affiliate_pb2

    a = affiliate_pb2.Affiliate(
        node_id=f"node-{i}",
        nodename=f"n{i}",
        hostname=f"h{i}",
        machine_type=machine_type,
        operating_system="os",
    )
    a.addresses.extend(ipaddress.ip_address(x).packed for x in (addr, *extra))
    a.kubespan.public_key = generate_private_key().public_key().b64
    a.kubespan.address = ula_prefix(CLUSTER)[i].packed
    return Discovered(f"node-{i}", a, (endpoint_from_addr(ipaddress.ip_address(addr), 51820),))


def readdress(d: Discovered, *extra: str) -> Discovered:
    from spanapi.discovery.client import affiliate_pb2

    a = affiliate_pb2.Affiliate()
    a.CopyFrom(d.affiliate)
    a.addresses.extend(ipaddress.ip_address(x).packed for x in extra)
    return Discovered(d.id, a, d.endpoints)


@pytest.fixture
def mesh(tmp_path: Path) -> tuple[Mesh, FakeDiscovery, FakeWireGuard, list[float]]:
    t = [1000.0]
    disc = FakeDiscovery(public_ip=ipaddress.ip_address("203.0.113.9"))
    wg = FakeWireGuard(clock=lambda: t[0])
    host = StaticHost(
        [LinkInfo("eth0", bytes.fromhex("2e1ab6538169"), physical=True)],
        [ipaddress.ip_interface("10.5.0.1/24")],
    )
    opts = MeshOptions(
        cluster_id=CLUSTER,
        cluster_secret=bytes(32),
        state_dir=tmp_path / "s",
        nodename="self",
        first_contact=None,  # peers are configured with their endpoint in the pass that adds them
    )
    m = Mesh(
        opts,
        backend=wg,
        links=FakeLinkManager(link_exists=True),
        nft=FakeNftManager(),
        host=host,
        discovery=disc,
        prober=FakeProber(),
        clock=lambda: t[0],
        wall=lambda: t[0] + 1e9,
    )
    return m, disc, wg, t


def rebuilt(m: Mesh) -> MeshSnapshot:
    """The snapshot built from scratch (no reuse) from the engine's current state."""
    prev = m.snapshot
    assert prev is not None
    m._snapshot = None
    try:
        m._publish_snapshot(light=False, at=prev.at, reuse=False)
        fresh = m.snapshot
    finally:
        m._snapshot = prev
    assert fresh is not None and fresh is not prev
    return fresh


async def test_snapshot_is_immutable_and_is_what_status_shows(mesh) -> None:
    m, disc, wg, t = mesh
    a, b = remote(2, "10.5.0.2"), remote(3, "10.5.0.3", "192.0.2.7")
    disc.put(a, b)
    await m.start()
    try:
        assert m.snapshot is not None and m.snapshot.at is None  # published at start, before any pass
        await m.reconcile()
        key = next(iter(wg.device.peers))
        t[0] += 1
        wg.traffic(key, rx=148, tx=96, handshake=True)
        await m.reconcile()
        snap = m.snapshot
        assert snap is not None and snap.at == t[0] + 1e9
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.peers = ()  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.peers[0].state = "up"  # type: ignore[misc]
        assert isinstance(snap.peers, tuple) and isinstance(snap.remotes, tuple)
        assert isinstance(snap.specs.specs, tuple) and isinstance(snap.errors, tuple)
        assert snap.peers is not m.specs.specs and snap.errors is not m.errors
        assert [r.id for r in snap.remotes] == ["node-2", "node-3"]
        assert snap.remotes[1].affiliate.addresses[1] == ipaddress.ip_address("192.0.2.7")
        assert snap.remotes[0].machine_type == "worker" and snap.remotes[0].operating_system == "os"
        assert snap.local is not None and snap.local_published and snap.published_local is snap.local
        st = m.status()
        assert st == snap.status()
        assert st.peers == snap.peers and [p.label for p in st.peers] == ["n2", "n3"]
        p = next(p for p in st.peers if p.public_key == key.b64)
        assert p.rx_bytes == 148 and p.tx_bytes == 96 and p.last_handshake is not None
        assert st.endpoints == tuple(str(e) for e in snap.local.endpoints)
        assert st.public_ip == "203.0.113.9" and st.node_id == m.node_id
        # engine state moving later does not move a published snapshot
        m.errors.append("later")
        assert "later" not in snap.errors
    finally:
        await m.stop()


async def test_unpublished_local_affiliate_is_shown_as_such(mesh) -> None:
    m, disc, _wg, _t = mesh
    await m.start()
    try:
        disc.fail_publishes = 1
        await m.reconcile()
        snap = m.snapshot
        assert snap is not None and snap.local is not None
        assert not snap.local_published and snap.published_local is None and snap.status().endpoints == ()
        await m.reconcile()
        assert m.snapshot is not None and m.snapshot.local_published
    finally:
        await m.stop()


async def test_a_pass_that_changed_nothing_reuses_the_snapshot_equal_to_a_rebuild(mesh) -> None:
    m, disc, wg, t = mesh
    disc.put(remote(2, "10.5.0.2"), remote(3, "10.5.0.3"))
    await m.start()
    try:
        await m.reconcile()
        t[0] += 1
        await m.reconcile()  # a full pass (poll due): machines ran, nothing changed since
        snap = m.snapshot
        for advance in (0.0, 0.0, 1.0):  # light passes, then another full one
            t[0] += advance
            await m.reconcile()
            assert m.snapshot is snap, "nothing changed: the previous snapshot is published again"
        assert rebuilt(m) == snap
        # one peer changes (a light pass): only its status is new, the other keeps its object
        disc.put(readdress(disc.affiliates["node-3"], "192.0.2.9"))
        await m.reconcile()
        new = m.snapshot
        assert new is not snap and new is not None
        assert new.peers[0] is snap.peers[0] and new.peers[1] is not snap.peers[1]
        assert new.remotes[0] is snap.remotes[0] and new.remotes[1] is not snap.remotes[1]
        assert "192.0.2.9/32" in new.peers[1].allowed_ips
        assert rebuilt(m) == new
        # counters move (a full pass): the snapshot follows
        key = next(iter(wg.device.peers))
        t[0] += 1
        wg.traffic(key, rx=10, tx=10, handshake=True)
        await m.reconcile()
        assert m.snapshot is not new and rebuilt(m) == m.snapshot
    finally:
        await m.stop()


class Host:
    """What the controllers read of machined's MeshHost: the engine's snapshot."""

    def __init__(self, m: Mesh) -> None:
        self.m = m

    def snapshot(self) -> MeshSnapshot | None:
        return self.m.snapshot

    def peers(self) -> Any:
        snap = self.m.snapshot
        return snap.peers if snap is not None and snap.at is not None else None


async def settle(rt: Runtime, names: list[str], runs: dict[str, int]) -> None:
    async with asyncio.timeout(5):
        while any(rt.stats()[n].runs <= runs[n] or rt.stats()[n].state != "idle" for n in names):  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_controllers_publish_the_snapshot_and_affiliates_are_decoded_once(mesh, monkeypatch) -> None:
    m, disc, _wg, _t = mesh
    from kubespan import engine

    decoded: list[str] = []
    original = engine.RemoteAffiliate.from_pb

    def counting(pb: Any, endpoints: Any = ()) -> Any:
        decoded.append(pb.node_id)
        return original(pb, endpoints)

    monkeypatch.setattr(engine.RemoteAffiliate, "from_pb", staticmethod(counting))
    a, b = remote(2, "10.5.0.2"), remote(3, "10.5.0.3", machine_type="controlplane")
    disc.put(a, b)
    s = State()
    register_all(s, DEFINITIONS)
    host = Host(m)
    ctrls = [
        AffiliateController(host, lambda: "worker"),  # type: ignore[arg-type]
        KubeSpanPeerSpecController(host),  # type: ignore[arg-type]
        KubeSpanPeerStatusController(host),  # type: ignore[arg-type]
    ]
    names = [c.name for c in ctrls]
    rt = Runtime(s)
    for c in ctrls:
        rt.register(c)
    await m.start()
    try:
        async with rt:

            async def rounds(n: int) -> None:
                for _ in range(n):
                    await m.reconcile()
                    runs = {name: rt.stats()[name].runs for name in names}
                    for name in names:
                        rt.wake(name)
                    await settle(rt, names, runs)

            await rounds(3)
            assert sorted(decoded) == ["node-2", "node-3"], "each affiliate decoded once, by the engine"
            # the resources, as the controllers wrote them before they read the snapshot
            local = m.snapshot.local
            affs = {r.metadata.id: r.spec for r in await s.list(NS_CLUSTER, AFFILIATE)}
            assert set(affs) == {"node-2", "node-3", m.node_id}
            assert affs["node-3"] == {
                "nodeId": "node-3",
                "addresses": ["10.5.0.3"],
                "hostname": "h3",
                "nodename": "n3",
                "machineType": "controlplane",
                "operatingSystem": "os",
                "kubespan": {
                    "publicKey": b.affiliate.kubespan.public_key,
                    "address": str(ula_prefix(CLUSTER)[3]),
                    "additionalAddresses": [],
                    "endpoints": ["10.5.0.3:51820"],
                },
            }
            assert affs[m.node_id]["machineType"] == "worker"
            assert affs[m.node_id]["kubespan"]["endpoints"] == [str(e) for e in local.endpoints]
            specs = {r.metadata.id: r.spec for r in await s.list(NS_KUBESPAN, KUBESPAN_PEER_SPEC)}
            assert specs[b.affiliate.kubespan.public_key] == {
                "address": str(ula_prefix(CLUSTER)[3]),
                "allowedIPs": ["10.5.0.3/32", f"{ula_prefix(CLUSTER)[3]}/128"],
                "label": "n3",
                "endpoints": ["10.5.0.3:51820"],
            }
            statuses = {r.metadata.id: r.spec for r in await s.list(NS_KUBESPAN, KUBESPAN_PEER_STATUS)}
            assert set(statuses) == set(specs)
            st = statuses[a.affiliate.kubespan.public_key]
            assert st["label"] == "n2" and st["endpoint"] == "10.5.0.2:51820" and st["state"] == "unknown"

            # one affiliate changes: decoded once more, whatever the number of passes and reconciles
            disc.put(readdress(b, "192.0.2.7"))
            await rounds(3)
            assert sorted(decoded) == ["node-2", "node-3", "node-3"]
            aff = await s.get(NS_CLUSTER, AFFILIATE, "node-3")
            assert aff.spec["addresses"] == ["10.5.0.3", "192.0.2.7"]

            disc.remove("node-2")
            await rounds(2)
            assert len(decoded) == 3
            assert {r.metadata.id for r in await s.list(NS_CLUSTER, AFFILIATE)} == {"node-3", m.node_id}
    finally:
        await m.stop()
