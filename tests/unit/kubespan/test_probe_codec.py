"""Punch probes on the wire: layout, MAC, staleness, replay and rate state (kubespan.nat.probemsg)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubespan.nat import probemsg
from kubespan.nat.probemsg import ProbeError, ProbeMessage, RateLimiter, ReplayGuard
from kubespan.relay import wgmsg
from kubespan.wireguard.types import AddrPort, PublicKey

KEY = probemsg.probe_key(b"s" * 32)
ALICE, BOB = PublicKey(b"a" * 32), PublicKey(b"b" * 32)
NOW = 1_800_000_000_000


def probe(now: int = NOW) -> ProbeMessage:
    return ProbeMessage.probe(ALICE, now)


def test_probe_and_answer_round_trip():
    p = probe()
    wire = probemsg.encode(p, KEY)
    assert len(wire) == probemsg.MESSAGE_LEN and wire[:4] == b"KSPQ"
    assert probemsg.decode(wire, KEY, NOW) == p
    seen = AddrPort(IPv4Address("198.51.100.7"), 40799)
    a = ProbeMessage.answering(p, BOB, seen, NOW + 5)
    got = probemsg.decode(probemsg.encode(a, KEY), KEY, NOW)
    assert got.answer and got.reply_to == p.nonce and got.observed == seen and got.sender == BOB
    assert got.nonce != p.nonce
    v6 = AddrPort(IPv6Address("2001:db8::7"), 51820)
    assert (
        probemsg.decode(probemsg.encode(ProbeMessage.answering(p, BOB, v6, NOW), KEY), KEY, NOW).observed
        == v6
    )


@pytest.mark.parametrize(
    "msg", [probe(), ProbeMessage.answering(probe(), BOB, AddrPort(IPv4Address("1.2.3.4"), 9), NOW)]
)
def test_no_probe_or_answer_looks_like_wireguard_or_stun(msg):
    wire = probemsg.encode(msg, KEY)
    assert wgmsg.message_type(wire) is None
    assert not (1 <= wire[0] <= 4 and wire[1:4] == b"\0\0\0")
    assert wire[4:8] != struct.pack("!I", 0x2112A442)  # the STUN cookie
    assert wire[:4] != probemsg.OPENER_PAYLOAD


def test_the_key_depends_on_the_secret_and_is_not_the_secret():
    assert probemsg.probe_key(b"s" * 32) == KEY
    assert probemsg.probe_key(b"t" * 32) != KEY
    assert KEY != b"s" * 32 and len(KEY) == 32
    assert len(probemsg.probe_key(b"x" * 100)) == 32  # long secrets are hashed first
    with pytest.raises(ValueError, match="empty"):
        probemsg.probe_key(b"")


def test_wrong_secret_is_refused():
    wire = probemsg.encode(probe(), KEY)
    with pytest.raises(ProbeError, match="bad mac"):
        probemsg.decode(wire, probemsg.probe_key(b"t" * 32), NOW)


@given(st.integers(min_value=0, max_value=probemsg.MESSAGE_LEN - 1), st.integers(min_value=0, max_value=7))
def test_every_bit_is_covered_by_the_mac(index, bit):
    wire = bytearray(probemsg.encode(probe(), KEY))
    wire[index] ^= 1 << bit
    with pytest.raises(ProbeError):
        probemsg.decode(bytes(wire), KEY, NOW)


@pytest.mark.parametrize("cut", [0, 1, 4, 60, probemsg.MESSAGE_LEN - 1])
def test_truncated_and_padded_messages_are_refused(cut):
    wire = probemsg.encode(probe(), KEY)
    with pytest.raises(ProbeError, match="length"):
        probemsg.decode(wire[:cut], KEY, NOW)
    with pytest.raises(ProbeError, match="length"):
        probemsg.decode(wire + b"\0", KEY, NOW)


@pytest.mark.parametrize(
    ("skew", "ok"), [(0, True), (30_000, True), (-30_000, True), (30_001, False), (-30_001, False)]
)
def test_time_outside_thirty_seconds_is_stale(skew, ok):
    wire = probemsg.encode(probe(NOW + skew), KEY)
    if ok:
        assert probemsg.decode(wire, KEY, NOW).time_ms == NOW + skew
    else:
        with pytest.raises(ProbeError, match="stale"):
            probemsg.decode(wire, KEY, NOW)


def remac(head: bytes) -> bytes:
    """A message with any content, correctly MAC'd: what a cluster member with a bug could send."""
    import hashlib

    return head + hashlib.blake2s(head, key=KEY, digest_size=16).digest()


