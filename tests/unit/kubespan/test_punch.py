"""The punch planner: when both sides punch, when they give up for a relay, and the retry backoff."""

from __future__ import annotations

import pytest

from kubespan.affiliate import PunchIntent
from kubespan.nat.punch import PeerView, PunchPlanner, PunchTimings, candidates_hash, why_not_direct
from kubespan.wireguard.types import AddrPort, PublicKey

A = PublicKey(b"\x0a" * 32)
B = PublicKey(b"\x0b" * 32)
CANDS = (AddrPort.parse("198.51.100.7:51820"), AddrPort.parse("203.0.113.9:40001"))
T0_MS = 1_800_000_000_000


def view(**kw: object) -> PeerView:
    base: dict[str, object] = {"key": B, "nat_class": "eim", "candidates": CANDS, "direct_up": False}
    base.update(kw)
    return PeerView(**base)  # type: ignore[arg-type]


def test_hash_ignores_order_and_duplicates() -> None:
    assert candidates_hash(CANDS) == candidates_hash((CANDS[1], CANDS[0], CANDS[1]))
    assert candidates_hash(CANDS) != candidates_hash(CANDS[:1])
    assert len(candidates_hash(CANDS)) == 8


@pytest.mark.parametrize(
    ("a", "b", "direct"),
    [
        ("edm", "edm", False),
        ("edm", "eim", True),
        ("eim", "edm", True),
        ("public", "edm", True),
        ("unknown", "edm", True),
    ],
)
def test_why_not_direct(a: str, b: str, direct: bool) -> None:
    assert (why_not_direct(a, b) is None) is direct


def test_first_pass_publishes_an_intent_lead_seconds_ahead() -> None:
    p = PunchPlanner(PunchTimings(lead=2))
    plan = p.plan(now=100.0, now_ms=T0_MS, local_class="eim", peers=[view()])
    assert plan.intents == (PunchIntent(B, candidates_hash(CANDS), T0_MS + 2000),)
    assert [(o.key, o.start_ms) for o in plan.openers] == [(B, T0_MS + 2000)]
    assert plan.relay == {}
    # The next pass keeps the same start (no new intent every second).
    again = p.plan(now=101.0, now_ms=T0_MS + 1000, local_class="eim", peers=[view()])
    assert again.intents == plan.intents


def test_joins_the_peers_earlier_intent() -> None:
    p = PunchPlanner(PunchTimings(lead=2))
    p.plan(now=0.0, now_ms=T0_MS, local_class="eim", peers=[view()])  # ours: T0 + 2 s
    theirs = PunchIntent(A, candidates_hash(CANDS), T0_MS + 500)
    plan = p.plan(now=0.1, now_ms=T0_MS + 100, local_class="eim", peers=[view(intent_for_us=theirs)])
    assert [o.start_ms for o in plan.openers] == [T0_MS + 500]
    assert plan.intents[0].start_ms == T0_MS + 500  # both sides now name the same start


def test_both_symmetric_goes_to_relay_at_once_with_the_reason() -> None:
    plan = PunchPlanner().plan(now=0.0, now_ms=T0_MS, local_class="edm", peers=[view(nat_class="edm")])
    assert plan.intents == () and plan.openers == ()
    assert plan.relay == {B: "both behind symmetric NAT"}


def test_no_answer_within_the_window_relays_then_retries_with_backoff() -> None:
    t = PunchTimings(lead=2, window=10, retry_initial=60, retry_max=600)
    p = PunchPlanner(t)
    p.plan(now=0.0, now_ms=T0_MS, local_class="eim", peers=[view()])
    # Start at +2 s; still inside the window at +11.9 s.
    assert p.plan(now=11.9, now_ms=T0_MS + 11_900, local_class="eim", peers=[view()]).relay == {}
    late = p.plan(now=12.0, now_ms=T0_MS + 12_000, local_class="eim", peers=[view()])
    assert B in late.relay and "no direct answer within 10 s" in late.relay[B]
    assert late.openers == ()
    # The retry comes 60 s after the failure, then 120 s after the next, … at most 600 s.
    assert p.plan(now=71.9, now_ms=T0_MS + 71_900, local_class="eim", peers=[view()]).openers == ()
    retry = p.plan(now=72.0, now_ms=T0_MS + 72_000, local_class="eim", peers=[view()])
    assert [o.start_ms for o in retry.openers] == [T0_MS + 74_000]
    assert B in retry.relay  # the relay keeps carrying traffic during the retry
    assert [t.backoff(n) for n in (1, 2, 3, 4, 5, 6)] == [60, 120, 240, 480, 600, 600]


