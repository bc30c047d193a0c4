"""WireGuard diff: minimal operations, and applying them converges to the desired state."""

from __future__ import annotations

from ipaddress import IPv4Network, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan.wireguard.diff import (
    AddPeer,
    DiffMemo,
    RemovePeer,
    SetDevice,
    UpdatePeer,
    apply_ops,
    diff_device,
    diff_peer,
    diff_peers,
    split_ops,
)
from kubespan.wireguard.types import (
    AddrPort,
    DeviceConfig,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    PublicKey,
)

PRIV = PrivateKey(b"\x08" * 32)
PSK = PresharedKey(b"\x05" * 32)


def key(n):
    return PublicKey(bytes([n]) * 32)


def nets(*items):
    return frozenset(ip_network(i) for i in items)


def observed_from(cfg: DeviceConfig, rx=0) -> ObservedDevice:
    return ObservedDevice(
        cfg.private_key,
        cfg.listen_port,
        cfg.fwmark,
        {
            k: ObservedPeer(k, p.allowed_ips, p.endpoint, p.persistent_keepalive, p.preshared_key, rx, rx)
            for k, p in cfg.peers.items()
        },
    )


def device(*peers, port=51820, fwmark=0x20):
    return DeviceConfig.of(PRIV, port, fwmark, peers)


def test_unchanged_reconcile_yields_nothing():
    desired = device(
        PeerConfig(key(1), nets("10.0.0.1/32"), AddrPort("192.0.2.1", 51820), 25, PSK),
        PeerConfig(key(2), nets("10.0.0.2/32", "fd00::2/128"), None, 25, PSK),
    )
    assert diff_device(desired, observed_from(desired, rx=99)) == []


def test_endpoint_none_means_keep_roamed_endpoint():
    want = PeerConfig(key(1), nets("10.0.0.1/32"), None, 25)
    have = ObservedPeer(key(1), nets("10.0.0.1/32"), AddrPort("198.51.100.7", 40001), 25)
    assert diff_peer(want, have) is None


def test_only_changed_fields_are_carried():
    have = ObservedPeer(key(1), nets("10.0.0.1/32"), AddrPort("192.0.2.1", 1), 25, PSK)
    assert diff_peer(PeerConfig(key(1), nets("10.0.0.1/32"), AddrPort("192.0.2.2", 1), 25, PSK), have) == (
        UpdatePeer(key(1), endpoint=AddrPort("192.0.2.2", 1))
    )
    assert diff_peer(PeerConfig(key(1), nets("10.0.0.1/32"), None, 0, PSK), have) == UpdatePeer(
        key(1), persistent_keepalive=0
    )
    assert diff_peer(PeerConfig(key(1), nets("10.0.0.0/24"), None, 25, PSK), have) == UpdatePeer(
        key(1), allowed_ips=nets("10.0.0.0/24")
    )


def test_psk_change_and_clear():
    have = ObservedPeer(key(1), persistent_keepalive=0, preshared_key=PSK)
    cleared = diff_peer(PeerConfig(key(1)), have)
    assert cleared is not None and cleared.preshared_key is not None and cleared.preshared_key.is_zero()
    set_ = diff_peer(PeerConfig(key(1), preshared_key=PSK), ObservedPeer(key(1)))
    assert set_ == UpdatePeer(key(1), preshared_key=PSK)


def test_allowed_ips_compared_as_sets():
    have = ObservedPeer(key(1), nets("fd00::1/128", "10.0.0.1/32"))
    assert diff_peer(PeerConfig(key(1), nets("10.0.0.1/32", "fd00::1/128")), have) is None


