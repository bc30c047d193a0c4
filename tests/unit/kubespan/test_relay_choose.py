"""Relay choice (kubespan.relay.choose): ordering by RTT, who chooses, keeping a working relay, and
failover, all pure."""

from __future__ import annotations

import pytest

from kubespan.relay.choose import Decision, RelayOption, choose, chooses, rank
from kubespan.wireguard.types import PublicKey

LOW, HIGH = PublicKey(b"\x01" * 32), PublicKey(b"\xfe" * 32)  # LOW chooses for the pair (LOW, HIGH)
R1, R2, R3, R4 = (PublicKey(bytes([0x10 * i]) * 32) for i in (1, 2, 3, 4))
FAILOVER = 6.0


def opt(k: PublicKey, rtt_ms: float | None) -> RelayOption:
    return RelayOption(k, f"node-{k.raw[0]:02x}", None if rtt_ms is None else rtt_ms / 1000)


def test_the_lower_key_chooses() -> None:
    assert chooses(LOW, HIGH) and not chooses(HIGH, LOW)


def test_rank_is_lowest_rtt_first_unmeasured_last_ties_by_key() -> None:
    options = [opt(R4, None), opt(R3, 5.0), opt(R2, 3.1), opt(R1, 5.0), opt(LOW, 0.1), opt(HIGH, 0.2)]
    assert [o.key for o in rank(options, LOW, HIGH)] == [R2, R1, R3, R4]  # the pair's own nodes excluded
    assert [o.key for o in rank(reversed(options), LOW, HIGH)] == [R2, R1, R3, R4]  # order-independent


def test_rank_puts_avoided_relays_last_and_counts_a_key_once() -> None:
    options = [opt(R1, 1.0), opt(R2, 2.0), opt(R1, 9.0), opt(R3, None)]
    assert [o.key for o in rank(options, LOW, HIGH, avoid={R1})] == [R2, R3, R1]
    assert rank(options, LOW, HIGH)[0].rtt == pytest.approx(0.001)


def test_the_chooser_requests_the_fastest_relay_with_a_reason() -> None:
    d = choose(LOW, HIGH, [opt(R1, 5.0), opt(R2, 3.14)], failover_after=FAILOVER)
    assert d == Decision("request", opt(R2, 3.14), "relay via node-20 (rtt 3.1 ms)")
    assert d.requests


def test_an_unmeasured_relay_is_used_when_it_is_all_there_is() -> None:
    d = choose(LOW, HIGH, [opt(R1, None)], failover_after=FAILOVER)
    assert d.action == "request" and d.reason == "relay via node-10 (rtt not measured)"


def test_no_relay_but_the_pair_itself() -> None:
    d = choose(LOW, HIGH, [opt(HIGH, 1.0), opt(LOW, 1.0)], failover_after=FAILOVER)
    assert d == Decision("none", None, "no relay available")
    assert not d.requests


def test_a_working_relay_is_kept_even_when_a_faster_one_appears() -> None:
    d = choose(LOW, HIGH, [opt(R1, 9.0), opt(R2, 1.0)], failover_after=FAILOVER, current=R1, stalled_for=5.9)
    assert (d.action, d.relay and d.relay.key, d.reason) == ("keep", R1, "relay via node-10 (rtt 9.0 ms)")
    assert not d.requests


def test_a_stalled_relay_fails_over_to_the_next_best() -> None:
    options = [opt(R1, 1.0), opt(R2, 2.0), opt(R3, 3.0)]
    d = choose(LOW, HIGH, options, failover_after=FAILOVER, current=R1, stalled_for=6.0)
    assert d.action == "switch" and d.relay == opt(R2, 2.0) and d.failed == R1 and d.requests
    assert d.reason == "relay node-10 failed (no handshake progress for 6 s); relay via node-20 (rtt 2.0 ms)"
    # the failed relay, remembered by the caller, is not chosen again while others exist
    again = choose(LOW, HIGH, options, failover_after=FAILOVER, current=R2, stalled_for=7, avoid={R1})
    assert again.relay == opt(R3, 3.0) and again.failed == R2


def test_a_relay_that_stops_announcing_is_left() -> None:
    d = choose(LOW, HIGH, [opt(R2, 2.0)], failover_after=FAILOVER, current=R1)
    assert d.action == "switch" and d.relay == opt(R2, 2.0) and d.failed == R1
    assert d.reason.startswith(f"relay {R1.b64[:8]} no longer relays; relay via node-20")


def test_failover_with_nowhere_to_go() -> None:
    d = choose(LOW, HIGH, [opt(R1, 1.0)], failover_after=FAILOVER, current=R1, stalled_for=60)
    assert d.action == "none" and d.relay is None and d.failed == R1
    assert d.reason == "relay node-10 failed (no handshake progress for 60 s); no relay available"


def test_the_follower_waits_then_follows_the_notify() -> None:
    options = [opt(R1, 1.0), opt(R2, 2.0)]
    d = choose(HIGH, LOW, options, failover_after=FAILOVER, waited=1.2, follow_grace=5)
    assert d == Decision("wait", None, "waiting for the peer to choose a relay (1 s)")
    d = choose(HIGH, LOW, options, failover_after=FAILOVER, notified=R2, waited=1.2)
    assert d.action == "follow" and d.relay == opt(R2, 2.0) and not d.requests
    assert d.reason == "relay via node-20 (rtt 2.0 ms), chosen by the peer"
    # a stall is the chooser's to act on: the follower keeps following
    d = choose(HIGH, LOW, options, failover_after=FAILOVER, notified=R2, current=R2, stalled_for=30)
    assert d.action == "follow"


def test_a_follower_whose_peer_stays_silent_chooses_itself() -> None:
    d = choose(HIGH, LOW, [opt(R1, 1.0)], failover_after=FAILOVER, waited=5.0, follow_grace=5)
    assert d.action == "request" and d.relay == opt(R1, 1.0)


def test_a_follower_leaves_a_notified_relay_that_stopped_relaying() -> None:
    d = choose(HIGH, LOW, [opt(R2, 2.0)], failover_after=FAILOVER, notified=R1, current=R1)
    assert d.action == "switch" and d.relay == opt(R2, 2.0)


def test_bad_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="failover_after must be positive"):
        choose(LOW, HIGH, [], failover_after=0)
    with pytest.raises(ValueError, match="follow_grace not negative"):
        choose(LOW, HIGH, [], failover_after=1, follow_grace=-1)