def test_direct_up_resets_everything() -> None:
    p = PunchPlanner(PunchTimings(lead=2))
    p.plan(now=0.0, now_ms=T0_MS, local_class="eim", peers=[view()])
    p.plan(now=20.0, now_ms=T0_MS + 20_000, local_class="eim", peers=[view()])  # failed once
    up = p.plan(now=21.0, now_ms=T0_MS + 21_000, local_class="eim", peers=[view(direct_up=True)])
    assert up == type(up)()
    fresh = p.plan(now=22.0, now_ms=T0_MS + 22_000, local_class="eim", peers=[view()])
    assert [o.start_ms for o in fresh.openers] == [T0_MS + 24_000]  # no backoff left over


def test_peer_without_candidates_is_not_punched() -> None:
    plan = PunchPlanner().plan(now=0.0, now_ms=T0_MS, local_class="eim", peers=[view(candidates=())])
    assert plan.intents == () and plan.openers == ()


def test_intents_are_capped() -> None:
    peers = [view(key=PublicKey(bytes([i]) * 32)) for i in range(1, 21)]
    plan = PunchPlanner(max_intents=16).plan(now=0.0, now_ms=T0_MS, local_class="eim", peers=peers)
    assert len(plan.intents) == 16 and len(plan.openers) == 20


def test_forgets_peers_that_left() -> None:
    p = PunchPlanner(PunchTimings(lead=2))
    p.plan(now=0.0, now_ms=T0_MS, local_class="eim", peers=[view()])
    p.plan(now=20.0, now_ms=T0_MS + 20_000, local_class="eim", peers=[view()])
    p.plan(now=21.0, now_ms=T0_MS + 21_000, local_class="eim", peers=[])
    back = p.plan(now=22.0, now_ms=T0_MS + 22_000, local_class="eim", peers=[view()])
    assert back.relay == {} and [o.start_ms for o in back.openers] == [T0_MS + 24_000]


def test_timings_are_checked() -> None:
    with pytest.raises(ValueError, match="window: 0 must be greater than 0"):
        PunchTimings(window=0)
    with pytest.raises(ValueError, match="retry_max: 10 is below retry_initial 60"):
        PunchTimings(retry_max=10)


@pytest.mark.parametrize(
    ("local", "remote", "meanwhile"),
    [
        ("eim", "edm", True),
        ("edm", "eim", True),
        ("edm", "unknown", True),
        ("edm", "public", False),  # the symmetric side reaches a public one directly
        ("eim", "eim", False),  # the punch decides; no relay unless it fails
        ("edm", "edm", False),  # never punched: why_not_direct relays it
    ],
)
def test_relayed_while_punching_where_direct_is_uncertain(local: str, remote: str, meanwhile: bool) -> None:
    plan = PunchPlanner().plan(now=0.0, now_ms=T0_MS, local_class=local, peers=[view(nat_class=remote)])
    if local == remote == "edm":
        assert plan.openers == ()
        return
    assert [o.key for o in plan.openers] == [B]  # the punch is still tried
    assert (B in plan.relay) is meanwhile
    if meanwhile:
        assert "relayed while a punch is tried" in plan.relay[B]


def test_an_answered_punch_stops_the_relay_until_the_window_ends() -> None:
    t = PunchTimings(lead=1, window=10)
    p = PunchPlanner(t)
    first = p.plan(now=0.0, now_ms=T0_MS, local_class="edm", peers=[view()])
    start = first.openers[0].start_ms
    assert B in first.relay
    # a probe of that punch answered: the handshake on the punched endpoint follows, no relay
    answered = p.plan(now=2.0, now_ms=T0_MS + 2000, local_class="edm", peers=[view(answered_start=start)])
    assert answered.relay == {} and [o.start_ms for o in answered.openers] == [start]
    # an answer to an older punch does not count
    old = p.plan(now=2.1, now_ms=T0_MS + 2100, local_class="edm", peers=[view(answered_start=start - 1)])
    assert B in old.relay
    # no handshake by the end of the window: a failure like any other, relayed again
    late = p.plan(now=11.0, now_ms=start + 10_000, local_class="edm", peers=[view(answered_start=start)])
    assert "no direct answer" in late.relay[B]


def test_uncertain_peer_without_candidates_is_relayed_meanwhile() -> None:
    plan = PunchPlanner().plan(now=0.0, now_ms=T0_MS, local_class="edm", peers=[view(candidates=())])
    assert plan.openers == () and B in plan.relay