def test_order_removes_updates_adds():
    observed = {
        key(3): ObservedPeer(key(3)),
        key(2): ObservedPeer(key(2), nets("10.0.0.2/32")),
        key(9): ObservedPeer(key(9)),
    }
    desired = {
        key(2): PeerConfig(key(2), nets("10.0.0.22/32")),
        key(1): PeerConfig(key(1)),
        key(4): PeerConfig(key(4)),
    }
    ops = diff_peers(desired, observed)
    assert ops == [
        RemovePeer(key(3)),
        RemovePeer(key(9)),
        UpdatePeer(key(2), allowed_ips=nets("10.0.0.22/32")),
        AddPeer(desired[key(1)]),
        AddPeer(desired[key(4)]),
    ]


def test_device_settings_diff():
    desired = device(port=51821, fwmark=0x20)
    ops = diff_device(desired, ObservedDevice(PRIV, 51820, 0x20))
    assert ops == [SetDevice(listen_port=51821)]
    assert diff_device(desired, None)[0] == SetDevice(PRIV, 51821, 0x20)


def test_apply_models_allowed_ip_moving_between_peers():
    observed = ObservedDevice(
        PRIV, 1, 0, {key(1): ObservedPeer(key(1), nets("10.0.0.100/32", "10.0.0.1/32"))}
    )
    after = apply_ops(observed, [AddPeer(PeerConfig(key(2), nets("10.0.0.100/32")))])
    assert after.peers[key(1)].allowed_ips == nets("10.0.0.1/32")
    assert after.peers[key(2)].allowed_ips == nets("10.0.0.100/32")


def test_apply_update_of_missing_peer_is_noop_and_counters_survive():
    observed = ObservedDevice(
        PRIV, 1, 0, {key(1): ObservedPeer(key(1), rx_bytes=5, tx_bytes=6, last_handshake=1.0)}
    )
    after = apply_ops(
        observed, [UpdatePeer(key(7), persistent_keepalive=3), UpdatePeer(key(1), persistent_keepalive=3)]
    )
    assert set(after.peers) == {key(1)}
    assert after.peers[key(1)].rx_bytes == 5 and after.peers[key(1)].last_handshake == 1.0
    assert after.peers[key(1)].persistent_keepalive == 3


def test_op_reprs_never_show_secrets():
    ops = diff_device(device(PeerConfig(key(1), preshared_key=PSK)), None)
    text = repr(ops)
    assert PRIV.b64 not in text and PSK.b64 not in text and PSK.hex not in text


# --- property: apply(diff) converges, and a second diff is empty -----------------------------------

KEYS = [key(i) for i in range(1, 7)]
PREFIXES = [IPv4Network((0x0A000000 + i, 32)) for i in range(12)] + [ip_network("fd00::/64")]
endpoints = st.none() | st.builds(
    AddrPort, st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"]), st.sampled_from([1, 51820])
)
psks = st.sampled_from([None, PSK, PresharedKey(b"\x06" * 32)])


@st.composite
def devices(draw, observed: bool):
    chosen = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=5))
    # desired allowed IPs are disjoint across peers (peer specs guarantee it); observed may overlap
    pool = list(PREFIXES)
    peers = []
    for k in chosen:
        if observed:
            mine = draw(st.frozensets(st.sampled_from(PREFIXES), max_size=3))
        else:
            mine = draw(st.frozensets(st.sampled_from(pool), max_size=3)) if pool else frozenset()
            pool = [p for p in pool if p not in mine]
        peers.append((k, mine, draw(endpoints), draw(st.sampled_from([0, 25])), draw(psks)))
    port = draw(st.sampled_from([51820, 51821]))
    fwmark = draw(st.sampled_from([0, 0x20]))
    if observed:
        return ObservedDevice(
            draw(st.sampled_from([None, PRIV])),
            port,
            fwmark,
            {k: ObservedPeer(k, a, e, ka, p, 7, 8) for k, a, e, ka, p in peers},
        )
    return DeviceConfig.of(PRIV, port, fwmark, [PeerConfig(k, a, e, ka, p) for k, a, e, ka, p in peers])


