"""Who sends a new pair's first WireGuard initiation, and when to send it again.

When two nodes learn of each other at once, both initiate. WireGuard keeps one handshake per peer,
so each side's initiation replaces the state its own was waiting on: both responses are dropped and
the pair waits for WireGuard's 5 s retry (REKEY_TIMEOUT). So one side holds back: the side that can
be reached (public or unknown) lets the side behind NAT go first (its initiation opens its NAT on
the way out); between alike sides, the higher key waits. The waiting side adds the peer without an
endpoint and without persistent keepalive for ``hold`` seconds (it still answers an initiation:
WireGuard learns the endpoint from it), so its WireGuard attempts nothing; then it sets both, which
makes WireGuard initiate at once. The initiating side re-creates a peer that has no session ``retry``
seconds after it was added, once: its first initiation may have reached a node that did not know us
yet, and WireGuard would wait 5 s before sending another (a re-created peer initiates at once). The
waiting side never re-creates: a session the peer completed just before the write would be lost,
and the waiting side may be unable to reach the peer (behind a symmetric NAT) to make a new one.

Pure: the engine gives times and what it observed, and does what the step says.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kubespan.wireguard.types import PublicKey

NATTED = frozenset({"eim", "edm"})


@dataclass(frozen=True, slots=True)
class FirstContactTimings:
    hold: float = 0.5  # the waiting side's wait for the peer's initiation
    retry: float = 1.5  # no session this long after the add: re-create the peer (once)

    def __post_init__(self) -> None:
        if not 0 <= self.hold < self.retry:
            raise ValueError(f"need 0 <= hold < retry, not hold={self.hold} and retry={self.retry}")


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

    __slots__ = ("done", "since", "t", "waiting")

    def __init__(self, since: float, waiting: bool, timings: FirstContactTimings | None = None) -> None:
        self.since = since
        self.waiting = waiting
        self.t = timings or FirstContactTimings()
        self.done = False

    def due(self) -> float | None:
        """When the next step has something to do (None: nothing more)."""
        if self.done:
            return None
        return self.since + (self.t.hold if self.waiting else self.t.retry)

    def step(self, now: float, session: bool) -> Action:
        """What to do with the peer in this pass; ``session``: WireGuard has a live session with it
        (observed in this pass)."""
        if self.done:
            return Action.GO
        if session:
            self.done = True
            return Action.GO
        if self.waiting and now < self.since + self.t.hold:
            return Action.HOLD
        if self.waiting:
            self.done = True  # the hold ended without the peer's initiation: ours, at once
            return Action.GO
        if now < self.since + self.t.retry:
            return Action.GO
        self.done = True
        return Action.RECREATE
