"""NAT traversal in the mesh engine: hole punching and the relay, per peer (issue 14).

Once per full pass the engine gives :meth:`Traversal.step` what it knows of each peer (a
:class:`PeerFacts`); the step runs the pure :class:`~kubespan.nat.punch.PunchPlanner` and the pure relay
choice (:func:`kubespan.relay.choose.choose`), starts the background work they call for (a punch at
its agreed start, an allocation, relay pings; never awaited by a pass) and returns the punch intents
to publish. What that work found comes back through :meth:`Traversal.route`: the endpoint the engine
must give the peer's :class:`~kubespan.endpoints.EndpointMachine` (first candidate, or the only one
for a relayed or punch-gated peer). Each finished task wakes the engine.

A peer is *gated* when both sides are behind NAT (classes eim/edm): its machine gets no candidates
of its own, since its WireGuard initiations to the peer's public endpoint before the openers would
pollute a bare NAT (nat.md §0); it is configured only with what a punch or the relay found. Every
other peer keeps today's behaviour, with a punched endpoint (if any) put first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kubespan.affiliate import PunchIntent
from kubespan.endpoints import is_lan
from kubespan.nat.punch import PeerView, PunchPlanner, PunchTimings
from kubespan.ports import PunchPort, RelayClientPort, RelayServerPort
from kubespan.relay.choose import RelayOption, choose, chooses
from kubespan.relay.control import CLIENT_PORT, Notice
from kubespan.wireguard.types import AddrPort, PublicKey
from spanutil.logs import log_event

log = logging.getLogger("kubespan.traversal")

NATTED = frozenset({"eim", "edm"})
RELAY_FAILOVER = 5.0  # seconds without rx on a relayed path before the next relay
RELAY_KEEPALIVE = 2  # persistent keepalive of a relayed peer: rx every 2 s shows the path lives
RELAY_AVOID = 60.0  # a relay that failed is tried last for this long
PING_INTERVAL = 15.0
ALLOC_RETRY = (0.5, 4.0)  # after a failed allocation: the first retry's delay, doubling up to the second
EARLY_NOTICES = 64  # NOTIFYs kept for peers not known yet (the relay may know the pair before we do)
EARLY_NOTICE_TTL = 30.0
# After a probe answered, the side that does not choose (relay.choose.chooses) adopts the punched
# endpoint this much later. Both sides' probes usually answer within milliseconds; were both to
# initiate at once, each crossing initiation would replace the other's handshake state (WireGuard keeps
# one per peer), both responses would be dropped and the session would wait for the 5 s retry. By
# then the chooser's handshake has usually made our WireGuard roam to it (the pass sees a session and
# does not re-create the peer); if not (only our probe answered), we initiate ourselves.
ADOPT_DEFER = 0.5


@dataclass(frozen=True, slots=True)
class PeerFacts:
    """What the engine knows of one peer in this pass."""

    key: PublicKey
    name: str
    mesh_address: ipaddress.IPv6Address | None
    nat_class: str
    relays: bool  # announces relay in its affiliate
    candidates: tuple[AddrPort, ...]  # its published endpoints
    intents: tuple[PunchIntent, ...]  # its published punch intents (all of them)
    up: bool  # its endpoint machine says up
    endpoint: AddrPort | None  # what WireGuard uses for it
    rx_bytes: int = 0
    last_handshake: float | None = None  # unix time
    known_at: float | None = None  # unix time the engine first had the peer's record (None: now)


@dataclass(frozen=True, slots=True)
class Route:
    """What the engine gives a peer's machine: ``first`` before its own candidates (``exclusive``:
    instead of them), and whether to switch to it now (``adopt``, once per new route)."""

    first: AddrPort | None
    exclusive: bool
    keepalive: int | None = None  # None: the mesh's


@dataclass(frozen=True, slots=True)
class PathStatus:
    """What traversal knows of a peer's path for status: the relay endpoint in use (and the relay's
    name), why the peer is not direct, the connect time. The path itself (:meth:`resolve`) is
    classified from the machine's state and endpoint when the status is built, so it never lags them."""

    relay_endpoint: AddrPort | None = None
    relay_via: str | None = None
    why_not_direct: str | None = None
    connect_time: float | None = None

    def resolve(self, up: bool, endpoint: AddrPort | None) -> tuple[str, str | None, str | None]:
        """``(path, relay_via, why_not_direct)``: the relay only on the relay path, the reason only
        when the path is neither direct nor LAN."""
        path = classify_path(up, endpoint, self.relay_endpoint)
        return (
            path,
            self.relay_via if path == "relay" else None,
            None if path in ("direct", "lan") else self.why_not_direct,
        )


