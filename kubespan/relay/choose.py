"""Which relay carries a peer's traffic: a pure decision from the nodes that announce ``relay`` in their
encrypted affiliate data, the RTTs measured to them, and how the current relay is doing (issue 14;
docs/design/relay.md, "Choosing a relay").

Rules:

- Candidates: relays other than the pair's own two nodes, lowest RTT first, unmeasured ones after all
  measured ones, ties broken by public key (so both sides and every run order them alike). Relays the
  caller ``avoid``\\ s (failed recently) come last.
- Who chooses: the side with the lower public key (:func:`chooses`) picks the relay and requests the
  allocation; the other side follows the relay's NOTIFY. If no NOTIFY has come after ``follow_grace``
  seconds, the follower chooses and requests itself (the relay's pair allocation is idempotent; when both
  sides requested, the chooser's NOTIFY wins: a follower always takes the latest NOTIFY).
- Stability: a working relay is kept even when a faster one appears.
- Failover: the chooser abandons the current relay when it has shown no handshake progress for
  ``failover_after`` seconds (the caller measures; an argument) or no longer announces ``relay``, and
  takes the best other one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from kubespan.wireguard.types import PublicKey

Action = Literal["request", "keep", "switch", "follow", "wait", "none"]


@dataclass(frozen=True)
class RelayOption:
    """A node that announces ``relay``: its key, a name for status, and the measured RTT in seconds
    (None: not measured, or the last measurement failed)."""

    key: PublicKey
    name: str
    rtt: float | None = None

    def describe(self) -> str:
        rtt = "rtt not measured" if self.rtt is None else f"rtt {self.rtt * 1000:.1f} ms"
        return f"relay via {self.name} ({rtt})"


@dataclass(frozen=True)
class Decision:
    """What to do for one peer.

    ``action``: ``request`` (allocate on ``relay`` and tell the peer through it), ``keep`` (the current
    relay stays), ``switch`` (``failed`` is abandoned; request on ``relay``), ``follow`` (use the relay
    the peer's NOTIFY named), ``wait`` (the peer chooses; no NOTIFY yet), ``none`` (no relay to use).
    ``reason`` is for status, e.g. ``relay via node-r (rtt 3.1 ms)``."""

    action: Action
    relay: RelayOption | None
    reason: str
    failed: PublicKey | None = None

    @property
    def requests(self) -> bool:
        """This side must request the allocation on ``relay``."""
        return self.action in ("request", "switch")


def chooses(me: PublicKey, peer: PublicKey) -> bool:
    """Whether this side chooses the pair's relay: the side with the lower public key does."""
    return me.raw < peer.raw


def rank(
    options: Iterable[RelayOption], me: PublicKey, peer: PublicKey, avoid: Collection[PublicKey] = ()
) -> list[RelayOption]:
    """Eligible relays, best first: not ``me`` nor ``peer``; ``avoid`` last; then lowest RTT, unmeasured
    after measured, ties by key. A key listed twice counts once (its first entry)."""
    seen: dict[PublicKey, RelayOption] = {}
    for o in options:
        if o.key not in (me, peer) and o.key not in seen:
            seen[o.key] = o
    return sorted(
        seen.values(),
        key=lambda o: (o.key in avoid, o.rtt is None, o.rtt if o.rtt is not None else 0.0, o.key.raw),
    )


def choose(
    me: PublicKey,
    peer: PublicKey,
    options: Iterable[RelayOption],
    *,
    failover_after: float,
    current: PublicKey | None = None,
    stalled_for: float = 0.0,
    avoid: Collection[PublicKey] = (),
    notified: PublicKey | None = None,
    waited: float = 0.0,
    follow_grace: float = 5.0,
) -> Decision:
    """The relay decision for the pair (``me``, ``peer``).

    ``current``: the relay in use (None: none yet); ``stalled_for``: seconds it has shown no handshake
    progress; ``failover_after``: the stall that counts as failed; ``avoid``: relays that failed
    recently; ``notified``: the relay the peer's latest NOTIFY named; ``waited``: seconds this side has
    needed a relay without getting a NOTIFY; ``follow_grace``: how long a follower waits before it
    chooses itself."""
    if failover_after <= 0 or follow_grace < 0:
        raise ValueError(
            f"failover_after must be positive and follow_grace not negative, not {failover_after} and {follow_grace}"
        )
    ranked = rank(options, me, peer, avoid)
    by_key = {o.key: o for o in ranked}

    if not chooses(me, peer):
        if notified is not None and notified in by_key:
            o = by_key[notified]
            return Decision("follow", o, f"{o.describe()}, chosen by the peer")
        if current is None and waited < follow_grace:
            return Decision("wait", None, f"waiting for the peer to choose a relay ({waited:.0f} s)")
        # the chooser is silent: choose as it would (below)

    failed: PublicKey | None = None
    prefix = ""
    if current is not None:
        cur = by_key.get(current)
        if cur is not None and stalled_for < failover_after:
            return Decision("keep", cur, cur.describe())
        failed = current
        name = cur.name if cur is not None else current.b64[:8]
        why = "no longer relays" if cur is None else f"failed (no handshake progress for {stalled_for:.0f} s)"
        prefix = f"relay {name} {why}; "
    rest = [o for o in ranked if o.key != failed]
    if not rest:
        return Decision("none", None, f"{prefix}no relay available", failed)
    best = rest[0]
    return Decision("switch" if failed is not None else "request", best, prefix + best.describe(), failed)
