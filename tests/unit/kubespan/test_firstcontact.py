"""Who sends a new pair's first initiation (kubespan.firstcontact)."""

from __future__ import annotations

import pytest

from kubespan.firstcontact import Action, FirstContact, FirstContactTimings, waits
from kubespan.identity import generate_private_key
from kubespan.wireguard.types import PublicKey


def keys() -> tuple[PublicKey, PublicKey]:
    """Two keys, the lower first."""
    a, b = (generate_private_key().public_key() for _ in range(2))
    return (a, b) if a.raw < b.raw else (b, a)


@pytest.mark.parametrize(
    ("own", "peer", "low_waits", "high_waits"),
    [
        ("public", "eim", True, True),  # the reachable side waits, whatever the keys
        ("unknown", "edm", True, True),
        ("eim", "public", False, False),  # the side behind NAT goes first
        ("edm", "unknown", False, False),
        ("public", "public", False, True),  # alike: the higher key waits
        ("eim", "edm", False, True),
        ("unknown", "unknown", False, True),
    ],
)
def test_one_side_of_a_pair_waits(own: str, peer: str, low_waits: bool, high_waits: bool) -> None:
    low, high = keys()
    assert waits(low, own, high, peer) is low_waits
    assert waits(high, own, low, peer) is high_waits
    # the two sides never both wait nor both go when they agree on each other's class
    assert waits(low, own, high, peer) != waits(high, peer, low, own)


def test_the_waiting_side_holds_then_recreates_once() -> None:
    t = FirstContactTimings(hold=0.5, retry=1.5, check=0.1, recheck=0.4)
    fc = FirstContact(100.0, waiting=True, timings=t)
    assert fc.due() == pytest.approx(100.1), "looks for the peer's session while holding"
    assert fc.step(100.0, session=False) is Action.HOLD
    assert fc.step(100.4, session=False) is Action.HOLD
    assert fc.due() == pytest.approx(100.5), "the next look, or the hold's end if sooner"
    # no session at the hold's end: a fresh peer, since WireGuard may have counted an initiation
    # it could not send without an endpoint (the next would wait 5 s)
    assert fc.step(100.5, session=False) is Action.RECREATE
    # then as an initiator: our initiation may have crossed the peer's first one
    assert not fc.done and fc.due() == pytest.approx(100.6)
    assert fc.step(100.8, session=False) is Action.GO
    assert fc.due() == pytest.approx(100.9), "the re-check, sooner than the next look"
    # recheck after the first, before the peer's own retry (1.5 s after its add, about when our
    # hold ended): one initiation alone
    assert fc.step(100.9, session=False) is Action.RECREATE, "one more try, recheck after the first"
    # the last one: its session is looked for (and confirmed) up to retry after it, then no more
    assert fc.last and not fc.done and fc.due() == pytest.approx(101.0)
    assert fc.step(102.3, session=False) is Action.GO and not fc.done
    assert fc.step(102.5, session=False) is Action.GO
    assert fc.done and fc.due() is None
    assert fc.step(104.0, session=False) is Action.GO, "no more"


def test_a_session_after_the_hold_ends_the_waiting_sides_retry() -> None:
    fc = FirstContact(100.0, waiting=True, timings=FirstContactTimings(hold=0.25, retry=1.5, check=0.1))
    assert fc.step(100.25, session=False) is Action.RECREATE
    assert fc.step(100.35, session=True) is Action.GO
    assert fc.done and fc.due() is None


def test_a_hold_that_answered_the_peers_initiation_waits_for_its_confirmation() -> None:
    """The peer's initiation arrived and was answered just before the hold's end: our own initiation
    now would cross it (both responses dropped), so the hold goes on, recheck after the answer."""
    t = FirstContactTimings(hold=0.25, retry=1.5, check=0.1, recheck=0.5)
    fc = FirstContact(100.0, waiting=True, timings=t)
    assert fc.step(100.2, session=False, answered=True) is Action.HOLD
    assert fc.step(100.3, session=False, answered=True) is Action.HOLD, "past the plain hold's end"
    assert fc.due() == pytest.approx(100.4)
    assert fc.step(100.35, session=True) is Action.GO, "the confirmation came"
    assert fc.done


def test_an_answered_hold_without_confirmation_ends_in_the_recreation_after_recheck() -> None:
    t = FirstContactTimings(hold=0.25, retry=1.5, check=0.1, recheck=0.5)
    fc = FirstContact(100.0, waiting=True, timings=t)
    assert fc.step(100.1, session=False, answered=True) is Action.HOLD
    assert fc.step(100.5, session=False, answered=True) is Action.HOLD
    assert fc.due() == pytest.approx(100.6), "the hold's new end: the answer's time + recheck"
    assert fc.step(100.6, session=False, answered=True) is Action.RECREATE, "our response was lost"
    assert not fc.done and fc.step(101.1, session=False) is Action.RECREATE
    assert fc.last


def test_an_initiator_ignores_answered() -> None:
    fc = FirstContact(100.0, waiting=False, timings=FirstContactTimings(retry=1.5, check=0.1))
    assert fc.step(101.0, session=False, answered=True) is Action.GO
    assert fc.step(101.5, session=False, answered=True) is Action.RECREATE
    assert fc.last


