"""The mesh engine against in-memory fakes (WireGuard, data plane, host, prober, discovery)."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import pytest

from discovery.crypto import endpoint_from_addr
from kubespan.dataplane.fake import SET_IPV4, SET_IPV6, FakeLinkManager, FakeNftManager
from kubespan.endpoints import PeerState
from kubespan.engine import Mesh, MeshOptions, load_node_id
from kubespan.hostinfo import StaticHost
from kubespan.identity import LinkInfo, generate_private_key, ula_prefix
from kubespan.testing import Discovered, FakeDiscovery, FakeProber
from kubespan.wireguard.fake import FakeWireGuard
from kubespan.wireguard.types import AddrPort, PresharedKey
from spanapi.discovery.client import affiliate_pb2

CLUSTER = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
SECRET = bytes(range(32))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def remote(node_id: str, name: str, addr: str, mesh_host: int, *extra_addrs: str):
    key = generate_private_key().public_key()
    mesh = ula_prefix(CLUSTER)[mesh_host]
    a = affiliate_pb2.Affiliate(node_id=node_id, nodename=name, hostname=name)
    a.addresses.extend(ipaddress.ip_address(x).packed for x in (addr, *extra_addrs))
    a.kubespan.public_key = key.b64
    a.kubespan.address = mesh.packed
    eps = (endpoint_from_addr(ipaddress.ip_address(addr), 51820),)
    return key, mesh, Discovered(node_id, a, eps)


@pytest.fixture
def mesh(tmp_path: Path):
    clock = Clock()
    disc = FakeDiscovery(public_ip=ipaddress.ip_address("203.0.113.9"))
    wg = FakeWireGuard(clock=lambda: clock.t)
    links = FakeLinkManager(link_exists=True)
    nft = FakeNftManager()
    host = StaticHost(
        [LinkInfo("eth0", bytes.fromhex("2e1ab6538169"), physical=True), LinkInfo("lo", None, False, True)],
        [ipaddress.ip_interface("10.5.0.1/24"), ipaddress.ip_interface("fe80::1/64")],
    )
    opts = MeshOptions(
        cluster_id=CLUSTER,
        cluster_secret=SECRET,
        state_dir=tmp_path / "state",
        nodename="self",
        machine_type="controlplane",
    )
    m = Mesh(
        opts,
        backend=wg,
        links=links,
        nft=nft,
        host=host,
        discovery=disc,
        prober=FakeProber(),
        clock=clock,
        wall=clock,
    )
    return m, disc, wg, links, nft, clock


async def test_identity_and_local_affiliate(mesh) -> None:
    m, disc, wg, links, nft, _ = mesh
    await m.start()
    try:
        await m.reconcile()
        # Talos' vector: this cluster id and MAC give this address
        assert str(m.identity.address) == "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/64"
        aff, eps, _ = disc.published[-1]
        assert aff.kubespan.public_key == m.identity.public_key.b64
        assert ipaddress.ip_address(aff.kubespan.address) == m.identity.address.ip
        # node IPs (no link-local) on the listen port, plus the public IP discovery saw
        assert [(ipaddress.ip_address(e.ip), e.port) for e in eps] == [
            (ipaddress.ip_address("10.5.0.1"), 51820),
            (ipaddress.ip_address("203.0.113.9"), 51820),
        ]
        assert [ipaddress.ip_address(a) for a in aff.addresses] == [ipaddress.ip_address("10.5.0.1")]
        assert aff.machine_type == "controlplane"  # workers find the control plane's trustd by it
        # data plane: mesh /64 on the link, routes and rules, nft table created
        assert m.identity.address in links.addresses
        assert links.routes == {"inet", "inet6"} and links.rules == {"inet", "inet6"}
        assert nft.sets == {SET_IPV4: set(), SET_IPV6: set()}
        # device: our key, port, fwmark 0x20
        assert wg.device.private_key == m.identity.private_key
        assert wg.device.listen_port == 51820 and wg.device.fwmark == 0x20
        # the key and node id persist across restarts
        assert load_node_id(m.opts.state_dir) == m.node_id
        assert (m.opts.state_dir / "node-id").stat().st_mode & 0o077 == 0
    finally:
        await m.stop()


async def test_peers_from_discovery_and_no_write_when_unchanged(mesh) -> None:
    m, disc, wg, _links, nft, _ = mesh
    k1, mesh1, d1 = remote("node-a", "a", "10.5.0.2", 2, "192.0.2.7")
    k2, _mesh2, d2 = remote("node-b", "b", "198.51.100.3", 3)
    disc.put(d1, d2)
    await m.start()
    try:
        await m.reconcile()
        peers = wg.device.peers
        assert set(peers) == {k1, k2}
        p1 = peers[k1]
        assert p1.allowed_ips == frozenset(
            ipaddress.ip_network(x) for x in ("10.5.0.2/32", "192.0.2.7/32", f"{mesh1}/128")
        )
        assert p1.preshared_key == PresharedKey(SECRET)
        assert p1.persistent_keepalive == 25
        assert p1.endpoint == AddrPort(ipaddress.ip_address("10.5.0.2"), 51820)
        # nft: node IPs steered into the mesh, mesh addresses left to the connected /64 route
        assert nft.sets[SET_IPV4] == {
            ipaddress.ip_network(x) for x in ("10.5.0.2/32", "192.0.2.7/32", "198.51.100.3/32")
        }
        assert nft.sets[SET_IPV6] == set()

        writes, transactions = wg.writes, len(nft.all_transactions)
        for _ in range(3):
            await m.reconcile()
        assert wg.writes == writes, "an unchanged reconcile must not write to WireGuard"
        assert len(nft.all_transactions) == transactions, "an unchanged reconcile must not write nftables"

        # one peer changes: only that peer is touched
        disc.put(_readdress(d2, "198.51.100.4"))
        await m.reconcile()
        assert wg.writes == writes + 1
        last = wg.applies[-1]
        assert [type(op).__name__ for op in last] == ["UpdatePeer"] and last[0].public_key == k2

        # a peer leaves discovery: removed from WireGuard and from the sets
        disc.remove("node-b")
        await m.reconcile()
        assert set(wg.device.peers) == {k1}
        assert ipaddress.ip_network("198.51.100.3/32") not in nft.sets[SET_IPV4]
    finally:
        await m.stop()


async def test_new_peer_is_probed_in_the_pass_that_adds_it(mesh) -> None:
    m, disc, wg, *_ = mesh
    k1, mesh1, d1 = remote("node-a", "a", "10.5.0.2", 2)
    await m.start()
    try:
        await m.reconcile()
        configured_when_probed: list[bool] = []
        send = m.prober.send

        def checking_send(peer, address) -> bool:
            configured_when_probed.append(peer in wg.device.peers)
            return send(peer, address)

        m.prober.send = checking_send  # type: ignore[method-assign]
        disc.put(d1)
        await m.reconcile()
        assert k1 in wg.device.peers
        assert m.prober.probes == [(k1, mesh1)], "probed in the pass that added it"
        assert configured_when_probed == [True], "after the WireGuard peer was configured"
        # its reply (which wakes the engine) makes it up in the next pass, without a second probe
        wg.traffic(k1, rx=148, tx=148, handshake=True)
        m.prober.answer(k1)
        await m.reconcile()
        assert m.machines[k1].state == PeerState.UP
        assert m.prober.probes == [(k1, mesh1)]
    finally:
        await m.stop()


async def test_overlaps_and_duplicates_are_surfaced(mesh) -> None:
    m, disc, wg, *_ = mesh
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2, "10.9.9.9")
    k2, _, d2 = remote("node-b", "b", "10.5.0.3", 3, "10.9.9.9")  # shares a VIP with node-a
    disc.put(d1, d2)
    await m.start()
    try:
        await m.reconcile()
        st = m.status()
        assert any("10.9.9.9" in c and "node-b" in c for c in st.conflicts), st.conflicts
        # deterministic: the lower node id keeps the contested address
        assert ipaddress.ip_network("10.9.9.9/32") in wg.device.peers[k1].allowed_ips
        assert ipaddress.ip_network("10.9.9.9/32") not in wg.device.peers[k2].allowed_ips
    finally:
        await m.stop()


async def test_outside_removal_is_repaired(mesh) -> None:
    m, disc, wg, links, nft, clock = mesh
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        await links.remove_rule("inet")
        await links.remove_route("inet6")
        nft.remove_table()
        wg.remove()
        clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert links.rules == {"inet", "inet6"} and links.routes == {"inet", "inet6"}
        assert nft.sets is not None and ipaddress.ip_network("10.5.0.2/32") in nft.sets[SET_IPV4]
        assert wg.device is not None and len(wg.device.peers) == 1
        assert m.identity.address in links.addresses
    finally:
        await m.stop()


async def test_status_and_state_follow_handshakes(mesh) -> None:
    m, disc, wg, _links, _nft, clock = mesh
    k1, mesh1, d1 = remote("node-a", "a", "10.5.0.2", 2)
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        assert m.status().peers[0].state == PeerState.UNKNOWN
        assert not m.status().ready
        for _ in range(3):
            clock.t += 1
            wg.traffic(k1, rx=148, tx=148, handshake=True)
            m.prober.answer(k1)
            await m.reconcile()
        st = m.status()
        p = st.peers[0]
        assert p.state == PeerState.UP and st.ready
        assert p.label == "a" and p.public_key == k1.b64 and p.mesh_address == str(mesh1)
        assert p.endpoint == "10.5.0.2:51820" and p.rx_bytes >= 444 and p.last_handshake is not None
        assert "10.5.0.2:51820" in p.candidates
        assert SECRET.hex() not in repr(st) and "private" not in repr(st.as_dict()).lower()
    finally:
        await m.stop()


async def test_stop_cleans_up(mesh) -> None:
    m, _disc, wg, links, nft, _ = mesh
    await m.start()
    await m.reconcile()
    await m.stop(cleanup=True)
    assert nft.sets is None
    assert not links.rules and not links.routes
    assert wg.closed and wg.removed_on_close


def test_node_id_is_stable(tmp_path: Path) -> None:
    a = load_node_id(tmp_path)
    assert a == load_node_id(tmp_path) and 40 <= len(a) <= 44 and a.isalnum()
    os.remove(tmp_path / "node-id")
    assert load_node_id(tmp_path) != a


async def test_roamed_endpoint_is_learned_and_published_once(mesh) -> None:
    m, disc, wg, _links, _nft, clock = mesh
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        for _ in range(2):
            clock.t += 1
            wg.traffic(k1, rx=148, tx=148, handshake=True)
            m.prober.answer(k1)
            await m.reconcile()
        # the peer reaches us from a NATed address we never configured (WireGuard roams to it)
        natted = AddrPort(ipaddress.ip_address("198.51.100.77"), 40123)
        from dataclasses import replace

        peers = dict(wg.device.peers)
        peers[k1] = replace(peers[k1], endpoint=natted)
        wg.device = replace(wg.device, peers=peers)
        publishes = len(disc.published)
        for _ in range(3):
            clock.t += 1
            wg.traffic(k1, rx=148, tx=148)
            await m.reconcile()
        new = disc.published[publishes:]
        assert len(new) == 1, "learned endpoints are published once, on change"
        others = new[0][2]
        assert list(others) == ["node-a"]
        assert [(ipaddress.ip_address(e.ip), e.port) for e in others["node-a"]] == [(natted.ip, natted.port)]
        # WireGuard keeps the roamed endpoint: we do not reconfigure it back
        assert wg.device.peers[k1].endpoint == natted
        assert "198.51.100.77:40123" in m.status().peers[0].learned
    finally:
        await m.stop()


# --- work reused between passes (performance) must not change what the engine does ---------------


def _readdress(d: Discovered, *extra: str) -> Discovered:
    a = affiliate_pb2.Affiliate()
    a.CopyFrom(d.affiliate)
    a.addresses.extend(ipaddress.ip_address(x).packed for x in extra)
    return Discovered(d.id, a, d.endpoints)


@pytest.fixture
def versioned(mesh, monkeypatch):
    m, _disc, wg, links, nft, clock = mesh
    disc = FakeDiscovery(public_ip=ipaddress.ip_address("203.0.113.9"))
    m.discovery = disc
    from kubespan import engine

    conversions: list[str] = []
    original = engine.RemoteAffiliate.from_pb

    def counting(pb, endpoints=()):
        conversions.append(pb.node_id)
        return original(pb, endpoints)

    monkeypatch.setattr(engine.RemoteAffiliate, "from_pb", staticmethod(counting))
    return m, disc, wg, links, nft, clock, conversions


async def test_versioned_discovery_rereads_only_changed_entries(versioned) -> None:
    m, disc, wg, _links, nft, _clock, conversions = versioned
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    k2, _, d2 = remote("node-b", "b", "10.5.0.3", 3)
    disc.put(d1, d2)
    await m.start()
    try:
        await m.reconcile()
        assert sorted(conversions) == ["node-a", "node-b"] and set(wg.device.peers) == {k1, k2}
        specs = m.specs
        await m.reconcile()
        await m.reconcile()
        assert len(conversions) == 2, "an unchanged version re-reads nothing"
        assert m.specs is specs, "and recomputes no peer specs"

        disc.put(_readdress(d2, "198.51.100.4"))
        await m.reconcile()
        assert conversions[2:] == ["node-b"], "only the replaced entry is converted again"
        assert ipaddress.ip_network("198.51.100.4/32") in wg.device.peers[k2].allowed_ips
        assert ipaddress.ip_network("198.51.100.4/32") in nft.sets[SET_IPV4]
        assert m.specs.specs[0] is specs.specs[0], "the unchanged peer's spec is reused"
        last = wg.applies[-1]
        assert [type(op).__name__ for op in last] == ["UpdatePeer"] and last[0].public_key == k2

        disc.remove("node-a")
        await m.reconcile()
        assert set(wg.device.peers) == {k2} and set(m.machines) == {k2}
        assert ipaddress.ip_network("10.5.0.2/32") not in nft.sets[SET_IPV4]
    finally:
        await m.stop()


def _warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(
        1
        for r in caplog.records
        if r.levelno >= logging.WARNING and text in str(getattr(r, "_fields", {}).get("error", ""))
    )


async def test_malformed_affiliate_is_reported_once_per_content(
    mesh, caplog: pytest.LogCaptureFixture
) -> None:
    m, disc, wg, *_ = mesh
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    bad = _readdress(d1)
    bad.affiliate.kubespan.public_key = "not a key"
    disc.put(d1, Discovered("node-z", bad.affiliate, ()))
    caplog.set_level(logging.DEBUG, "kubespan.engine")
    await m.start()
    try:
        for _ in range(5):  # about once a second in production
            await m.reconcile()
        assert _warnings_about(caplog, "affiliate node-z") == 1, "reported once, not every pass"
        assert sum("affiliate node-z" in e for e in m.errors) == 1
        assert len(wg.device.peers) == 1
        # a different bad payload from the same affiliate is news: reported again, once
        worse = _readdress(bad, "192.0.2.1")
        disc.put(Discovered("node-z", worse.affiliate, ()))
        for _ in range(3):
            await m.reconcile()
        assert _warnings_about(caplog, "affiliate node-z") == 2
        # fixed, then broken the same way again: reported again
        disc.put(remote("node-z", "z", "10.5.0.7", 7)[2])
        await m.reconcile()
        assert len(wg.device.peers) == 2
        disc.put(Discovered("node-z", worse.affiliate, ()))
        await m.reconcile()
        await m.reconcile()
        assert _warnings_about(caplog, "affiliate node-z") == 3
    finally:
        await m.stop()


async def test_peer_change_updates_sets_without_rechecking_links(mesh) -> None:
    m, disc, wg, links, nft, clock = mesh
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    _, _, d2 = remote("node-b", "b", "10.5.0.9", 3)
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        link_calls = len(links.calls)
        disc.put(d2)  # a new peer: WireGuard and the sets change, links do not
        await m.reconcile()
        assert len(links.calls) == link_calls
        assert ipaddress.ip_network("10.5.0.9/32") in nft.sets[SET_IPV4]
        assert [t.kind for t in nft.transactions] == ["diff"]
        # nothing changed: nothing read or written beyond WireGuard
        reconciles = len(nft.calls)
        await m.reconcile()
        assert len(nft.calls) == reconciles and len(links.calls) == link_calls
        # a re-created device (device-level settings missing) gets links, routes and rules again
        # (at the next poll at the latest: netlink would also wake a full pass at once)
        wg.remove()
        await links.remove_address(m.identity.address)
        clock.t += m.cfg.timings.poll_interval
        await m.reconcile()
        assert len(links.calls) > link_calls and m.identity.address in links.addresses
        # and the periodic check still runs
        link_calls = len(links.calls)
        clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert len(links.calls) > link_calls
    finally:
        await m.stop()


async def test_bypass_of_a_down_peer_still_updates_the_sets(mesh) -> None:
    m, disc, _wg, _links, nft, clock = mesh
    from dataclasses import replace as dc_replace

    m.cfg = dc_replace(m.cfg, allow_down_peer_bypass=True)
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2, "192.0.2.7")
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        assert ipaddress.ip_network("192.0.2.7/32") in nft.sets[SET_IPV4]
        m.machines[k1]._state = PeerState.DOWN  # what the endpoint machine decides after a failure
        clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert m.machines[k1].state == PeerState.DOWN
        assert ipaddress.ip_network("192.0.2.7/32") not in nft.sets[SET_IPV4]
    finally:
        await m.stop()


# --- light passes: a discovery change between polls trusts the last observation --------------------


async def test_discovery_only_pass_reads_nothing_and_writes_only_the_change(versioned) -> None:
    m, disc, wg, links, nft, clock, _ = versioned
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    k2, _, d2 = remote("node-b", "b", "10.5.0.3", 3)
    disc.put(d1, d2)
    await m.start()
    try:
        await m.reconcile()
        gets, reads, link_calls, light = wg.gets, nft.reads, len(links.calls), m.light_passes
        machine_a = m.machines[k1]
        observed_a = machine_a.observe
        ran: list[str] = []

        def spy(*args, **kw):
            ran.append("node-a")
            return observed_a(*args, **kw)

        machine_a.observe = spy  # type: ignore[method-assign]
        clock.t += 0.2  # between polls
        disc.put(_readdress(d2, "198.51.100.4"))
        await m.reconcile()
        assert m.light_passes == light + 1
        assert wg.gets == gets, "the device is not re-read"
        assert nft.reads == reads, "nor the nftables table"
        assert len(links.calls) == link_calls
        assert ran == [], "and the unchanged peer's state machine does not run"
        last = wg.applies[-1]
        assert [type(op).__name__ for op in last] == ["UpdatePeer"] and last[0].public_key == k2
        assert ipaddress.ip_network("198.51.100.4/32") in wg.device.peers[k2].allowed_ips
        assert ipaddress.ip_network("198.51.100.4/32") in nft.sets[SET_IPV4]
        assert [t.kind for t in nft.transactions] == ["diff"]

        # a new peer between polls: added and probed in that light pass (the join path)
        k3, mesh3, d3 = remote("node-c", "c", "10.5.0.4", 4)
        disc.put(d3)
        await m.reconcile()
        assert m.light_passes == light + 2 and wg.gets == gets
        assert k3 in wg.device.peers and m.prober.probes[-1] == (k3, mesh3)
        # its reply makes the next pass a full one, which sees it up
        wg.traffic(k3, rx=148, tx=148, handshake=True)
        m.prober.answer(k3)
        await m.reconcile()
        assert wg.gets == gets + 1 and m.light_passes == light + 2
        assert m.machines[k3].state == PeerState.UP

        # a peer leaves between polls: removed from WireGuard and the sets
        disc.remove("node-b")
        await m.reconcile()
        assert set(wg.device.peers) == {k1, k3}
        assert ipaddress.ip_network("10.5.0.3/32") not in nft.sets[SET_IPV4]
    finally:
        await m.stop()


async def test_outside_changes_missed_by_light_passes_are_repaired_by_the_periodic_ones(versioned) -> None:
    m, disc, wg, _links, nft, clock, _ = versioned
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    _k2, _, d2 = remote("node-b", "b", "10.5.0.9", 3)
    disc.put(d1, d2)
    await m.start()
    try:
        await m.reconcile()
        # someone removes a peer and a set element behind our back
        from dataclasses import replace

        wg.device = replace(wg.device, peers={k: p for k, p in wg.device.peers.items() if k != k1})
        nft.sets[SET_IPV4].discard(ipaddress.ip_network("10.5.0.2/32"))
        clock.t += 0.2
        disc.put(_readdress(d2, "198.51.100.4"))
        await m.reconcile()  # light: does not notice
        assert k1 not in wg.device.peers
        # the next poll reads the device and repairs the peer
        clock.t += m.cfg.timings.poll_interval
        await m.reconcile()
        assert k1 in wg.device.peers
        # the data plane check reads the table and repairs the element
        clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert ipaddress.ip_network("10.5.0.2/32") in nft.sets[SET_IPV4]
        assert ipaddress.ip_network("198.51.100.4/32") in nft.sets[SET_IPV4]
    finally:
        await m.stop()


async def test_light_pass_whose_write_fails_is_followed_by_a_full_pass(versioned) -> None:
    m, disc, wg, _links, nft, clock, _ = versioned
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        gets, light, writes, applies = wg.gets, m.light_passes, m.wg_writes, len(wg.applies)
        clock.t += 0.2
        k2, mesh2, d2 = remote("node-b", "b", "10.5.0.9", 3)
        disc.put(d2)
        wg.fail_next_apply()
        m._wake.clear()
        await m.reconcile()
        assert len(wg.applies) == applies + 1, "one pass applies at most once"
        assert m.wg_writes == writes, "a failed write is not counted"
        assert m.light_passes == light
        assert m._wake.is_set(), "the next pass is asked for at once"
        assert (k2, mesh2) not in m.prober.probes, "no probe to a peer that is not configured"
        # the next pass is a full one: it re-reads, applies what is missing and probes the new peer
        clock.t += 0.01
        await m.reconcile()
        assert wg.gets > gets and m.light_passes == light, "re-read after the failed write"
        assert len(wg.applies) == applies + 2 and m.wg_writes == writes + 1
        assert set(wg.device.peers) == {k1, k2}
        assert (k2, mesh2) in m.prober.probes, "the new peer is probed once configured"
        assert ipaddress.ip_network("10.5.0.9/32") in nft.sets[SET_IPV4]
        # and the pass after it is a full one too only if something asks for it
        clock.t += 0.1
        await m.reconcile()
        assert m.light_passes == light + 1
    finally:
        await m.stop()


async def test_failed_full_pass_applies_once_counts_nothing_and_the_next_pass_repairs(mesh) -> None:
    m, disc, wg, _links, _nft, clock = mesh
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    k2, _, d2 = remote("node-b", "b", "10.5.0.3", 3)
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        writes, applies = m.wg_writes, len(wg.applies)
        disc.put(d2)
        wg.fail_next_apply()
        wg.fail_next_apply()
        clock.t += m.cfg.timings.poll_interval
        await m.reconcile()
        assert len(wg.applies) == applies + 1, "one pass applies at most once (no retry inside it)"
        assert m.wg_writes == writes, "failed writes are not counted"
        assert any("apply WireGuard" in e for e in m.errors)
        clock.t += m.cfg.timings.poll_interval
        await m.reconcile()  # the second injected failure
        assert len(wg.applies) == applies + 2 and m.wg_writes == writes
        clock.t += m.cfg.timings.poll_interval
        await m.reconcile()
        assert len(wg.applies) == applies + 3 and m.wg_writes == writes + 1
        assert set(wg.device.peers) == {k1, k2}
    finally:
        await m.stop()


async def test_nft_diff_against_a_stale_cache_falls_back_to_reading(versioned) -> None:
    m, disc, _wg, _links, nft, clock, _ = versioned
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2, "192.0.2.7")
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        nft.remove_table()  # behind our back
        clock.t += 0.2
        disc.put(_readdress(d1, "198.51.100.4"))
        reads = nft.reads
        await m.reconcile()
        assert nft.reads == reads + 1, "the failed diff made it read the table"
        assert nft.sets is not None and ipaddress.ip_network("198.51.100.4/32") in nft.sets[SET_IPV4]
        assert ipaddress.ip_network("192.0.2.7/32") in nft.sets[SET_IPV4]
    finally:
        await m.stop()


# --- publishing: what status shows was published, and a failed publish is retried ----------------


async def test_failed_publish_is_retried_and_not_shown_as_published(mesh) -> None:
    m, disc, wg, *_ = mesh
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    disc.put(d1)
    await m.start()
    try:
        disc.fail_publishes = 1
        await m.reconcile()  # the publish fails; the pass still configures the peers
        assert k1 in wg.device.peers
        assert disc.published == []
        assert m.status().endpoints == (), "status shows only what was published"
        assert any("too large" in e for e in m.status().errors)
        await m.reconcile()  # nothing changed locally, but the last publish failed: retried
        assert len(disc.published) == 1
        assert m.status().endpoints == ("10.5.0.1:51820", "203.0.113.9:51820")
        await m.reconcile()
        assert len(disc.published) == 1, "and published once"
    finally:
        await m.stop()


async def test_failed_publish_of_learned_endpoints_is_retried(mesh) -> None:
    m, disc, wg, _links, _nft, clock = mesh
    k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    disc.put(d1)
    await m.start()
    try:
        await m.reconcile()
        for _ in range(2):
            clock.t += 1
            wg.traffic(k1, rx=148, tx=148, handshake=True)
            m.prober.answer(k1)
            await m.reconcile()
        from dataclasses import replace

        natted = AddrPort(ipaddress.ip_address("198.51.100.77"), 40123)
        peers = dict(wg.device.peers)
        peers[k1] = replace(peers[k1], endpoint=natted)
        wg.device = replace(wg.device, peers=peers)
        publishes = len(disc.published)
        disc.fail_publishes = 1
        clock.t += 1
        wg.traffic(k1, rx=148, tx=148)
        await m.reconcile()  # learns the roamed endpoint; its publish fails
        assert len(disc.published) == publishes
        for _ in range(2):
            clock.t += 1
            wg.traffic(k1, rx=148, tx=148)
            await m.reconcile()
        new = disc.published[publishes:]
        assert len(new) == 1, "the learned endpoint is published by a later pass, once"
        assert [(ipaddress.ip_address(e.ip), e.port) for e in new[0][2]["node-a"]] == [
            (natted.ip, natted.port)
        ]
    finally:
        await m.stop()


async def test_affiliate_too_large_for_the_registry_is_published_once_it_fits(mesh) -> None:
    m, *_ = mesh
    from discovery.client import DiscoveryClient

    # the real client (never started: set_local_data validates and records without any RPC)
    client = DiscoveryClient(
        ["http://127.0.0.1:1"], cluster_id=CLUSTER, secret=SECRET, affiliate_id="self-node"
    )
    m.discovery = client
    many = [ipaddress.ip_interface(f"2001:db8::{i:x}/64") for i in range(1, 120)]
    m.host.address_list.extend(many)
    await m.start()
    try:
        await m.reconcile()
        assert client._local is None, "too large: nothing recorded"
        assert m.status().endpoints == ()
        assert sum("publish" in e for e in m.errors) == 1
        m.clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert sum("publish" in e for e in m.errors) == 1, "the same failure is reported once"
        for a in many:
            m.host.address_list.remove(a)
        m.clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert client._local is not None
        assert m.status().endpoints == ("10.5.0.1:51820",)
    finally:
        await m.stop()
        await client.close()


# --- shutdown: one adapter failing to close does not leak the others ------------------------------


class ClosingHost(StaticHost):
    closed: bool = False

    async def close(self) -> None:
        self.closed = True


class FailingCloseWireGuard(FakeWireGuard):
    async def close(self, remove: bool = False) -> None:
        await super().close(remove)
        raise OSError("wireguard-go did not exit")


async def test_stop_closes_every_adapter_when_the_backend_close_raises(tmp_path: Path) -> None:
    from kubespan.wiring import MeshDeps, build_mesh

    links = FakeLinkManager(link_exists=True)
    host = ClosingHost(
        [LinkInfo("eth0", bytes.fromhex("2e1ab6538169"), physical=True)],
        [ipaddress.ip_interface("10.5.0.1/24")],
    )
    disc = FakeDiscovery()
    runner = await build_mesh(
        MeshOptions(cluster_id=CLUSTER, cluster_secret=SECRET, state_dir=tmp_path, nodename="self"),
        discovery_urls=(),
        deps=MeshDeps(
            backend=FailingCloseWireGuard(),
            links=links,
            nft=FakeNftManager(),
            host=host,
            prober=FakeProber(),
            discovery=disc,
        ),
    )
    await runner.start()
    await runner.mesh.reconcile()
    with pytest.raises(OSError, match="did not exit"):
        await runner.stop(cleanup=True, leave=False)
    assert runner.backend.closed
    assert links.closed, "the netlink sockets are released"
    assert host.closed
    assert disc.closed, "the discovery client's sessions and watches are stopped"
    assert not runner.started
