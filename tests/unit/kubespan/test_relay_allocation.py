"""One relay allocation as a pure state machine (kubespan.relay.allocation), with an injected clock."""

from __future__ import annotations

import os

import pytest

from kubespan.relay import wgmsg
from kubespan.relay.allocation import Allocation, Budget, Limits
from kubespan.relay.ratelimit import TokenBucket
from kubespan.relay.testing import cookie_reply, handshake, transport

KA, KB = os.urandom(32), os.urandom(32)
A, B = ("198.51.100.1", 40001), ("198.51.100.2", 40002)  # the two peers, as the relay sees them
EVE = ("203.0.113.66", 6666)
LEG_A, LEG_B = 0, 1


def alloc(limits: Limits | None = None, now: float = 0.0, relay: Budget | None = None) -> Allocation:
    return Allocation(KA, KB, limits or Limits(), now, relay)


def latched(limits: Limits | None = None) -> Allocation:
    """Both legs latched: A initiated on leg A (addressed to B), B did the same on leg B."""
    al = alloc(limits)
    assert al.receive(LEG_A, handshake(KB), A, 0.0) is None  # leg B has nobody yet
    assert al.receive(LEG_B, handshake(KA), B, 0.0) == A  # forwarded to A, out of leg A
    return al


def test_a_leg_latches_only_on_mac1_for_the_other_peer() -> None:
    al = alloc()
    # A's initiation to B carries mac1 for B's key; one keyed for A itself (or anyone else) is refused
    assert al.receive(LEG_A, handshake(KA), A, 0) is None
    assert al.receive(LEG_A, handshake(os.urandom(32)), A, 0) is None
    assert al.receive(LEG_A, handshake(KB, forged=True), A, 0) is None
    assert al.legs[LEG_A].latched is None
    assert al.counters.dropped == {"bad_mac1": 3}
    assert al.receive(LEG_A, handshake(KB), A, 0) is None
    assert al.legs[LEG_A].latched == A and al.counters.latches == 1
    assert al.counters.dropped["peer_not_latched"] == 1


def test_nothing_is_forwarded_before_latching() -> None:
    al = alloc()
    for msg in (transport(), cookie_reply(), transport(16)):  # 16: a keepalive
        assert al.receive(LEG_A, msg, A, 0) is None
    assert al.counters.dropped == {"unlatched_source": 3}
    assert al.counters.forwarded_packets == 0 and al.legs[LEG_A].latched is None


def test_after_latching_wireguard_flows_both_ways_and_only_between_the_latched_addresses() -> None:
    al = latched()
    resp = handshake(KB, wgmsg.RESPONSE)  # A answers B's initiation: addressed to B
    assert al.receive(LEG_A, resp, A, 1) == B
    data = transport(1400)
    assert al.receive(LEG_A, data, A, 1) == B
    assert al.receive(LEG_B, data, B, 1) == A
    assert al.receive(LEG_B, cookie_reply(), B, 1) == A
    assert al.counters.forwarded_packets == 5  # B's initiation, the response, 2 data, the cookie reply
    assert al.counters.forwarded_bytes == 148 + 92 + 2 * len(data) + 64
    # from anyone else, or A on B's leg: nothing
    assert al.receive(LEG_A, transport(), EVE, 1) is None
    assert al.receive(LEG_B, transport(), A, 1) is None
    assert al.receive(LEG_A, b"\x04\x00\x00\x00junk", A, 1) is None
    assert al.counters.dropped == {"not_wireguard": 1, "peer_not_latched": 1, "unlatched_source": 2}


def test_forged_handshakes_neither_latch_nor_pass() -> None:
    al = latched()
    assert al.receive(LEG_A, handshake(KB, forged=True), EVE, 1) is None
    assert al.receive(LEG_A, handshake(KB, forged=True), A, 1) is None  # not even from the latched peer
    assert al.receive(LEG_B, handshake(KB), B, 1) is None  # B's leg carries messages to A: wrong key
    assert al.legs[LEG_A].latched == A and al.legs[LEG_B].latched == B
    assert al.counters.dropped == {"bad_mac1": 3, "peer_not_latched": 1}


