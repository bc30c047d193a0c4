"""Coordinated hole punching: when to punch towards which peer, and when to give up for a relay (pure).

Intent travels only inside encrypted affiliates (:class:`kubespan.affiliate.PunchIntent`): "I punch
towards you at T, trying these candidates". Both sides then send low-TTL openers from their WireGuard
port at T and handshake; see docs/design/nat-traversal.md. The caller supplies both clocks (monotonic
seconds for retries, wall milliseconds for the start time both sides share) and every duration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kubespan.affiliate import CANDIDATES_HASH_LEN, PunchIntent
from kubespan.wireguard.types import AddrPort, PublicKey


@dataclass(frozen=True, slots=True)
class PunchTimings:
    """Durations of one punch and of the retries after a failed one (nat.md §5).

    ``lead``: the start is the publish time plus this. The side that published first sends its
    openers at the start only if the peer's intent, naming the same start, has come back by then: one
    round trip through the registry (our publish, the peer's watch and pass, its publish, our watch and
    pass). In the netns lab (``bench/nat_traversal.py``: eight agents starting at once on two cores)
    the first side's openers left at most 0.57 s after a 1 s lead (p95 under 0.2 s, 300 punches): a
    round trip of up to 1.6 s under that load, rarely beyond the 0.5 s below. The peer, which committed first, probes ``opener.PROBE_DELAY``
    (0.5 s) after the start, so a first side up to 0.5 s late still has its openers out before the
    peer's full-TTL probes arrive (nat.md §0). A later side only costs a failed punch on a bare NAT:
    the relay carries the pair (pairs with a symmetric side are relayed from the start), a retry
    follows. The lead is what a punched pair pays on top of the probes' round trip.
    """

    lead: float = 1.0  # start = publish time + lead: the intent's round trip through the registry
    window: float = 10.0  # no handshake this long after the start: relay
    retry_initial: float = 60.0  # then retry direct with backoff …
    retry_max: float = 600.0  # … doubling up to 10 min

    def __post_init__(self) -> None:
        for name in ("lead", "window", "retry_initial", "retry_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be greater than 0")
        if self.retry_max < self.retry_initial:
            raise ValueError(f"retry_max: {self.retry_max} is below retry_initial {self.retry_initial}")

    def backoff(self, failures: int) -> float:
        """Delay before the next attempt after ``failures`` failed ones (≥ 1)."""
        return min(self.retry_initial * 2 ** max(failures - 1, 0), self.retry_max)


def candidates_hash(candidates: Iterable[AddrPort]) -> bytes:
    """8 bytes naming a candidate set independent of its order (both sides compute it the same)."""
    text = "\n".join(sorted({str(c) for c in candidates}))
    return hashlib.sha256(text.encode()).digest()[:CANDIDATES_HASH_LEN]


def why_not_direct(local_class: str, remote_class: str) -> str | None:
    """Why a direct path cannot work between these NAT classes, or None when it may (nat.md §2).

    Only mappings are known from STUN; endpoint-dependent mapping on both sides is the one case that
    never punches. EDM against EIM depends on the EIM side's filtering, so it is tried.
    """
    if local_class == "edm" and remote_class == "edm":
        return "both behind symmetric NAT"
    return None


def why_relay_meanwhile(local_class: str, remote_class: str) -> str | None:
    """Why a pair is relayed while its punch runs, or None when the punch alone decides.

    One side behind endpoint-dependent mapping and the other behind NAT (or not known): a direct path
    needs the other side's filtering to be open (a port forward, nat.md §2), which the classes do not
    tell. Most such pairs end relayed, so the relay carries them from the first pass instead of after
    the punch window; a probe that answers still moves the pair to direct.
    """
    classes = {local_class, remote_class}
    if "edm" in classes and "public" not in classes and classes != {"edm"}:
        return "symmetric NAT on one side: relayed while a punch is tried"
    return None


@dataclass(frozen=True, slots=True)
class PeerView:
    """What the planner needs to know about one peer in this pass."""

    key: PublicKey
    nat_class: str
    candidates: tuple[AddrPort, ...]
    direct_up: bool  # a handshake completed over a direct endpoint recently
    intent_for_us: PunchIntent | None = None  # the peer's published intent naming our key
    answered_start: int | None = None  # start (ms) of our punch a probe answered: direct is coming


@dataclass(frozen=True, slots=True)
class Opener:
    """Send openers to ``candidates`` at ``start_ms`` (wall clock), then handshake."""

    key: PublicKey
    candidates: tuple[AddrPort, ...]
    start_ms: int


@dataclass(frozen=True, slots=True)
class PunchPlan:
    intents: tuple[PunchIntent, ...] = ()  # to publish in our affiliate
    openers: tuple[Opener, ...] = ()  # punches whose start is not over yet
    relay: dict[PublicKey, str] = field(default_factory=dict)  # peers to relay, and why not direct


@dataclass(slots=True)
class _PeerPunch:
    failures: int = 0
    next_try: float = 0.0  # monotonic
    start_ms: int | None = None  # the punch under way


class PunchPlanner:
    """Keeps per-peer attempt counters; :meth:`plan` is called once per engine pass."""

    def __init__(self, timings: PunchTimings | None = None, max_intents: int = 16) -> None:
        self.timings = timings or PunchTimings()
        self.max_intents = max_intents
        self._peers: dict[PublicKey, _PeerPunch] = {}

    def plan(self, *, now: float, now_ms: int, local_class: str, peers: Sequence[PeerView]) -> PunchPlan:
        t = self.timings
        window_ms, lead_ms = int(t.window * 1000), int(t.lead * 1000)
        seen = {p.key for p in peers}
        for gone in [k for k in self._peers if k not in seen]:
            del self._peers[gone]
        intents: list[PunchIntent] = []
        openers: list[Opener] = []
        relay: dict[PublicKey, str] = {}
        for peer in sorted(peers, key=lambda p: p.key):
            st = self._peers.setdefault(peer.key, _PeerPunch())
            if peer.direct_up:
                st.failures, st.next_try, st.start_ms = 0, 0.0, None
                continue
            reason = why_not_direct(local_class, peer.nat_class)
            if reason is not None:
                relay[peer.key] = reason
                continue
            theirs = peer.intent_for_us
            if theirs is not None and now_ms < theirs.start_ms + window_ms:
                # Join (or align with) the peer's punch: both sides use the earlier start.
                if st.start_ms is None or theirs.start_ms < st.start_ms:
                    st.start_ms = theirs.start_ms
            if st.start_ms is not None and now_ms >= st.start_ms + window_ms:
                st.failures += 1
                st.next_try = now + t.backoff(st.failures)
                st.start_ms = None
            if st.start_ms is None and now >= st.next_try and peer.candidates:
                st.start_ms = now_ms + lead_ms
            meanwhile = why_relay_meanwhile(local_class, peer.nat_class)
            if st.start_ms is None:
                if st.failures:
                    relay[peer.key] = f"no direct answer within {t.window:g} s ({st.failures} tries)"
                elif meanwhile is not None:
                    relay[peer.key] = meanwhile  # nothing to punch towards (no candidates) yet
                continue
            if peer.answered_start is not None and peer.answered_start == st.start_ms:
                pass  # a probe answered: the handshake on the punched endpoint follows, no relay
            elif st.failures:
                relay[peer.key] = (
                    f"retrying direct ({st.failures} failed)"  # the relay carries traffic meanwhile
                )
            elif meanwhile is not None:
                relay[peer.key] = meanwhile
            if len(intents) < self.max_intents:
                intents.append(PunchIntent(peer.key, candidates_hash(peer.candidates), st.start_ms))
            openers.append(Opener(peer.key, peer.candidates, st.start_ms))
        return PunchPlan(tuple(intents), tuple(openers), relay)
