"""Asyncio discovery client, wire-compatible with the Talos discovery service.

One :class:`DiscoveryClient` talks to one or more discovery endpoints at once. For each endpoint a session
task runs ``connect → Hello → publish → Watch → refresh loop`` and reconnects with jittered exponential
backoff on any error. Affiliates seen by all sessions are merged by id (endpoint union, newest data wins).

An endpoint may name several replicas of one registry (a host list, or a name with several addresses; see
:mod:`discovery.client.replicas`). The session uses one; when it dies (UNAVAILABLE, reset, deadline, or a
keepalive ping unanswered), the session moves to the next replica at once, says Hello, republishes and
opens a new Watch; it backs off only after every replica of a round failed.

Differences from the Go client, all compatible with upstream servers:

* The first full ``AffiliateUpdate`` is sent *before* the Watch opens, so the snapshot already contains our
  own entry; when it does not (or a delete for our id arrives), the full data is sent again at once.
* When nothing changed, the TTL/2 refresh is a TTL-only keep-alive (no data, no endpoints): the server
  extends the expiration without notifying watchers, avoiding O(N²) fan-out.
* Endpoints observed for other affiliates are sent when their set changes and re-sent every TTL/2 (an
  unchanged resend extends their expiry without notifying anyone), at most a bounded number per pass.
* Malformed blobs (short, misaligned, bad size byte, unparsable) and undecryptable data are skipped and
  counted; they never crash or restart the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

import grpc
import grpc.aio

from discovery.client.backoff import INITIAL_INTERVAL, MAX_INTERVAL, ExponentialBackoff
from discovery.client.replicas import (
    Replica,
    ReplicaRotation,
    Resolver,
    is_failover_error,
    resolve_replicas,
    system_resolver,
)
from discovery.client.target import DiscoveryTarget, parse_endpoint_replicas, redirect_target
from discovery.crypto import (
    KEY_SIZE,
    DecodeError,
    DecryptError,
    decrypt_affiliate,
    decrypt_endpoint,
    encrypt_affiliate,
    encrypt_endpoint,
    endpoint_to_addr,
    parse_secret,
)
from discovery.limits import (
    AFFILIATE_ID_MAX,
    CLUSTER_ID_MAX,
    DEFAULT_TTL_SECONDS,
    ENDPOINTS_PER_AFFILIATE_MAX,
    TTL_MAX_SECONDS,
)
from spanapi.discovery.client import affiliate_pb2
from spanapi.discovery.server import cluster_pb2, cluster_pb2_grpc
from spanutil.ipcodec import IPAddress, ip_from_bytes
from spanutil.logs import log_event

__all__ = [
    "ClientStats",
    "DiscoveredAffiliate",
    "DiscoveryClient",
    "EndpointStatus",
    "OnChange",
    "RedirectLoopError",
    "WatchEndedError",
]

log = logging.getLogger("discovery.client")

HELLO_TIMEOUT = 10.0
# How long entries missing from a reconnect snapshot are kept (a server that restarted without state
# is refilled as nodes reconnect; reconnect backoff is capped at 60 s with +-50 % jitter).
SNAPSHOT_GRACE = 120.0
RPC_TIMEOUT = 30.0
MAX_REDIRECTS = 5
MAX_OTHER_AFFILIATES_PER_REFRESH = 128
OTHER_BACKLOG_DELAY = 1.0  # seconds between passes while other-affiliate updates are still queued
KEEPALIVE_MIN = 10.0
KEEPALIVE_TIMEOUT = 20.0
# With several replicas a dead one must be noticed fast: a ping every second, answered within 0.5 s
# (our server permits it: grpc.http2.max_ping_strikes=0). A server that refuses such pings (GOAWAY
# too_many_pings, as Go servers' default policy does) gets the Talos rate above from then on.
REPLICA_KEEPALIVE = 1.0
REPLICA_KEEPALIVE_TIMEOUT = 0.5
# Hello timeout while other replicas of the round are still untried.
FAILOVER_HELLO_TIMEOUT = 2.0
_WARNED_IDS_MAX = 4096

OnChange = Callable[[dict[str, "DiscoveredAffiliate"]], Awaitable[None] | None]


def _event(level: int, event: str, **fields: Any) -> None:
    """One structured log line per event (see spanutil.logs)."""
    log_event(log, event, level, **fields)


class WatchEndedError(ConnectionError):
    """The server ended the Watch stream (it does so on shutdown); the session reconnects."""


class RedirectLoopError(ConnectionError):
    """Hello redirected more than ``MAX_REDIRECTS`` times in a row."""


# --- public value types ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiscoveredAffiliate:
    """One other node as seen through discovery. Treat the protobuf messages as read-only."""

    id: str
    affiliate: affiliate_pb2.Affiliate
    endpoints: tuple[affiliate_pb2.Endpoint, ...]

    def endpoint_addrs(self) -> list[tuple[IPAddress, int]]:
        """The endpoints as ``(ip, port)`` pairs."""
        return [endpoint_to_addr(e) for e in self.endpoints]


@dataclass(slots=True)
class ClientStats:
    """Counters over the client's lifetime, summed over all discovery endpoints."""

    decrypt_failures: int = 0  # affiliate data that failed GCM authentication (wrong key / tampered)
    malformed_blobs: int = 0  # structurally invalid data or endpoint blobs
    reconnects: int = 0  # session reconnect attempts after an error
    refreshes: int = 0  # full AffiliateUpdate (data + endpoints + TTL) sent
    keepalives: int = 0  # TTL-only AffiliateUpdate sent
    other_endpoint_updates: int = 0  # endpoints-only AffiliateUpdate sent for other affiliates
    redirects: int = 0  # Hello redirects followed
    failovers: int = 0  # moves to another replica without backoff
    deletes: int = 0  # AffiliateDelete sent
    watch_messages: int = 0  # WatchResponse messages received

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """State of one configured discovery endpoint."""

    url: str
    target: str  # current host:port as configured (one of a host list; differs from url after a redirect)
    secure: bool
    connected: bool  # Hello done and the Watch snapshot received
    public_ip: IPAddress | None
    affiliates: int
    last_error: str | None
    replica: str | None = None  # the address in use (or tried last), ``ip:port``
    replicas: int = 0  # replicas found in the last round (host list entries x addresses)