def test_a_new_valid_initiation_from_a_new_address_relatches_after_a_rebind() -> None:
    al = latched()
    rebound = ("198.51.100.1", 50123)
    assert al.receive(LEG_A, transport(), rebound, 5) is None  # data alone does not move the leg
    assert al.receive(LEG_A, handshake(KB), rebound, 6) == B
    assert al.legs[LEG_A].latched == rebound and al.counters.latches == 3
    assert al.receive(LEG_A, transport(), rebound, 6) == B
    assert al.receive(LEG_B, transport(), B, 6) == rebound
    assert al.receive(LEG_A, transport(), A, 6) is None  # the old mapping is gone


def test_a_response_latches_too() -> None:
    al = alloc()
    assert al.receive(LEG_B, handshake(KA), B, 0) is None
    assert al.receive(LEG_A, handshake(KB, wgmsg.RESPONSE), A, 0) == B
    assert al.legs[LEG_A].latched == A


def test_a_replayed_handshake_from_another_address_does_not_steal_the_leg() -> None:
    al = alloc()
    init = handshake(KB)
    al.receive(LEG_A, init, A, 0)
    al.receive(LEG_B, handshake(KA), B, 0)
    assert al.receive(LEG_A, init, EVE, 1) is None
    assert al.legs[LEG_A].latched == A
    assert al.counters.dropped.get("replayed_handshake") == 1
    assert al.receive(LEG_A, init, A, 1) == B  # the same bytes from the latched peer are WireGuard's business


def test_idle_time_counts_only_useful_traffic() -> None:
    al = latched(Limits(idle_timeout=180))
    assert not al.idle(179.9)
    for t in range(0, 400, 10):  # junk and forgeries all along do not keep it alive
        al.receive(LEG_A, transport(), EVE, t)
        al.receive(LEG_A, handshake(KB, forged=True), EVE, t)
    assert al.idle(180)
    al2 = latched(Limits(idle_timeout=180))
    assert al2.receive(LEG_A, transport(), A, 100) == B
    assert not al2.idle(279) and al2.idle(280)


def test_packet_rate_limit_with_refill() -> None:
    al = latched(Limits(packet_rate=10, packet_burst=5, byte_rate=0, byte_burst=0))
    # the burst (5) minus B's initiation already forwarded
    got = [al.receive(LEG_A, transport(), A, 0) for _ in range(10)]
    assert got.count(B) == 4 and al.counters.dropped["rate_limited"] == 6
    assert al.receive(LEG_A, transport(), A, 0.05) is None  # half a token
    assert al.receive(LEG_A, transport(), A, 0.1) == B  # one token after 0.1 s at 10/s
    got = [al.receive(LEG_B, transport(), B, 100) for _ in range(10)]
    assert got.count(A) == 5  # refilled to the burst, not beyond


def test_byte_rate_limit() -> None:
    al = latched(Limits(packet_rate=0, packet_burst=0, byte_rate=1000, byte_burst=1148))
    assert al.receive(LEG_A, transport(984), A, 0) == B  # 148 (initiation) + 1000 = 1148
    assert al.receive(LEG_A, transport(16), A, 0) is None
    assert al.receive(LEG_A, transport(16), A, 0.032) == B
    assert al.counters.dropped["rate_limited"] == 1


def test_a_relay_wide_budget_is_shared() -> None:
    relay = Budget(0, 0, 1000, 1000, 0)
    one = Allocation(KA, KB, Limits(), 0, relay)
    two = Allocation(os.urandom(32), os.urandom(32), Limits(), 0, relay)
    one.receive(LEG_A, handshake(KB), A, 0)
    one.receive(LEG_B, handshake(KA), B, 0)  # 148 of the 1000 bytes
    two.receive(LEG_A, handshake(two.key_b), EVE, 0)
    assert two.receive(LEG_B, handshake(two.key_a), A, 0) == EVE  # 296
    assert one.receive(LEG_A, transport(684), A, 0) == B  # 996
    assert two.receive(LEG_A, transport(), EVE, 0) is None
    assert two.counters.dropped["relay_rate_limited"] == 1


def test_keys_are_checked() -> None:
    with pytest.raises(ValueError, match="key_a must be a 32-byte"):
        Allocation(b"x", KB, Limits(), 0)
    with pytest.raises(ValueError, match="must differ"):
        Allocation(KA, KA, Limits(), 0)
    with pytest.raises(ValueError, match="idle_timeout"):
        Limits(idle_timeout=0)


def test_token_bucket_unlimited_and_validation() -> None:
    assert all(TokenBucket(0, 0, 0).take(10**9, 0) for _ in range(3))
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(5, 0, 0)