def test_a_hold_for_a_peer_behind_nat_ends_without_recreation() -> None:
    # the peer may be unreachable from here (symmetric NAT): a session it made just before the
    # write must not be lost; it re-creates on its side if its first initiation was lost
    fc = FirstContact(100.0, waiting=True, recreate=False)
    assert fc.step(100.0, session=False) is Action.HOLD
    assert fc.step(100.5, session=False) is Action.GO
    assert fc.done
    initiator = FirstContact(100.0, waiting=False, recreate=False)
    assert initiator.step(101.5, session=False) is Action.RECREATE, "only the hold's end is spared"


def test_the_hold_is_looked_at_every_check_until_its_end() -> None:
    fc = FirstContact(100.0, waiting=True, timings=FirstContactTimings(hold=0.5, retry=1.5, check=0.2))
    steps: list[tuple[float, Action]] = []
    now: float | None = 100.0
    while now is not None and len(steps) < 7:
        steps.append((round(now, 3), fc.step(now, session=False)))
        now = fc.due()  # the engine's next full pass
    assert steps == [
        (100.0, Action.HOLD),
        (100.2, Action.HOLD),
        (100.4, Action.HOLD),
        (100.5, Action.RECREATE),
        (100.7, Action.GO),  # the session is looked for as by an initiator
        (100.9, Action.GO),
        (101.0, Action.RECREATE),  # recheck (0.5 s) after the hold's end: once more, the last
    ]
    assert fc.last and fc.due() == pytest.approx(101.2), "its session is still looked for"


def test_a_session_during_the_hold_ends_it_without_recreation() -> None:
    fc = FirstContact(100.0, waiting=True)
    assert fc.step(100.0, session=False) is Action.HOLD
    assert fc.step(100.3, session=True) is Action.GO
    assert fc.done
    assert fc.step(100.6, session=False) is Action.GO


def test_a_waiting_side_first_seen_after_its_hold_initiates_at_once() -> None:
    fc = FirstContact(100.0, waiting=True)
    assert fc.step(100.9, session=False) is Action.RECREATE
    assert not fc.waiting and fc.since == 100.9


def test_the_initiator_recreates_once_when_no_session_came() -> None:
    fc = FirstContact(100.0, waiting=False, timings=FirstContactTimings(hold=0.5, retry=1.5, check=0.1))
    assert fc.due() == pytest.approx(100.1), "looks for the session (the state is up at once)"
    assert fc.step(100.0, session=False) is Action.GO
    assert fc.step(101.4, session=False) is Action.GO
    assert fc.due() == pytest.approx(101.5), "the re-creation when sooner than the next look"
    assert fc.step(101.5, session=False) is Action.RECREATE
    assert fc.step(103.0, session=False) is Action.GO, "once"


def test_crossed_last_initiations_the_initiator_alone_recreates_once_more() -> None:
    t = FirstContactTimings(hold=0.5, retry=1.5, check=0.1, recheck=0.4)
    initiator = FirstContact(100.0, waiting=False, timings=t)
    assert initiator.step(101.5, session=False) is Action.RECREATE  # its retry, the last
    # retry after it: it has answered the peer's initiation (rx grew), no session yet: the peer's
    # confirmation may be on the way, so it looks again recheck later
    assert initiator.step(103.0, session=False, answered=True) is Action.GO and not initiator.done
    assert initiator.due() == pytest.approx(103.1)  # the next look (recheck ends at 103.4)
    assert initiator.step(103.1, session=False, answered=True) is Action.GO
    assert initiator.due() == pytest.approx(103.2)
    # still none recheck after the answer: the initiations crossed; one more re-creation
    act = initiator.step(103.4, session=False, answered=True)
    assert act is Action.RECREATE and "crossed" in initiator.why and not initiator.done
    assert initiator.step(104.9, session=False, answered=True) is Action.GO and initiator.done, "once"
    # the waiting side, in the same state after its two re-creations, leaves the initiation to it
    waiting = FirstContact(100.0, waiting=True, timings=t)
    assert waiting.step(100.5, session=False) is Action.RECREATE
    assert waiting.step(100.9, session=False) is Action.RECREATE and waiting.last
    assert waiting.step(102.4, session=False, answered=True) is Action.GO and waiting.done


def test_an_answer_confirmed_within_recheck_is_not_a_crossing() -> None:
    t = FirstContactTimings(hold=0.5, retry=1.5, check=0.1, recheck=0.4)
    fc = FirstContact(100.0, waiting=False, timings=t)
    assert fc.step(101.5, session=False) is Action.RECREATE
    assert fc.step(103.0, session=False, answered=True) is Action.GO  # the peer just initiated
    assert fc.step(103.2, session=True) is Action.GO and fc.done  # and confirmed: no re-creation


def test_no_answer_after_the_last_recreation_is_not_a_crossing() -> None:
    fc = FirstContact(100.0, waiting=False, timings=FirstContactTimings(retry=1.5, check=0.1))
    assert fc.step(101.5, session=False) is Action.RECREATE
    assert fc.step(103.0, session=False, answered=False) is Action.GO and fc.done