@dataclass(frozen=True, slots=True)
class _LocalData:
    version: int  # bumped whenever the data or own endpoints change
    plaintext: bytes  # deterministic serialization, to de-duplicate set_local_data calls
    data: bytes  # encrypted once per change (fresh nonce), re-sent as-is
    endpoints: tuple[bytes, ...]
    others: Mapping[str, tuple[bytes, ...]]


@dataclass(slots=True)
class _Entry:
    data: bytes  # the ciphertext, to skip re-decryption and keep ``seq`` when it did not change
    affiliate: affiliate_pb2.Affiliate
    endpoints: tuple[affiliate_pb2.Endpoint, ...]
    seq: int  # client-wide order in which this data was first received, for "newest data wins"
    # Set when a reconnect snapshot no longer lists this entry: it is kept until then (a server that
    # restarted empty is refilled by the other nodes within moments), unless deleted explicitly.
    unconfirmed_until: float | None = None


# --- client ------------------------------------------------------------------------------------------------


class DiscoveryClient:
    """Publish the local affiliate to, and watch the cluster on, one or more discovery endpoints.

    Use as ``async with DiscoveryClient(...) as client:``. ``secret`` is the 32-byte key (or its base64
    form, which is parsed with :func:`discovery.crypto.parse_secret`).

    Each URL is one registry; it may name several replicas (``https://h1:3000,h2:3000``, or a name with
    several addresses, looked up with ``resolver``). While an endpoint has more than one replica its
    channel pings every ``replica_keepalive`` seconds (``None``: the Talos rate) so a dead replica is
    left within ~1.5 s.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        cluster_id: str,
        secret: bytes | str,
        affiliate_id: str,
        ttl: float = DEFAULT_TTL_SECONDS,
        client_version: str = "kubespan-mesh/0.1",
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_server_name: str | None = None,
        on_change: OnChange | None = None,
        on_public_ip: Callable[[IPAddress], None] | None = None,
        hello_timeout: float = HELLO_TIMEOUT,
        rpc_timeout: float = RPC_TIMEOUT,
        backoff_initial: float = INITIAL_INTERVAL,
        backoff_max: float = MAX_INTERVAL,
        max_other_affiliates_per_refresh: int = MAX_OTHER_AFFILIATES_PER_REFRESH,
        coalesce_delay: float = 0.05,
        snapshot_grace: float = SNAPSHOT_GRACE,
        replica_keepalive: float | None = REPLICA_KEEPALIVE,
        resolver: Resolver = system_resolver,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints must be a sequence of URLs, not a single string")
        self.snapshot_grace = snapshot_grace
        if not endpoints:
            raise ValueError("at least one discovery endpoint is required")
        targets: dict[str, tuple[DiscoveryTarget, ...]] = {}
        for url in endpoints:
            if url in targets:
                raise ValueError(f"discovery endpoint {url!r} is listed twice")
            targets[url] = parse_endpoint_replicas(url)
        if replica_keepalive is not None and replica_keepalive <= 0:
            raise ValueError(f"replica_keepalive must be > 0 or None, got {replica_keepalive}")
        _check_id("cluster_id", cluster_id, CLUSTER_ID_MAX)
        _check_id("affiliate_id", affiliate_id, AFFILIATE_ID_MAX)
        key = parse_secret(secret) if isinstance(secret, str) else bytes(secret)
        if len(key) != KEY_SIZE:
            raise ValueError(f"secret must be {KEY_SIZE} bytes, got {len(key)} bytes")
        if not 0 < ttl <= TTL_MAX_SECONDS:
            raise ValueError(f"ttl must be within (0, {TTL_MAX_SECONDS:g}] seconds, got {ttl}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if max_other_affiliates_per_refresh < 1:
            raise ValueError("max_other_affiliates_per_refresh must be >= 1")
        ExponentialBackoff(initial=backoff_initial, max_interval=backoff_max)  # validate early

        self.cluster_id = cluster_id
        self.affiliate_id = affiliate_id
        self.ttl = float(ttl)
        self.client_version = client_version
        self._key = key
        self._tls_ca = tls_ca
        self._tls_cert = tls_cert
        self._tls_key = tls_key
        self._tls_server_name = tls_server_name
        self._on_change = on_change
        self._on_public_ip = on_public_ip
        self.hello_timeout = hello_timeout
        self.rpc_timeout = rpc_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.max_other_affiliates_per_refresh = max_other_affiliates_per_refresh
        self._coalesce_delay = coalesce_delay
        self.replica_keepalive = replica_keepalive
        self._resolver = resolver

        self.stats = ClientStats()
        self._sessions = [_Session(self, url, t[0], t) for url, t in targets.items()]
        self._local: _LocalData | None = None
        self._local_version = 0
        self._delete_generation = 0
        self._seq = itertools.count(1)
        self._merged: dict[str, DiscoveredAffiliate] = {}
        self._version = 0
        self._changed = asyncio.Event()  # replaced after every set(): waiters keep the old one
        self._status = asyncio.Event()  # same pattern, for connection / delete-ack changes
        self._public_ip: IPAddress | None = None
        self._warned_ids: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"DiscoveryClient(endpoints={[s.url for s in self._sessions]!r}, affiliate_id={self.affiliate_id!r})"

    # -- lifecycle --

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start one session task per discovery endpoint (idempotent)."""
        if self._started:
            return
        if self._closed:
            raise RuntimeError("DiscoveryClient is closed")
        self._started = True
        for s in self._sessions:
            self._tasks.append(asyncio.create_task(s.run(), name=f"discovery-session {s.url}"))
        if self._on_change is not None:
            self._tasks.append(
                asyncio.create_task(self._dispatch(self._on_change), name="discovery-on-change")
            )

    async def close(self) -> None:
        """Stop all sessions and close their channels. Does not delete the local affiliate."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for s in self._sessions:
            s.cancel_drop()  # no grace timer fires after close
        self._fire_changed()
        self._fire_status()

    # -- local data --

    async def set_local_data(
        self,
        affiliate: affiliate_pb2.Affiliate,
        endpoints: Sequence[affiliate_pb2.Endpoint] = (),
        other_endpoints: Mapping[str, Sequence[affiliate_pb2.Endpoint]] | None = None,
    ) -> bool:
        """Publish (or update) our affiliate, our endpoints and endpoints observed for other affiliates.

        Returns ``False`` when nothing changed (no RPC is triggered). Validation happens before any state
        changes: an oversized affiliate raises :class:`~discovery.crypto.AffiliateTooLargeError`.
        """
        plaintext = affiliate.SerializeToString(deterministic=True)
        own = self._encrypt_endpoints(endpoints, "own")
        others: dict[str, tuple[bytes, ...]] = {}
        for other_id, eps in (other_endpoints or {}).items():
            _check_id("other_endpoints key", other_id, AFFILIATE_ID_MAX)
            if other_id == self.affiliate_id:
                continue
            blobs = self._encrypt_endpoints(eps, "other")
            if blobs:
                others[other_id] = blobs
        prev = self._local
        own_same = prev is not None and prev.plaintext == plaintext and set(prev.endpoints) == set(own)
        others_same = prev is not None and {k: set(v) for k, v in prev.others.items()} == {
            k: set(v) for k, v in others.items()
        }
        if own_same and others_same:
            return False
        if own_same:
            assert prev is not None
            self._local = _LocalData(prev.version, prev.plaintext, prev.data, prev.endpoints, others)
        else:
            data = encrypt_affiliate(self._key, affiliate)  # fresh nonce per change, as upstream
            self._local_version += 1
            self._local = _LocalData(self._local_version, plaintext, data, own, others)
        _event(
            logging.DEBUG,
            "discovery local data set",
            version=self._local.version,
            endpoints=len(own),
            other_affiliates=len(others),
        )
        for s in self._sessions:
            s.wake.set()
        return True

    def _encrypt_endpoints(
        self, endpoints: Sequence[affiliate_pb2.Endpoint], whose: str
    ) -> tuple[bytes, ...]:
        blobs = tuple(dict.fromkeys(encrypt_endpoint(self._key, e) for e in endpoints))
        if len(blobs) > ENDPOINTS_PER_AFFILIATE_MAX:
            _event(
                logging.WARNING,
                "discovery endpoints truncated",
                whose=whose,
                count=len(blobs),
                limit=ENDPOINTS_PER_AFFILIATE_MAX,
            )
            blobs = blobs[:ENDPOINTS_PER_AFFILIATE_MAX]
        return blobs

    async def delete_local_affiliate(self) -> None:
        """Stop publishing and delete our affiliate from every discovery endpoint.

        Returns once every endpoint acknowledged the delete; an endpoint that is down gets it after it
        reconnects, so bound the wait with ``asyncio.timeout()``. A later :meth:`set_local_data` publishes
        again. Raises ``RuntimeError`` if the client closes first.
        """
        self._local = None
        self._delete_generation += 1
        generation = self._delete_generation
        for s in self._sessions:
            s.wake.set()
        while not all(s.delete_acked >= generation for s in self._sessions):
            if self._closed:
                raise RuntimeError("DiscoveryClient closed before the delete was acknowledged")
            await self._status.wait()

    # -- observed state --

    @property
    def affiliates(self) -> dict[str, DiscoveredAffiliate]:
        """A fresh copy of the merged view of all other affiliates, by affiliate id."""
        return dict(self._merged)

    @property
    def version(self) -> int:
        """Incremented whenever :attr:`affiliates` changes."""
        return self._version

    @property
    def public_ip(self) -> IPAddress | None:
        """Our address as most recently reported by a Hello (``None`` until one reports it)."""
        return self._public_ip

    @property
    def connected(self) -> bool:
        """True while at least one discovery endpoint is connected (snapshot received)."""
        return any(s.ready.is_set() for s in self._sessions)

    @property
    def ready(self) -> dict[str, asyncio.Event]:
        """Per endpoint URL, an event that is set while that endpoint is connected."""
        return {s.url: s.ready for s in self._sessions}

    def endpoint_status(self) -> dict[str, EndpointStatus]:
        """Per endpoint URL, its current state."""
        return {s.url: s.status() for s in self._sessions}

    async def wait_connected(self, *, all_endpoints: bool = False) -> bool:
        """Wait until one (or every) endpoint is connected; ``False`` if the client closes first.

        Bound it with ``asyncio.timeout()``.
        """
        check = all if all_endpoints else any
        while not check(s.ready.is_set() for s in self._sessions):
            if self._closed:
                return False
            await self._status.wait()
        return True

    async def updates(self) -> AsyncIterator[dict[str, DiscoveredAffiliate]]:
        """Yield a fresh copy of :attr:`affiliates` whenever it changes; bursts are coalesced.

        The first item is the current state if anything was received already, otherwise the first change.
        The iterator ends when the client closes.
        """
        seen = 0
        while True:
            if self._version == seen:
                if self._closed:
                    return
                await self._changed.wait()
                if self._closed:
                    return
                if self._coalesce_delay > 0:
                    await asyncio.sleep(self._coalesce_delay)
            seen = self._version
            yield self.affiliates

    # -- internals used by sessions --

    def _next_seq(self) -> int:
        return next(self._seq)

    def _fire_changed(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _fire_status(self) -> None:
        ev, self._status = self._status, asyncio.Event()
        ev.set()

    def _set_public_ip(self, ip: IPAddress) -> None:
        if ip == self._public_ip:
            return
        self._public_ip = ip
        _event(logging.INFO, "discovery public ip", ip=ip)
        if self._on_public_ip is not None:
            try:
                self._on_public_ip(ip)
            except Exception:
                log.exception("discovery on_public_ip callback failed")

    def _warn_once(self, affiliate_id: str, event: str, error: DecodeError) -> None:
        first = affiliate_id not in self._warned_ids
        if first and len(self._warned_ids) < _WARNED_IDS_MAX:
            self._warned_ids.add(affiliate_id)
        _event(logging.WARNING if first else logging.DEBUG, event, affiliate=affiliate_id, error=error)

    def _merge(self, ids: set[str]) -> None:
        """Recompute the merged view for ``ids`` and notify if anything changed."""
        changed = False
        for aid in ids:
            entries = [s.entries[aid] for s in self._sessions if aid in s.entries]
            if not entries:
                changed |= self._merged.pop(aid, None) is not None
                continue
            entries.sort(key=lambda e: e.seq, reverse=True)
            seen: set[bytes] = set()
            endpoints: list[affiliate_pb2.Endpoint] = []
            for e in entries:
                for ep in e.endpoints:
                    k = ep.SerializeToString(deterministic=True)
                    if k not in seen:
                        seen.add(k)
                        endpoints.append(ep)
            merged = DiscoveredAffiliate(aid, entries[0].affiliate, tuple(endpoints))
            if self._merged.get(aid) != merged:
                self._merged[aid] = merged
                changed = True
        if changed:
            self._version += 1
            self._fire_changed()

    async def _dispatch(self, callback: OnChange) -> None:
        async for snapshot in self.updates():
            try:
                result = callback(snapshot)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("discovery on_change callback failed")

    async def _make_channel(self, replica: Replica, *, fast_keepalive: bool) -> grpc.aio.Channel:
        """A channel to one replica's address; ``:authority`` and TLS use the configured host name."""
        if fast_keepalive and self.replica_keepalive is not None:
            keepalive, timeout = (
                self.replica_keepalive,
                min(REPLICA_KEEPALIVE_TIMEOUT, self.replica_keepalive),
            )
        else:
            keepalive, timeout = max(KEEPALIVE_MIN, self.ttl / 10), KEEPALIVE_TIMEOUT
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", int(keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", int(timeout * 1000)),
            # The Watch stream is silent for long stretches; keep pinging through it.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.primary_user_agent", self.client_version),
        ]
        if fast_keepalive and self.replica_keepalive is not None:
            # grpc-core times keepalive pings out after ping_timeout_ms (default 1 min), not after the
            # keepalive timeout alone; without BDP probes only keepalive pings get that short timeout.
            options += [("grpc.http2.ping_timeout_ms", int(timeout * 1000)), ("grpc.http2.bdp_probe", 0)]
        name = replica.name
        if replica.by_name:
            options.append(("grpc.default_authority", name.target))
        if not name.secure:
            return grpc.aio.insecure_channel(replica.target, options=options)
        # Files are re-read on every connect, so rotated certificates are picked up on reconnect.
        ca, cert, key = await asyncio.to_thread(_read_tls, self._tls_ca, self._tls_cert, self._tls_key)
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        if self._tls_server_name:
            options.append(("grpc.ssl_target_name_override", self._tls_server_name))
        elif replica.by_name:
            options.append(("grpc.ssl_target_name_override", name.host))
        return grpc.aio.secure_channel(replica.target, creds, options=options)

    def _make_backoff(self) -> ExponentialBackoff:
        return ExponentialBackoff(initial=self._backoff_initial, max_interval=self._backoff_max)