NO_PATH = PathStatus()


@dataclass
class _RelayUse:
    key: PublicKey
    name: str
    mesh: ipaddress.IPv6Address
    endpoint: AddrPort
    since: float
    chosen: bool  # we allocated it (else: a NOTIFY told us)
    applied: bool = False  # WireGuard has used it (seen as the peer's endpoint)


@dataclass
class _Peer:
    appeared: float  # wall time both sides' candidates were known (when we first had the peer's)
    punched: AddrPort | None = None
    adopted: AddrPort | None = None  # the route the machine was last switched to
    relay: _RelayUse | None = None
    notice: Notice | None = None
    need_since: float | None = None
    why: str | None = None
    punch_task: asyncio.Task[None] | None = None
    punch_start: int | None = None
    answered: int | None = None  # start (ms) of the punch a probe answered (the planner stops relaying)
    alloc_task: asyncio.Task[None] | None = None
    alloc_failures: int = 0
    alloc_after: float = 0.0  # (clock) no allocation request before this (backoff after failures)
    avoid: dict[PublicKey, float] = field(default_factory=dict)
    rx: int = -1
    rx_at: float = 0.0
    connect_time: float | None = None
    status: PathStatus = NO_PATH


class Traversal:
    """Per-peer punching and relaying; see the module docstring. Not thread-safe: the engine's loop."""

    def __init__(
        self,
        own: PublicKey,
        *,
        wg_port: int,
        punch: PunchPort | None,
        relay_client: RelayClientPort | None,
        relay_server: RelayServerPort | None,
        wake: Callable[[], None],
        clock: Callable[[], float],
        wall: Callable[[], float],
        timings: PunchTimings | None = None,
        failover_after: float = RELAY_FAILOVER,
    ) -> None:
        self.own, self.wg_port = own, wg_port
        self.punch_port, self.relay_client, self.relay_server = punch, relay_client, relay_server
        self.wake, self.clock, self.wall = wake, clock, wall
        self.planner = PunchPlanner(timings)
        self.failover_after = failover_after
        self.intents: tuple[PunchIntent, ...] = ()
        self.peers: dict[PublicKey, _Peer] = {}
        self.rtt: dict[PublicKey, float | None] = {}
        self.punches = 0
        self.punch_successes = 0
        self.allocations = 0
        self.dirty = False  # background work finished: the next pass must be a full one
        self._started = False
        self._start_error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_ping = 0.0
        self._who: dict[str, PublicKey] = {}
        self._where: dict[PublicKey, tuple[str, int]] = {}
        self._early: dict[PublicKey, tuple[float, Notice]] = {}  # NOTIFYs for peers not known yet
        self.punch_error: str | None = None

    @property
    def active(self) -> bool:
        return self.punch_port is not None or self.relay_client is not None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def ensure_started(self, mesh: ipaddress.IPv6Address, device: str) -> None:
        """Start the responder, the relay client and (relaying) the service, once the mesh address is
        on the link; a failure is reported once and retried by the next pass."""
        if self._started:
            return
        if self.punch_port is not None and self.punch_error is None:
            try:
                await self.punch_port.start(self.wg_port, self.own, lambda k: k in self.peers)
            except Exception as e:  # e.g. no CAP_NET_RAW: no punching, NAT'd pairs are relayed
                self.punch_error = str(e) or type(e).__name__
                log_event(log, "hole punching unavailable", logging.WARNING, error=self.punch_error)
        try:
            if self.relay_client is not None:
                await self.relay_client.start(mesh, device, self._lookup, self._on_notify)
            if self.relay_server is not None:
                await self.relay_server.start(mesh, device, self._lookup, lambda k: self._where.get(k))
        except Exception as e:
            await self._close_ports()
            if str(e) != self._start_error:
                self._start_error = str(e)
                log_event(log, "NAT traversal not started; retrying", logging.WARNING, error=str(e))
            return
        self._started = True
        log_event(log, "NAT traversal started", relay=self.relay_server is not None)

    async def close(self) -> None:
        for t in [*self._tasks]:
            t.cancel()
        for t in [*self._tasks]:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        await self._close_ports()
        self._started = False

    async def _close_ports(self) -> None:
        for port in (self.relay_server, self.relay_client, self.punch_port):
            if port is None:
                continue
            try:
                await (port.close() if isinstance(port, PunchPort) else port.stop())
            except Exception as e:
                log_event(log, "NAT traversal port close failed", logging.WARNING, error=str(e))

    def _lookup(self, addr: str) -> PublicKey | None:
        """The peer whose mesh address ``addr`` is (a relay's ``who``; the tunnel vouches for it)."""
        return self._who.get(str(ipaddress.ip_address(addr)))

    def directory(self, peers: Iterable[tuple[PublicKey, ipaddress.IPv6Address | None]]) -> None:
        """The mesh address of every peer (the relay's ``who`` and ``where``)."""
        self._who = {str(a): k for k, a in peers if a is not None}
        self._where = {k: (a, CLIENT_PORT) for a, k in self._who.items()}

    # -- one pass ----------------------------------------------------------------------------------

    def gated(self, local_class: str, peer_class: str) -> bool:
        """Both behind NAT: only punched or relayed endpoints are configured (see the docstring)."""
        return (
            self.punch_port is not None
            and self.punch_error is None
            and local_class in NATTED
            and peer_class in NATTED
        )

    def route(self, key: PublicKey, gated: bool) -> Route:
        """The endpoint a peer's machine must use first (or only)."""
        st = self.peers.get(key)
        if st is not None and st.relay is not None:
            return Route(st.relay.endpoint, True, RELAY_KEEPALIVE)
        if st is not None and st.punched is not None:
            return Route(st.punched, gated)
        return Route(None, gated)

    def take_adopt(self, key: PublicKey, route: Route) -> tuple[bool, bool]:
        """Whether the machine must switch to ``route.first`` now (once per new route), and whether
        the peer needs a new WireGuard session for it: a relay leg latches only on a handshake, and
        WireGuard with a live session would send only transport data to a new relay (dropped there
        until its own re-handshake, ≥ 15 s later), so moving onto a relay from an earlier route
        re-creates the peer."""
        st = self.peers.get(key)
        if st is None or route.first is None or st.adopted == route.first:
            return False, False
        fresh = st.adopted is not None and st.relay is not None and route.first == st.relay.endpoint
        st.adopted = route.first
        return True, fresh

    def step(self, now: float, local_class: str, facts: Sequence[PeerFacts]) -> tuple[PunchIntent, ...]:
        """Plan this pass's punches and relays and start what they need; the intents to publish."""
        self.dirty = False
        wall = self.wall()
        by_key = {f.key: f for f in facts}
        for gone in [k for k in self.peers if k not in by_key]:
            self._forget(self.peers.pop(gone))
        views: list[PeerView] = []
        for f in facts:
            st = self.peers.get(f.key)
            if st is None:
                st = self.peers[f.key] = _Peer(appeared=f.known_at if f.known_at is not None else wall)
                early = self._early.pop(f.key, None)
                if early is not None and self.clock() - early[0] < EARLY_NOTICE_TTL:
                    st.notice = early[1]
            if st.connect_time is None and f.last_handshake is not None and f.last_handshake >= st.appeared:
                st.connect_time = round(f.last_handshake - st.appeared, 3)
            if st.relay is not None and f.endpoint == st.relay.endpoint:
                st.relay.applied = True
            elif st.relay is not None and st.relay.applied and f.up and f.endpoint is not None:
                # WireGuard roamed off the relay (the peer punched through): direct now
                self._drop_relay(f.key, st, "the peer reached us directly")
            if self.punch_port is None or self.punch_error is not None:
                continue
            if local_class not in NATTED and f.nat_class not in NATTED:
                continue  # no NAT on either side: nothing to punch
            mine = next((i for i in f.intents if i.peer == self.own), None)
            views.append(
                PeerView(f.key, f.nat_class, f.candidates, self._direct_up(f, st), mine, st.answered)
            )
        plan = self.planner.plan(now=now, now_ms=int(wall * 1000), local_class=local_class, peers=views)
        for op in plan.openers:
            self._maybe_punch(by_key[op.key], op.candidates, op.start_ms, local_class)
        for f in facts:
            st = self.peers[f.key]
            reason = plan.relay.get(f.key)
            if reason is None and self.punch_error is not None and not self._direct_up(f, st):
                if local_class in NATTED and f.nat_class in NATTED:
                    reason = f"no hole punching: {self.punch_error}"
            answered = st.answered is not None and st.answered == st.punch_start
            if reason is None and st.notice is not None and not self._direct_up(f, st) and not answered:
                reason = "the peer chose a relay"  # (not once our probe answered: direct is coming)
            self._relay_step(now, f, st, reason, by_key)
            st.status = self._status(f, st)
        self._ping_relays(now, facts)
        if plan.intents != self.intents:
            self.intents = plan.intents
        return self.intents

    def status(self, key: PublicKey) -> PathStatus:
        st = self.peers.get(key)
        return st.status if st is not None else NO_PATH

    # -- internals ---------------------------------------------------------------------------------

    def _direct_up(self, f: PeerFacts, st: _Peer) -> bool:
        return f.up and (st.relay is None or f.endpoint != st.relay.endpoint)

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self.dirty = True
            self.wake()

        task.add_done_callback(done)
        return task

    def _forget(self, st: _Peer) -> None:
        for t in (st.punch_task, st.alloc_task):
            if t is not None:
                t.cancel()

    def _maybe_punch(
        self, f: PeerFacts, candidates: Sequence[AddrPort], start_ms: int, local_class: str
    ) -> None:
        """Start the punch once the peer has committed to the same start (its intent naming us)."""
        st = self.peers[f.key]
        if st.punch_start == start_ms or not candidates:
            return
        if not any(i.peer == self.own and i.start_ms == start_ms for i in f.intents):
            return  # probes are full-TTL: never before the peer's openers (nat.md)
        st.punch_start = start_ms
        st.punch_task = self._spawn(
            self._punch(f.key, f.name, tuple(candidates), start_ms, local_class != "public"),
            f"punch-{f.name}",
        )

    async def _punch(
        self, key: PublicKey, name: str, candidates: tuple[AddrPort, ...], start_ms: int, openers: bool
    ) -> None:
        assert self.punch_port is not None
        await asyncio.sleep(max(0.0, start_ms / 1000 - self.wall()))
        self.punches += 1
        try:
            found = await self.punch_port.punch(
                self.wg_port, candidates, start_ms, own=self.own, peer=key, openers=openers
            )
        except Exception as e:
            self.punch_error = str(e) or type(e).__name__
            log_event(log, "hole punching unavailable", logging.WARNING, error=self.punch_error)
            return
        log_event(log, "punch", peer=name, found=str(found) if found else None)
        if found is not None and not chooses(self.own, key):
            await asyncio.sleep(ADOPT_DEFER)
        st = self.peers.get(key)
        if found is None or st is None:
            return
        self.punch_successes += 1
        st.punched, st.answered = found, start_ms
        if st.relay is not None:
            self._drop_relay(key, st, f"a probe answered from {found}")

    def _drop_relay(self, key: PublicKey, st: _Peer, why: str) -> None:
        use, st.relay, st.notice, st.need_since = st.relay, None, None, None
        if use is None:
            return
        log_event(log, "relay left", peer=key.b64[:8], relay=use.name, why=why)
        if use.chosen and self.relay_client is not None:
            self._spawn(self._release(use.mesh, key), "relay-release")

    async def _release(self, relay: ipaddress.IPv6Address, peer: PublicKey) -> None:
        assert self.relay_client is not None
        try:
            await self.relay_client.release(relay, peer)
        except Exception as e:
            log_event(log, "relay release failed", logging.DEBUG, error=str(e))

    def _options(self, facts: Mapping[PublicKey, PeerFacts]) -> list[RelayOption]:
        return [
            RelayOption(f.key, f.name, self.rtt.get(f.key))
            for f in facts.values()
            if f.relays and f.up and f.mesh_address is not None and f.endpoint is not None
        ]

    def _relay_step(
        self, now: float, f: PeerFacts, st: _Peer, reason: str | None, facts: Mapping[PublicKey, PeerFacts]
    ) -> None:
        if reason is None:
            st.why = None
            if st.relay is None:
                st.need_since = None
            return
        if st.need_since is None:
            st.need_since = now
        if f.rx_bytes > st.rx:
            st.rx_at = now
        st.rx = f.rx_bytes  # a re-created peer's counters start over: a drop is no progress
        if self.relay_client is None or not self._started:
            st.why = f"{reason}; no relay client"
            return
        options = self._options(facts)
        if not options and st.relay is None:
            st.need_since = now  # a follower's grace counts from when a relay could be used
        stalled = 0.0
        if st.relay is not None:
            stalled = now - max(st.relay.since, st.rx_at)
        for k in [k for k, until in st.avoid.items() if until <= now]:
            del st.avoid[k]
        d = choose(
            self.own,
            f.key,
            options,
            failover_after=self.failover_after,
            current=st.relay.key if st.relay is not None else None,
            stalled_for=stalled,
            avoid=st.avoid,
            notified=st.notice.relay if st.notice is not None else None,
            waited=now - st.need_since,
        )
        st.why = reason
        if d.failed is not None:
            st.avoid[d.failed] = now + RELAY_AVOID
        if d.action == "follow" and d.relay is not None and st.notice is not None:
            relay_f = facts[d.relay.key]
            assert relay_f.endpoint is not None and relay_f.mesh_address is not None
            ep = AddrPort(relay_f.endpoint.ip, st.notice.port)
            if st.relay is None or st.relay.endpoint != ep:
                st.relay = _RelayUse(d.relay.key, d.relay.name, relay_f.mesh_address, ep, now, False)
                log_event(log, "relay followed", peer=f.name, relay=d.relay.name, endpoint=str(ep))
            if stalled >= self.failover_after and st.relay.since < now - self.failover_after:
                st.notice = None  # the chooser's relay is dead too: choose ourselves
        elif d.requests and d.relay is not None:
            if (st.alloc_task is None or st.alloc_task.done()) and now >= st.alloc_after:
                if d.failed is not None and st.relay is not None:
                    log_event(log, "relay failed", peer=f.name, relay=st.relay.name, reason=d.reason)
                relay_f = facts[d.relay.key]
                st.alloc_task = self._spawn(
                    self._allocate(f.key, f.name, relay_f, d.reason), f"relay-allocate-{f.name}"
                )
        elif d.action == "none":
            st.why = f"{reason}; {d.reason}"

    async def _allocate(self, peer: PublicKey, name: str, relay: PeerFacts, reason: str) -> None:
        assert self.relay_client is not None and relay.mesh_address is not None
        try:
            port = await self.relay_client.allocate(relay.mesh_address, peer)
        except Exception as e:
            st = self.peers.get(peer)
            retry = ALLOC_RETRY[0]
            if st is not None:
                now = self.clock()
                st.avoid[relay.key] = now + RELAY_AVOID
                retry = min(ALLOC_RETRY[1], ALLOC_RETRY[0] * 2**st.alloc_failures)
                st.alloc_failures += 1
                st.alloc_after = now + retry
                asyncio.get_running_loop().call_later(retry, self.wake)
            log_event(
                log,
                "relay allocation failed",
                logging.WARNING,
                peer=name,
                relay=relay.name,
                error=str(e),
                retry_in=retry,
            )
            return
        st = self.peers.get(peer)
        if st is None or relay.endpoint is None:
            return
        st.alloc_failures, st.alloc_after = 0, 0.0
        if st.answered is not None and st.answered == st.punch_start:
            # a probe answered while we allocated (a pair relayed while its punch ran): direct wins
            self._spawn(self._release(relay.mesh_address, peer), "relay-release")
            return
        self.allocations += 1
        ep = AddrPort(relay.endpoint.ip, port)
        st.relay = _RelayUse(relay.key, relay.name, relay.mesh_address, ep, self.clock(), True)
        st.rx_at = self.clock()
        log_event(log, "relay allocated", peer=name, relay=relay.name, endpoint=str(ep), reason=reason)

    def _on_notify(self, notice: Notice) -> None:
        st = self.peers.get(notice.peer)
        if st is None:
            # the relay may know the pair before we know the peer: kept until the peer appears
            if notice.peer not in self._early and len(self._early) >= EARLY_NOTICES:
                del self._early[next(iter(self._early))]
            self._early[notice.peer] = (self.clock(), notice)
            return
        st.notice = notice
        self.dirty = True
        self.wake()

    def _ping_relays(self, now: float, facts: Sequence[PeerFacts]) -> None:
        if self.relay_client is None or not self._started or now < self._next_ping:
            return
        relays = [f for f in facts if f.relays and f.up and f.mesh_address is not None]
        if not relays:
            return
        self._next_ping = now + PING_INTERVAL
        for f in relays:
            self._spawn(self._ping(f.key, f.mesh_address), "relay-ping")  # type: ignore[arg-type]

    async def _ping(self, key: PublicKey, mesh: ipaddress.IPv6Address) -> None:
        assert self.relay_client is not None
        try:
            self.rtt[key] = await self.relay_client.ping(mesh)
        except Exception:
            self.rtt[key] = None

    def _status(self, f: PeerFacts, st: _Peer) -> PathStatus:
        relay = st.relay
        new = PathStatus(
            relay.endpoint if relay is not None else None,
            relay.name if relay is not None else None,
            st.why,
            st.connect_time,
        )
        return st.status if new == st.status else new


def classify_path(up: bool, endpoint: AddrPort | None, relay_endpoint: AddrPort | None = None) -> str:
    """``relay`` (through a relay's allocation), ``lan`` (a private address), ``direct``, or ``none``
    (not up)."""
    if not up or endpoint is None:
        return "none"
    if relay_endpoint is not None and endpoint == relay_endpoint:
        return "relay"
    if is_lan(endpoint.ip):
        return "lan"
    return "direct"
