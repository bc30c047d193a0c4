"""Who sends a new pair's first WireGuard initiation, and when to send it again.

When two nodes learn of each other at once, both initiate. WireGuard keeps one handshake per peer,
so each side's initiation replaces the state its own was waiting on: both responses are dropped and
the pair waits for WireGuard's 5 s retry (REKEY_TIMEOUT). So one side holds back: the side that can
be reached (public or unknown) lets the side behind NAT go first (its initiation opens its NAT on
the way out); between alike sides, the higher key waits. The waiting side adds the peer without an
endpoint and without persistent keepalive for ``hold`` seconds (it still answers an initiation:
WireGuard learns the endpoint from it). Both sides look for a session at once when the peer's probe
arrives through it (the engine hears echo requests from joining peers' mesh addresses; the initiator
probes with the add, and the probe leaves with the first session), and every ``check`` seconds until
there is one (also where that probe was lost: a new node probes before its link is up): the hold
ends then, and the state is up without waiting for the next poll. Without a session
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

Under load the timers do not keep the two sides apart: in 50-node cold starts a pair's last
re-creations still crossed (wireguard-go's debug logs: each side answered the other's initiation,
neither received an answer to its own; the pair came up at WireGuard's 5 s retry). Then each side has
answered the other (its rx bytes grew) without a session ``retry`` after its last re-creation and
still none ``recheck`` after it first saw that answer (a peer that just initiated has confirmed by
then: a cold start's late learner does, and re-creating would drop that session): the designated
initiator (the side that did not wait) re-creates once more, alone; the waiting side does not.

The same holds after the hold's end: a re-created peer that has answered the peer's initiation (its
rx bytes grew, no session) is not re-created again before ``recheck`` after the answer. Re-creating
it would drop the keys of the answered handshake while the peer completes it with our response and
goes on sending with them: seen in 50-node cold starts, where the peer then took the keys of its own
initiation as current and ours only as previous, and our side heard nothing for 15 s (until
WireGuard's "stopped hearing back" retry) while both reported the pair up.

One-way sessions: a session we made as initiator proves only that our initiation reached the peer;
the peer may still send with keys of an earlier handshake that a re-creation dropped on our side (a
race of one pass under load). So a session ends the first contact only once a probe through it is
answered (the reply comes with the keys the peer sends with): the step asks for a probe when it
first sees the session, and again ``confirm``/2 later; no answer within ``confirm``, and the peer is
re-created once (its new initiation makes the peer take the new keys). A peer that cannot be probed
(no mesh address, no raw socket: ``heard`` None) is done at its session, as before; one that never
answers probes costs one re-creation.

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
    # until a session, look for it this often besides at the peer's probe: a full pass each (the
    # device read, every peer planned); 0.1 s cost each of a 50-node join's 49 peers' agents ten a
    # second on saturated cores (docs/benchmarks.md, "Join a mesh of 50")
    check: float = 0.3
    # the waiting side's hold ended in a re-creation and no session this long after: re-create once
    # more (the initiations crossed). After a hold-end re-creation that did not cross, the session
    # came within 0.24 s in 4 traced 20-node cold starts (543 pairs, 2 cores)
    recheck: float = 0.5
    # a session must carry a probe's answer within this long, else the peer is re-created once
    confirm: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.hold < self.retry:
            raise ValueError(f"need 0 <= hold < retry, not hold={self.hold} and retry={self.retry}")
        if not self.check > 0:
            raise ValueError(f"check: {self.check} must be > 0")
        if not 0 < self.recheck <= self.retry:
            raise ValueError(f"need 0 < recheck <= retry, not recheck={self.recheck} and retry={self.retry}")
        if not self.confirm > 0:
            raise ValueError(f"confirm: {self.confirm} must be > 0")


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
    PROBE = "probe"  # as GO, and probe the peer: its answer confirms the session


class FirstContact:
    """One new peer's first contact, from when it was added (``since``) until a session that carried
    a probe's answer, or until its re-creations are spent."""

    __slots__ = (
        "answered",
        "checked",
        "confirming",
        "crossed",
        "done",
        "held",
        "initiator",
        "last",
        "probed",
        "reconfirmed",
        "recreate",
        "since",
        "t",
        "waiting",
        "why",
    )

    def __init__(
        self, since: float, waiting: bool, timings: FirstContactTimings | None = None, recreate: bool = True
    ) -> None:
        self.since = since
        self.waiting = waiting
        self.t = timings or FirstContactTimings()
        self.recreate = recreate  # False: the hold ends in GO (the peer is behind NAT)
        self.initiator = not waiting  # the pair's designated initiator (``waits``), whatever comes after
        self.crossed = False  # the re-creation for crossed last initiations is spent
        self.done = False
        self.held = False  # our hold ended in a re-creation: the next one comes ``recheck`` after it
        self.last = False  # the last re-creation is made: no session ``retry`` after it ends the contact
        self.answered: float | None = None  # when, holding, we first saw the peer's initiation answered
        self.confirming: float | None = None  # when a session was first seen without a probe's answer
        self.probed = since  # the last probe this contact asked for
        self.reconfirmed = False  # the re-creation for an unconfirmed session is spent
        self.checked = since  # the last step's time
        self.why = ""  # why the last re-creation (for the log)

    def due(self) -> float | None:
        """When the next step is due (None: nothing more): the next look for the peer's session,
        or the hold's end, a re-creation or a confirmation's deadline when sooner."""
        if self.done:
            return None
        if self.confirming is not None:
            return min(self.confirming + self.t.confirm, self.checked + self.t.check)
        return min(self.since + self._wait(), self.checked + self.t.check)

    def _wait(self) -> float:
        if self.waiting or self.held:
            base = self.t.hold if self.waiting else self.t.recheck
            if self.answered is None:
                return base
            return max(base, self.answered + self.t.recheck - self.since)
        if self.answered is not None and self._may_cross():
            return max(self.t.retry, self.answered + self.t.recheck - self.since)
        return self.t.retry

    def _may_cross(self) -> bool:
        """Whether a crossing of the last initiations would be broken by one more re-creation here."""
        return self.last and self.initiator and self.recreate and not self.crossed

    def step(self, now: float, session: bool, answered: bool = False, heard: bool | None = None) -> Action:
        """What to do with the peer in this pass; ``session``: WireGuard has a live session with it
        (observed in this pass); ``answered``: no session yet, but the peer's initiation reached us
        and WireGuard answered it (wireguard-go counts a received initiation in the peer's rx bytes;
        a held peer receives nothing else): its confirmation is on the way, so the hold (or the wait
        after its end) goes on up to ``recheck`` after that rather than ending in our own
        initiation, which would cross it; ``heard``: a probe to the peer was answered since the last
        step (None: the peer cannot be probed, a session is enough)."""
        self.checked = max(self.checked, now)
        if self.done:
            return Action.GO
        if session:
            return self._confirm(now, heard)
        self.confirming = None
        if answered and (self.waiting or self.held or self._may_cross()) and self.answered is None:
            self.answered = now
        if now < self.since + self._wait():
            return Action.HOLD if self.waiting else Action.GO
        if self.last:
            if answered and self._may_cross():
                # we answered the peer's initiation ``recheck`` ago and still have no session (its
                # confirmation would have come): our last initiation and the peer's crossed, each
                # side dropped the answer to its own; the designated initiator alone tries once
                # more (the waiting side's re-creations are spent), before WireGuard's own retry,
                # REKEY_TIMEOUT (5 s) after them
                self.crossed = True
                self._restart(now, held=False, why="our initiation and the peer's crossed", last=True)
                return Action.RECREATE
            self.done = True  # no session after the last re-creation: the endpoint machine goes on
            return Action.GO
        # the hold ended without the peer's initiation (ours, at once, from a peer WireGuard has not
        # tried to initiate to: see the module docstring), or the initiator's retry: once
        if self.waiting and self.recreate:
            # from now on as an initiator: our initiation may cross the peer's first one (it learned
            # of us about a hold later) and both would wait REKEY_TIMEOUT; without a session
            # ``recheck`` after this re-creation, one more re-creation breaks the tie (before the
            # peer's own retry, ``retry`` after its add)
            self._restart(now, held=True, why="the hold ended without the peer's initiation")
            return Action.RECREATE
        if self.waiting:
            self.done = True
            return Action.GO
        self._restart(now, held=False, why="no session", last=True)
        return Action.RECREATE

    def _confirm(self, now: float, heard: bool | None) -> Action:
        if heard is None or heard:
            self.done = True
            return Action.GO
        if self.confirming is None:
            self.confirming = self.probed = now
            return Action.PROBE
        if now < self.confirming + self.t.confirm:
            if now >= self.probed + self.t.confirm / 2:
                self.probed = now
                return Action.PROBE
            return Action.GO
        # no answer through the session: the peer may send with keys a re-creation dropped here
        if self.reconfirmed or not self.recreate:
            self.done = True
            return Action.GO
        self.reconfirmed = True
        self._restart(now, held=False, why="no probe answered through the session", last=True)
        return Action.RECREATE

    def _restart(self, now: float, *, held: bool, why: str, last: bool = False) -> None:
        """A re-creation: a new WireGuard peer (new counters, no handshake) from ``now``; ``last``:
        no other re-creation follows it."""
        self.why = why
        if last:
            self.last = True
        self.waiting = False
        self.held = held
        self.since = now
        self.answered = None
        self.confirming = None