def test_the_initiator_with_a_session_is_done() -> None:
    fc = FirstContact(100.0, waiting=False)
    assert fc.step(100.2, session=True) is Action.GO
    assert fc.done and fc.due() is None


def test_after_the_holds_end_an_answered_initiation_defers_the_recheck() -> None:
    """The re-created peer answered the peer's initiation (rx grew, no session): the peer completes
    that handshake with our response and sends with its keys. Re-creating now would drop them (a
    one-way session for 15 s, seen in 50-node cold starts), so the recheck waits for the session."""
    t = FirstContactTimings(hold=0.25, retry=1.5, check=0.1, recheck=0.5)
    fc = FirstContact(100.0, waiting=True, timings=t)
    assert fc.step(100.25, session=False) is Action.RECREATE
    assert fc.step(100.6, session=False, answered=True) is Action.GO
    assert fc.step(100.75, session=False, answered=True) is Action.GO, "not re-created at the plain recheck"
    assert fc.due() == pytest.approx(100.85)
    assert fc.step(100.8, session=True, heard=True) is Action.GO, "the peer's confirmation came"
    assert fc.done


def test_a_held_answer_from_before_the_re_creation_does_not_count_after_it() -> None:
    t = FirstContactTimings(hold=0.25, retry=1.5, check=0.1, recheck=0.5)
    fc = FirstContact(100.0, waiting=True, timings=t)
    assert fc.step(100.1, session=False, answered=True) is Action.HOLD
    assert fc.step(100.6, session=False) is Action.RECREATE
    assert fc.answered is None, "the re-created peer's counters start over"
    assert fc.step(101.1, session=False) is Action.RECREATE, "recheck after the re-creation"


def test_a_session_is_confirmed_by_a_probes_answer() -> None:
    fc = FirstContact(100.0, waiting=False, timings=FirstContactTimings(check=0.1, confirm=1.0))
    assert fc.step(100.3, session=True, heard=False) is Action.PROBE, "a probe through the new session"
    assert not fc.done and fc.due() == pytest.approx(100.4)
    assert fc.step(100.4, session=True, heard=False) is Action.GO
    assert fc.step(100.8, session=True, heard=False) is Action.PROBE, "again confirm/2 later"
    assert fc.step(100.9, session=True, heard=True) is Action.GO
    assert fc.done and fc.due() is None


def test_a_session_without_an_answer_is_recreated_once() -> None:
    """Our initiation made the session, but the peer sends with keys we dropped: nothing comes back."""
    fc = FirstContact(100.0, waiting=False, timings=FirstContactTimings(retry=1.5, check=0.1, confirm=1.0))
    assert fc.step(100.2, session=True, heard=False) is Action.PROBE
    assert fc.due() == pytest.approx(100.3)
    assert fc.step(100.7, session=True, heard=False) is Action.PROBE
    assert fc.step(101.1, session=True, heard=False) is Action.GO
    assert fc.step(101.2, session=True, heard=False) is Action.RECREATE, "confirm (1 s) without an answer"
    assert fc.last and fc.reconfirmed and not fc.done
    assert fc.why == "no probe answered through the session"
    # the new peer's first session is confirmed again; without an answer then, the contact ends
    assert fc.step(101.3, session=False) is Action.GO
    assert fc.step(101.4, session=True, heard=False) is Action.PROBE
    assert fc.step(102.4, session=True, heard=False) is Action.GO
    assert fc.done, "one re-creation only: a peer that never answers probes costs one"


def test_a_session_of_a_peer_that_cannot_be_probed_is_enough() -> None:
    fc = FirstContact(100.0, waiting=False)
    assert fc.step(100.2, session=True, heard=None) is Action.GO
    assert fc.done


def test_an_unconfirmed_session_of_a_peer_behind_nat_is_not_recreated() -> None:
    fc = FirstContact(100.0, waiting=True, recreate=False, timings=FirstContactTimings(confirm=1.0))
    assert fc.step(100.1, session=True, heard=False) is Action.PROBE
    assert fc.step(101.1, session=True, heard=False) is Action.GO
    assert fc.done


def test_an_answer_before_the_session_was_seen_needs_another_probe() -> None:
    """``heard`` without a session is not kept: a session seen later is probed through."""
    fc = FirstContact(100.0, waiting=False)
    assert fc.step(100.1, session=False, heard=True) is Action.GO
    assert fc.step(100.2, session=True, heard=False) is Action.PROBE


def test_timings_are_checked() -> None:
    with pytest.raises(ValueError, match="hold"):
        FirstContactTimings(hold=2.0, retry=1.0)
    with pytest.raises(ValueError, match="check"):
        FirstContactTimings(check=0)
    with pytest.raises(ValueError, match="recheck"):
        FirstContactTimings(recheck=0)
    with pytest.raises(ValueError, match="recheck"):
        FirstContactTimings(retry=1.0, recheck=1.5)
    with pytest.raises(ValueError, match="confirm"):
        FirstContactTimings(confirm=0)