@settings(max_examples=100)
@given(devices(observed=False), devices(observed=True))
def test_apply_diff_converges(desired, observed):
    ops = diff_device(desired, observed)
    after = apply_ops(observed, ops)
    assert after.private_key == desired.private_key
    assert after.listen_port == desired.listen_port
    assert after.fwmark == desired.fwmark
    assert set(after.peers) == set(desired.peers)
    for k, want in desired.peers.items():
        got = after.peers[k]
        assert got.allowed_ips == want.allowed_ips
        assert got.persistent_keepalive == want.persistent_keepalive
        assert got.preshared_key == want.preshared_key
        if want.endpoint is not None:
            assert got.endpoint == want.endpoint
        elif k in observed.peers:
            assert got.endpoint == observed.peers[k].endpoint  # roaming left alone
    assert diff_device(desired, after) == []
    # minimality: no op for a peer that already matched
    matched = {
        k
        for k in desired.peers
        if k in observed.peers and diff_peer(desired.peers[k], observed.peers[k]) is None
    }
    touched = {getattr(op, "public_key", None) for op in ops} | {
        op.peer.public_key for op in ops if isinstance(op, AddPeer)
    }
    assert not matched & touched


def _reference_diff_peers(desired, observed):
    """The original formulation: groups built in sorted-key order (PublicKey.__lt__)."""
    removes = [RemovePeer(k) for k in sorted(observed) if k not in desired]
    updates, adds = [], []
    for k in sorted(desired):
        have = observed.get(k)
        if have is None:
            adds.append(AddPeer(desired[k]))
        elif (upd := diff_peer(desired[k], have)) is not None:
            updates.append(upd)
    return removes + updates + adds


@settings(max_examples=100)
@given(devices(observed=False), devices(observed=True), devices(observed=True))
def test_diff_memo_never_changes_the_result(desired, observed, later):
    assert diff_peers(desired.peers, observed.peers) == _reference_diff_peers(desired.peers, observed.peers)
    memo = DiffMemo()
    plain = diff_device(desired, observed)
    assert diff_device(desired, observed, memo) == plain
    assert diff_device(desired, observed, memo) == plain  # peers in sync now come from the memo
    # the device changed: some peer objects are the same, others are new
    mixed = ObservedDevice(
        later.private_key, later.listen_port, later.fwmark, {**later.peers, **observed.peers}
    )
    for k in list(mixed.peers)[::2]:
        if k in later.peers:
            mixed = ObservedDevice(
                mixed.private_key, mixed.listen_port, mixed.fwmark, {**mixed.peers, k: later.peers[k]}
            )
    assert diff_device(desired, mixed, memo) == diff_device(desired, mixed)


def test_diff_memo_skips_only_identical_objects():
    want = device(PeerConfig(key(1), nets("10.0.0.1/32"), None, 25, PSK))
    have = observed_from(want)
    memo = DiffMemo()
    assert diff_device(want, have, memo) == [] and key(1) in memo.in_sync
    # an equal but different observed object is compared again (and still in sync)
    assert diff_device(want, observed_from(want), memo) == []
    # a changed observed peer is never taken from the memo
    moved = ObservedDevice(
        have.private_key,
        have.listen_port,
        have.fwmark,
        {key(1): ObservedPeer(key(1), nets("10.0.0.2/32"), None, 25, PSK)},
    )
    assert diff_device(want, moved, memo) == [UpdatePeer(key(1), allowed_ips=nets("10.0.0.1/32"))]
    assert key(1) not in memo.in_sync


def test_split_ops_merges_device_settings_and_keeps_peer_order():
    ops = [
        SetDevice(private_key=PRIV, listen_port=1),
        RemovePeer(key(2)),
        SetDevice(listen_port=2, fwmark=0x20),
        AddPeer(PeerConfig(key(1))),
    ]
    device, peers = split_ops(ops)
    assert device == SetDevice(PRIV, 2, 0x20)  # a later SetDevice wins field by field
    assert peers == [RemovePeer(key(2)), AddPeer(PeerConfig(key(1)))]
    with pytest.raises(TypeError, match="unknown operation str"):
        split_ops(["private_key=..."])  # type: ignore[list-item]