def _check_id(name: str, value: str, limit: int) -> None:
    size = len(value.encode("utf-8"))
    if not 1 <= size <= limit:
        raise ValueError(f"{name} must be 1..{limit} bytes of UTF-8, got {size} bytes")


def _read_tls(
    ca: Path | None, cert: Path | None, key: Path | None
) -> tuple[bytes | None, bytes | None, bytes | None]:
    return (
        ca.read_bytes() if ca else None,
        cert.read_bytes() if cert else None,
        key.read_bytes() if key else None,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


# --- one discovery endpoint --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    client: DiscoveryClient
    url: str
    target: DiscoveryTarget  # current host; a Hello redirect replaces all targets, as upstream does
    targets: tuple[DiscoveryTarget, ...] = ()  # the endpoint's hosts (a host list, or one host)
    entries: dict[str, _Entry] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    public_ip: IPAddress | None = None
    last_error: str | None = None
    delete_acked: int = 0
    # per-connection publish state
    sent_version: int = -1
    last_own_sent: float = 0.0
    own_missing: bool = False
    other_sent: dict[str, tuple[frozenset[bytes], float]] = field(default_factory=dict)
    other_backlog: bool = False
    disconnected_since: float | None = None
    drop_timer: asyncio.TimerHandle | None = None  # for the entries a reconnect snapshot left out
    replica: Replica | None = None  # in use, or tried last
    replica_count: int = 0
    slow_keepalive: bool = False  # the registry refused fast keepalive pings
    rotation: ReplicaRotation = field(default_factory=ReplicaRotation)
    backoff: ExponentialBackoff = field(init=False)

    def __post_init__(self) -> None:
        self.backoff = self.client._make_backoff()
        if not self.targets:
            self.targets = (self.target,)

    def status(self) -> EndpointStatus:
        return EndpointStatus(
            url=self.url,
            target=self.target.target,
            secure=self.target.secure,
            connected=self.ready.is_set(),
            public_ip=self.public_ip,
            affiliates=len(self.entries),
            last_error=self.last_error,
            replica=self.replica.target if self.replica is not None else None,
            replicas=self.replica_count,
        )

    async def run(self) -> None:
        """Connect, serve, and on failure move to the next replica (backoff after a failed round)."""
        c = self.client
        loop = asyncio.get_running_loop()
        backoff = self.backoff
        rotation = self.rotation
        back_off = False  # the first round starts at once
        skip_current = False  # the replica in use just died: start the round after it
        came_from: tuple[Replica, str] | None = None  # the replica left without backoff, and why
        while True:
            if back_off:
                came_from = None
                delay = backoff.next_delay()
                _event(logging.INFO, "discovery reconnect scheduled", endpoint=self.url, delay=f"{delay:.2f}")
                await asyncio.sleep(delay)
                c.stats.reconnects += 1
                self._expire_stale(loop.time())
            back_off = True
            try:
                replicas = await resolve_replicas(self.targets, c._resolver)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = _describe(e)
                _event(logging.WARNING, "discovery resolve failed", endpoint=self.url, error=self.last_error)
                self._disconnected(loop)
                continue
            self.replica_count = len(replicas)
            rotation.begin_round(replicas, skip_current=skip_current)
            skip_current = False
            while (replica := rotation.next()) is not None:
                if came_from is not None:
                    c.stats.failovers += 1
                    _event(
                        logging.INFO,
                        "discovery replica failover",
                        endpoint=self.url,
                        **{"from": came_from[0].target},
                        to=replica.target,
                        reason=came_from[1],
                    )
                self.replica = replica
                self.target = replica.name
                try:
                    await self._connect_and_serve(replica, quick=rotation.untried > 0)
                    raise WatchEndedError("session ended")  # not reached: serving ends with an error
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    served = self.ready.is_set()
                    self.last_error = _describe(e)
                    _event(
                        logging.WARNING,
                        "discovery session error",
                        endpoint=self.url,
                        replica=replica.target,
                        error=self.last_error,
                    )
                    if "too_many_pings" in self.last_error and not self.slow_keepalive:
                        self.slow_keepalive = True
                        _event(
                            logging.WARNING, "discovery registry refuses fast keepalive", endpoint=self.url
                        )
                    if isinstance(e, RedirectLoopError) or not is_failover_error(e):
                        break  # the registry answered: back off, then go on with the next replica
                    came_from = (replica, self.last_error)
                    if served and self.replica_count > 1:
                        back_off = False  # a new round (re-resolved) without it, at once
                        skip_current = True
                        break
                finally:
                    self._disconnected(loop)

    def _disconnected(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.ready.is_set() or self.disconnected_since is None:
            self.disconnected_since = loop.time()
        self.ready.clear()
        self.client._fire_status()

    def _expire_stale(self, now: float) -> None:
        """After a TTL without a connection the server has forgotten everything we cached: drop it."""
        if (
            self.entries
            and self.disconnected_since is not None
            and now - self.disconnected_since > self.client.ttl
        ):
            ids = set(self.entries)
            self.entries.clear()
            _event(logging.INFO, "discovery cache expired", endpoint=self.url, affiliates=len(ids))
            self.client._merge(ids)

    async def _connect_and_serve(self, replica: Replica, *, quick: bool) -> None:
        """Hello (following redirects), then serve; ``quick``: other replicas wait, so a short Hello."""
        c = self.client
        redirects = 0
        hello_timeout = min(c.hello_timeout, FAILOVER_HELLO_TIMEOUT) if quick else c.hello_timeout
        while True:
            fast = self.replica_count > 1 and not self.slow_keepalive
            channel = await c._make_channel(replica, fast_keepalive=fast)
            try:
                stub = cluster_pb2_grpc.ClusterStub(channel)
                hello = await stub.Hello(
                    cluster_pb2.HelloRequest(cluster_id=c.cluster_id, client_version=c.client_version),
                    timeout=hello_timeout,
                )
                if hello.HasField("redirect") and hello.redirect.endpoint:
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise RedirectLoopError(f"more than {MAX_REDIRECTS} consecutive Hello redirects")
                    new = redirect_target(hello.redirect.endpoint, secure=self.target.secure)
                    c.stats.redirects += 1
                    _event(logging.INFO, "discovery redirect", endpoint=self.url, target=new.target)
                    self.target, self.targets = new, (new,)
                    replicas = await resolve_replicas(self.targets, c._resolver)
                    self.replica_count = len(replicas)
                    replica = self.replica = replicas[0]
                    self.rotation.current = replica
                    continue  # the finally below closes this channel first
                _event(logging.INFO, "discovery hello", endpoint=self.url, target=replica.target)
                self._record_ip(hello.client_ip)
                await self._serve(stub)
                return
            finally:
                await channel.close()

    def _record_ip(self, raw: bytes) -> None:
        if not raw:
            return
        try:
            ip = ip_from_bytes(raw)
        except ValueError:
            self.client.stats.malformed_blobs += 1
            _event(logging.WARNING, "discovery hello client_ip malformed", endpoint=self.url, size=len(raw))
            return
        self.public_ip = ip
        self.client._set_public_ip(ip)

    async def _serve(self, stub: cluster_pb2_grpc.ClusterStub) -> None:
        loop = asyncio.get_running_loop()
        # A new connection: the server may have lost us, so everything is re-sent in full.
        self.sent_version = -1
        self.other_sent.clear()
        self.own_missing = False
        self.wake.clear()
        await self._refresh(stub, loop.time())

        watch = asyncio.create_task(self._watch(stub), name=f"discovery-watch {self.url}")
        watch.add_done_callback(lambda _: self.wake.set())
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._next_due(loop.time())):
                        await self.wake.wait()
                self.wake.clear()
                if watch.done():
                    exc = watch.exception()
                    raise exc if exc is not None else WatchEndedError("watch ended")
                await self._refresh(stub, loop.time())
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch

    def _next_due(self, now: float) -> float | None:
        """Seconds until the next refresh is due (``None``: nothing scheduled)."""
        local = self.client._local
        if local is None:
            return None
        half = self.client.ttl / 2
        due = self.last_own_sent + half
        if self.other_sent:
            due = min(due, min(t for _, t in self.other_sent.values()) + half)
        if self.other_backlog:
            due = min(due, now + OTHER_BACKLOG_DELAY)
        return max(0.0, due - now)

    async def _refresh(self, stub: cluster_pb2_grpc.ClusterStub, now: float) -> None:
        c = self.client
        timeout = c.rpc_timeout
        if c._delete_generation > self.delete_acked:
            generation = c._delete_generation
            await stub.AffiliateDelete(
                cluster_pb2.AffiliateDeleteRequest(cluster_id=c.cluster_id, affiliate_id=c.affiliate_id),
                timeout=timeout,
            )
            c.stats.deletes += 1
            self.delete_acked = generation
            self.sent_version = -1
            self.other_sent.clear()
            _event(logging.INFO, "discovery affiliate deleted", endpoint=self.url, affiliate=c.affiliate_id)
            c._fire_status()
        local = c._local
        if local is None:
            return
        ttl = timedelta(seconds=c.ttl)
        half = c.ttl / 2
        if self.sent_version != local.version or self.own_missing:
            await stub.AffiliateUpdate(
                cluster_pb2.AffiliateUpdateRequest(
                    cluster_id=c.cluster_id,
                    affiliate_id=c.affiliate_id,
                    affiliate_data=local.data,
                    affiliate_endpoints=local.endpoints,
                    ttl=ttl,
                ),
                timeout=timeout,
            )
            self.sent_version = local.version
            self.own_missing = False
            self.last_own_sent = now
            c.stats.refreshes += 1
            self.backoff.reset()
            _event(logging.DEBUG, "discovery affiliate published", endpoint=self.url, version=local.version)
        elif now - self.last_own_sent >= half - 1e-3:
            # Keep-alive: no data (watchers are not notified), but our own endpoints are re-sent,
            # because the server expires each endpoint on its own TTL.
            await stub.AffiliateUpdate(
                cluster_pb2.AffiliateUpdateRequest(
                    cluster_id=c.cluster_id,
                    affiliate_id=c.affiliate_id,
                    affiliate_endpoints=local.endpoints,
                    ttl=ttl,
                ),
                timeout=timeout,
            )
            self.last_own_sent = now
            c.stats.keepalives += 1
            self.backoff.reset()
            _event(logging.DEBUG, "discovery keepalive", endpoint=self.url)

        # Endpoints observed for other affiliates: changed sets first, then those due for a TTL refresh.
        for gone in set(self.other_sent) - set(local.others):
            del self.other_sent[gone]
        changed: list[str] = []
        stale: list[tuple[float, str]] = []
        for other_id, blobs in local.others.items():
            sent = self.other_sent.get(other_id)
            if sent is None or sent[0] != frozenset(blobs):
                changed.append(other_id)
            elif now - sent[1] >= half - 1e-3:
                stale.append((sent[1], other_id))
        pending = sorted(changed) + [i for _, i in sorted(stale)]
        batch = pending[: c.max_other_affiliates_per_refresh]
        self.other_backlog = len(pending) > len(batch)
        for other_id in batch:
            blobs = local.others[other_id]
            try:
                await stub.AffiliateUpdate(
                    cluster_pb2.AffiliateUpdateRequest(
                        cluster_id=c.cluster_id, affiliate_id=other_id, affiliate_endpoints=blobs, ttl=ttl
                    ),
                    timeout=timeout,
                )
                c.stats.other_endpoint_updates += 1
            except grpc.aio.AioRpcError as e:
                # A refusal for someone else's entry (cluster or endpoint limit) must not tear down our
                # session; it is retried when the set changes or after TTL/2. Transport errors propagate.
                if e.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
                _event(
                    logging.WARNING,
                    "discovery other endpoints refused",
                    endpoint=self.url,
                    affiliate=other_id,
                    error=_describe(e),
                )
            self.other_sent[other_id] = (frozenset(blobs), now)

    async def _watch(self, stub: cluster_pb2_grpc.ClusterStub) -> None:
        c = self.client
        call = stub.Watch(cluster_pb2.WatchRequest(cluster_id=c.cluster_id))
        first = True
        try:
            async for resp in call:
                c.stats.watch_messages += 1
                ids = self._apply(resp, snapshot=first)
                if first:
                    first = False
                    self.ready.set()
                    self.last_error = None
                    self.disconnected_since = None
                    _event(
                        logging.INFO,
                        "discovery connected",
                        endpoint=self.url,
                        target=self.target.target,
                        replica=self.replica.target if self.replica is not None else None,
                        affiliates=len(self.entries),
                    )
                    c._fire_status()
                c._merge(ids)
        finally:
            call.cancel()
        raise WatchEndedError("watch stream ended by the server")

    def _schedule_drop(self) -> None:
        """(Re)arm the one timer of this session for the earliest grace deadline, if any."""
        self.cancel_drop()
        deadlines = [e.unconfirmed_until for e in self.entries.values() if e.unconfirmed_until is not None]
        if deadlines:
            loop = asyncio.get_running_loop()
            self.drop_timer = loop.call_at(min(deadlines) + 0.05, self._drop_unconfirmed)

    def cancel_drop(self) -> None:
        if self.drop_timer is not None:
            self.drop_timer.cancel()
            self.drop_timer = None

    def _drop_unconfirmed(self) -> None:
        """Drop entries a reconnect snapshot left out and nobody republished within the grace period."""
        self.drop_timer = None
        now = asyncio.get_running_loop().time()
        gone = {
            aid
            for aid, e in self.entries.items()
            if e.unconfirmed_until is not None and e.unconfirmed_until <= now
        }
        for aid in gone:
            del self.entries[aid]
        self._schedule_drop()  # entries left out by a later snapshot have a later deadline
        if gone:
            self.client._merge(gone)

    def _apply(self, resp: cluster_pb2.WatchResponse, *, snapshot: bool) -> set[str]:
        """Apply one Watch message to this session's cache; return the ids whose entry may have changed."""
        c = self.client
        changed: set[str] = set()
        previous = self.entries
        if snapshot:
            changed.update(self.entries)
            self.entries = {}
        seq = c._next_seq()
        own_present: bool | None = False if snapshot else None
        deleted_now: set[str] = set()
        for a in resp.affiliates:
            if a.id == c.affiliate_id:
                own_present = bool(a.data) and not resp.deleted
                continue
            if resp.deleted:
                deleted_now.add(a.id)
            if resp.deleted or not a.data:  # data-less entries only carry endpoints harvested by others
                if self.entries.pop(a.id, None) is not None:
                    changed.add(a.id)
                continue
            prev = previous.get(a.id)
            if prev is not None and prev.data == a.data:
                # Same ciphertext (e.g. a re-sent snapshot): keep its age so a newer copy elsewhere still wins.
                affiliate, entry_seq = prev.affiliate, prev.seq
            else:
                entry_seq = seq
                try:
                    affiliate = decrypt_affiliate(c._key, a.data)
                except DecryptError as e:
                    c.stats.decrypt_failures += 1
                    c._warn_once(a.id, "discovery affiliate undecryptable", e)
                    continue  # a delta keeps the last good entry; a snapshot drops it
                except DecodeError as e:
                    c.stats.malformed_blobs += 1
                    c._warn_once(a.id, "discovery affiliate malformed", e)
                    continue
            endpoints: dict[bytes, affiliate_pb2.Endpoint] = {}
            for blob in a.endpoints:
                try:
                    ep = decrypt_endpoint(c._key, blob)
                except DecodeError as e:
                    c.stats.malformed_blobs += 1
                    c._warn_once(a.id, "discovery endpoint malformed", e)
                    continue
                endpoints.setdefault(ep.SerializeToString(deterministic=True), ep)
            self.entries[a.id] = _Entry(a.data, affiliate, tuple(endpoints.values()), entry_seq)
            changed.add(a.id)
        if snapshot and previous and c.snapshot_grace > 0:
            # A reconnect snapshot without entries we knew: the server may have restarted with no state.
            # Keep them for a grace period; the nodes republish (and explicit deletes still apply at once).
            now = asyncio.get_running_loop().time()
            kept = 0
            for aid, prev in previous.items():
                if aid in self.entries or aid in deleted_now:
                    continue
                if prev.unconfirmed_until is not None and prev.unconfirmed_until <= now:
                    continue
                self.entries[aid] = replace(
                    prev, unconfirmed_until=prev.unconfirmed_until or now + c.snapshot_grace
                )
                changed.discard(aid)
                kept += 1
            if kept:
                _event(
                    logging.INFO,
                    "discovery snapshot lacks known affiliates; keeping them for a grace period",
                    endpoint=self.url,
                    kept=kept,
                    grace_s=c.snapshot_grace,
                )
                self._schedule_drop()
        if own_present is False and c._local is not None:
            _event(logging.INFO, "discovery own affiliate missing, republishing", endpoint=self.url)
            self.own_missing = True
            self.wake.set()
        return changed
