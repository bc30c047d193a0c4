"""Who sends a new pair's first WireGuard initiation, and when to send it again.

When two nodes learn of each other at once, both initiate. WireGuard keeps one handshake per peer,
so each side's initiation replaces the state its own was waiting on: both responses are dropped and
the pair waits for WireGuard's 5 s retry (REKEY_TIMEOUT). So one side holds back: the side that can
be reached (public or unknown) lets the side behind NAT go first (its initiation opens its NAT on
the way out); between alike sides, the higher key waits. The waiting side adds the peer without an
endpoint and without persistent keepalive for ``hold`` seconds (it still answers an initiation:
WireGuard learns the endpoint from it). Both sides look for a session every ``check`` seconds until
there is one: the hold ends then, and the state is up without waiting for the next poll (also where
the probe sent with the add was lost: a new node probes before its link is up). Without a session
at the hold's end, the waiting side re-creates the peer with endpoint and keepalive, which
initiates at once (not a peer behind NAT: see the end). Re-created, not just given an endpoint: a
packet routed to the held peer (any traffic to its addresses) makes WireGuard attempt an initiation
that cannot leave without an endpoint, and WireGuard counts that attempt: the next one would wait
REKEY_TIMEOUT (5 s), whatever is configured meanwhile (seen in bench/mesh_join.py's wireguard-go
debug logs: "Failed to send handshake initiation: no known endpoint for peer", then nothing for 5 s).
The initiating side re-creates a peer that has no session ``retry`` seconds after it was added, once:
its first initiation may have reached a node that did not know us yet (normally the waiting side's
own initiation at the hold's end has made a session by then). The waiting side, once its hold has
ended in a re-creation, does the same, sooner: when the peer learned of us about a hold later, the two
first initiations cross and each side drops the other's response (seen in a 20-node cold start: the
pair waited WireGuard's REKEY_TIMEOUT, 5 s, since the peer had a session and never retried; with a
second re-creation ``retry`` later, 1.5 s); one more re-creation ``recheck`` (0.5 s) later initiates
alone, before the peer's own retry. So the first handshake does not depend
on which side learned of the other first: whichever initiation reaches a side that has the peer
configured makes it, within about ``hold`` of the later side's add.

A hold whose peer's initiation has arrived and been answered (its rx bytes grew, no session yet:
the initiator's confirming packet is on the way) does not end in our own initiation, which would
cross it; it goes on up to ``recheck`` after the answer was seen (in a 50-node join the peers'
initiations reached the new node about when its holds ended: nat-traversal.md).

A session the peer completed between the pass's device read and the re-creating write is lost (a
window of one pass); the re-created peer's own initiation replaces it at once when the peer can be
reached. A peer behind NAT may not be (a symmetric NAT answers only where its side sent): waiting for
one, the hold ends by setting endpoint and keepalive without re-creating (``recreate`` False; an
earlier run that re-created there lost such a race once and relayed after 30 s); the peer, the
initiating side, re-creates after ``retry`` if its first initiation was lost.

Pure: the engine gives times and what it observed, and does what the step says.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kubespan.wireguard.types import PublicKey

NATTED = frozenset({"eim", "edm"})


@dataclass(frozen=True, slots=True)
class FirstContactTimings:
    hold: float = 0.25  # the waiting side's wait for the peer's initiation (was 0.5: nat-traversal.md)
    retry: float = 1.5  # no session this long after the add: re-create the peer (once)
    check: float = 0.1  # until a session, look for it this often (a full pass each: the state is up then)
    # the waiting side's hold ended in a re-creation and no session this long after: re-create once
    # more (the initiations crossed). After a hold-end re-creation that did not cross, the session
    # came within 0.24 s in 4 traced 20-node cold starts (543 pairs, 2 cores)
    recheck: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.hold < self.retry:
            raise ValueError(f"need 0 <= hold < retry, not hold={self.hold} and retry={self.retry}")
        if not self.check > 0:
            raise ValueError(f"check: {self.check} must be > 0")
        if not 0 < self.recheck <= self.retry:
            raise ValueError(f"need 0 < recheck <= retry, not recheck={self.recheck} and retry={self.retry}")


def waits(own: PublicKey, own_class: str, peer: PublicKey, peer_class: str) -> bool:
    """Whether this side lets ``peer`` initiate first (see the module docstring)."""
    mine, theirs = own_class in NATTED, peer_class in NATTED
    if mine != theirs:
        return theirs  # the reachable side waits for the one behind NAT
    return own.raw > peer.raw


class Action(enum.Enum):
    HOLD = "hold"  # configure no endpoint, no keepalive, no probes: the peer initiates
    GO = "go"  # the endpoint machine decides, as for any peer
    RECREATE = "recreate"  # re-create the peer (a new initiation at once), then as GO


class FirstContact:
    """One new peer's first contact, from when it was added (``since``) until it has a session or
    its one re-creation is done."""

    __slots__ = ("answered", "checked", "done", "held", "recreate", "since", "t", "waiting")

    def __init__(
        self, since: float, waiting: bool, timings: FirstContactTimings | None = None, recreate: bool = True
    ) -> None:
        self.since = since
        self.waiting = waiting
        self.t = timings or FirstContactTimings()
        self.recreate = recreate  # False: the hold ends in GO (the peer is behind NAT)
        self.done = False
        self.held = False  # our hold ended in a re-creation: the next one comes ``recheck`` after it
        self.answered: float | None = None  # when, holding, we first saw the peer's initiation answered
        self.checked = since  # the last step's time

    def due(self) -> float | None:
        """When the next step is due (None: nothing more): the next look for the peer's session,
        or the hold's end or the initiator's re-creation when sooner."""
        if self.done:
            return None
        return min(self.since + self._wait(), self.checked + self.t.check)

    def _wait(self) -> float:
        if self.waiting:
            if self.answered is None:
                return self.t.hold
            return max(self.t.hold, self.answered + self.t.recheck - self.since)
        return self.t.recheck if self.held else self.t.retry

    def step(self, now: float, session: bool, answered: bool = False) -> Action:
        """What to do with the peer in this pass; ``session``: WireGuard has a live session with it
        (observed in this pass); ``answered``: no session yet, but the peer's initiation reached us
        and WireGuard answered it (wireguard-go counts a received initiation in the peer's rx bytes;
        a held peer receives nothing else): its confirmation is on the way, so the hold goes on up
        to ``recheck`` after that rather than ending in our own initiation, which would cross it."""
        self.checked = max(self.checked, now)
        if self.done:
            return Action.GO
        if session:
            self.done = True
            return Action.GO
        if answered and self.waiting and self.answered is None:
            self.answered = now
        if now < self.since + self._wait():
            return Action.HOLD if self.waiting else Action.GO
        # the hold ended without the peer's initiation (ours, at once, from a peer WireGuard has not
        # tried to initiate to: see the module docstring), or the initiator's retry: once
        if self.waiting and self.recreate:
            # from now on as an initiator: our initiation may cross the peer's first one (it learned
            # of us about a hold later) and both would wait REKEY_TIMEOUT; without a session
            # ``recheck`` after this re-creation, one more re-creation breaks the tie (before the
            # peer's own retry, ``retry`` after its add)
            self.waiting = False
            self.held = True
            self.since = now
            return Action.RECREATE
        self.done = True
        return Action.RECREATE if self.recreate or not self.waiting else Action.GO