def test_malformed_but_authentic_messages_are_refused():
    good = probemsg.encode(probe(), KEY)[:100]
    with pytest.raises(ProbeError, match="not a probe"):
        probemsg.decode(remac(b"\x01\0\0\0" + good[4:]), KEY, NOW)
    with pytest.raises(ProbeError, match="version"):
        probemsg.decode(remac(good[:4] + b"\x02" + good[5:]), KEY, NOW)
    with pytest.raises(ProbeError, match="reserved"):
        probemsg.decode(remac(good[:5] + b"\0\1\0" + good[8:]), KEY, NOW)
    with pytest.raises(ProbeError, match="answer fields"):
        probemsg.decode(remac(good[:80] + b"\x04" + good[81:]), KEY, NOW)
    answer = probemsg.encode(
        ProbeMessage.answering(probe(), BOB, AddrPort(IPv4Address("1.2.3.4"), 9), NOW), KEY
    )
    with pytest.raises(ProbeError, match="family"):
        probemsg.decode(remac(answer[:80] + b"\x05" + answer[81:100]), KEY, NOW)
    with pytest.raises(ProbeError, match="port"):
        probemsg.decode(remac(answer[:82] + b"\0\0" + answer[84:100]), KEY, NOW)
    with pytest.raises(ProbeError, match="family"):  # an IPv4 address with bytes past its four
        probemsg.decode(remac(answer[:90] + b"\1" + answer[91:100]), KEY, NOW)


def test_replayed_nonce_is_refused_within_the_window():
    guard = ReplayGuard(window_ms=60_000, capacity=8)
    assert guard.fresh(b"n1", NOW)
    assert not guard.fresh(b"n1", NOW + 59_999)
    assert guard.fresh(b"n2", NOW + 1)
    assert guard.fresh(b"n1", NOW + 60_000)  # forgotten: by now its time stamp is stale anyway
    assert len(guard) == 2  # n2 (still live) and n1 again


def test_a_full_replay_guard_fails_closed_and_stays_bounded():
    guard = ReplayGuard(window_ms=60_000, capacity=3)
    assert all(guard.fresh(bytes([i]), NOW) for i in range(3))
    assert not guard.fresh(b"new", NOW + 1)
    assert not guard.fresh(b"\0", NOW + 2)  # still remembered: a replay stays refused
    assert len(guard) == 3
    assert guard.fresh(b"new", NOW + 60_000)


def test_rate_limiter_allows_a_burst_then_the_rate():
    lim = RateLimiter(rate=2, burst=3, max_sources=4)
    assert [lim.allow("x", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow("y", 0.0)  # per source
    assert lim.allow("x", 0.5) and not lim.allow("x", 0.5)
    assert [lim.allow("x", 10.0) for _ in range(4)] == [True, True, True, False]  # refills to the burst only


def test_rate_limiter_state_is_bounded():
    lim = RateLimiter(rate=1, burst=1, max_sources=2)
    assert lim.allow("a", 0.0) and lim.allow("b", 0.0)
    assert not lim.allow("c", 0.1)  # both tracked sources still limited: no room
    assert len(lim) == 2
    assert lim.allow("c", 1.5)  # a and b refilled: forgotten, c gets a bucket
    assert len(lim) == 1
