"""Discovery registry core: clusters, affiliates, TTLs, limits and watch fan-out.

Pure logic with an injected monotonic clock: no asyncio, no I/O. The gRPC
service validates nothing itself; it calls :class:`Registry` and maps
:class:`RegistryError` to a status code.

Behaviour follows the upstream discovery service (see
``reference/discovery.md`` section 2) with its quirks fixed:

* a rejected request changes nothing (upstream partly applies an update that
  hits the endpoint limit);
* identical data does not notify watchers (upstream always does);
* when GC drops some endpoints of a live affiliate, watchers get the updated
  affiliate (upstream sends ``deleted=true``);
* endpoint blobs must be non-empty multiples of 16 bytes (what every real
  client sends).

Visibility is governed by GC, as upstream: an affiliate whose TTL has run out
is still listed until the next :meth:`Registry.gc`, which removes it and
notifies watchers.
"""

from __future__ import annotations

import builtins
import enum
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError

from discovery.limits import DEFAULT_LIMITS, Limits
from spanapi.discovery.storage import storage_pb2

__all__ = [
    "AffiliateView",
    "Change",
    "Code",
    "GcStats",
    "Journal",
    "Registry",
    "RegistryError",
    "SnapshotError",
    "Subscription",
]

_INF = math.inf


class Code(enum.Enum):
    """Why a request was rejected; the service maps it to the gRPC status code of the same name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


class RegistryError(Exception):
    """A rejected request. ``str(e)`` names the field and the limit, never the blob contents."""

    __slots__ = ("code", "field")

    def __init__(self, code: Code, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.code = code
        self.field = field


class SnapshotError(ValueError):
    """A snapshot could not be decoded at all (nothing was imported)."""


class Journal(Protocol):
    """Where :meth:`Registry.update` / :meth:`Registry.delete` record a validated mutation before applying it.

    A method that raises leaves the registry unchanged (and notifies nobody); the exception propagates.
    """

    def record_update(
        self, cluster_id: str, affiliate_id: str, data: bytes | None, endpoints: Sequence[bytes], ttl: float
    ) -> None: ...

    def record_delete(self, cluster_id: str, affiliate_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class AffiliateView:
    """An immutable view of one affiliate, shared between list/watch results and changes."""

    id: str
    data: bytes
    endpoints: tuple[bytes, ...]


class Change:
    """One watch notification. ``affiliate is None`` means the affiliate was deleted.

    The same object is queued to every subscriber of the cluster; the server
    caches the serialized message in ``wire`` so it is encoded once.
    """

    __slots__ = ("affiliate", "id", "wire")

    def __init__(self, id: str, affiliate: AffiliateView | None, wire: bytes | None = None) -> None:
        self.id = id
        self.affiliate = affiliate
        self.wire = wire

    def __repr__(self) -> str:
        kind = "deleted" if self.affiliate is None else "updated"
        return f"Change({self.id!r}, {kind})"


@dataclass(slots=True)
class GcStats:
    """What one GC pass removed. ``endpoints`` counts every endpoint that left the registry,
    including those of removed affiliates."""

    clusters: int = 0
    affiliates: int = 0
    endpoints: int = 0


class _Affiliate:
    __slots__ = ("data", "endpoints", "ep_min", "expiration", "view")

    def __init__(self, data: bytes, expiration: float) -> None:
        self.data = data
        self.expiration = expiration
        # endpoint blob -> expiration; insertion order is the published order.
        self.endpoints: dict[bytes, float] = {}
        # Lower bound of the endpoint expirations (exact after GC looked at it).
        self.ep_min = _INF
        self.view: AffiliateView | None = None


class _Cluster:
    __slots__ = ("affiliates", "subscribers")

    def __init__(self) -> None:
        self.affiliates: dict[str, _Affiliate] = {}
        self.subscribers: dict[Subscription, None] = {}


def _view(aid: str, aff: _Affiliate) -> AffiliateView:
    v = aff.view
    if v is None:
        v = aff.view = AffiliateView(aid, aff.data, tuple(aff.endpoints))
    return v


class Subscription:
    """A watch on one cluster: an atomic snapshot plus the changes queued since."""

    __slots__ = (
        "_cluster",
        "_pending",
        "_pending_bytes",
        "_registry",
        "cluster_id",
        "lost",
        "snapshot",
        "waker",
    )

    def __init__(
        self, registry: Registry, cluster: _Cluster, cluster_id: str, snapshot: list[AffiliateView]
    ) -> None:
        self.cluster_id = cluster_id
        self.snapshot = snapshot
        self.lost = False
        self.waker: Callable[[], None] | None = None
        self._pending: list[Change] = []
        self._pending_bytes = 0  # approximate wire size of _pending
        self._registry: Registry | None = registry
        self._cluster: _Cluster | None = cluster

    def drain(self) -> list[Change]:
        """Return the pending changes coalesced by id (last wins, in order of last occurrence)."""
        pending = self._pending
        if not pending:
            return []
        self._pending = []
        self._pending_bytes = 0
        if len(pending) == 1:
            return pending
        seen: set[str] = set()
        out: list[Change] = []
        for ch in reversed(pending):
            if ch.id not in seen:
                seen.add(ch.id)
                out.append(ch)
        out.reverse()
        return out

    @property
    def pending(self) -> int:
        """Number of queued (not yet coalesced) changes."""
        return len(self._pending)

    def close(self) -> None:
        """Unsubscribe; idempotent."""
        cluster, registry = self._cluster, self._registry
        if cluster is None or registry is None:
            return
        self._cluster = self._registry = None
        if cluster.subscribers.pop(self, False) is None:
            registry._n_subs -= 1

    def _detach(self) -> None:
        # Called by the registry when the subscriber overflowed; the registry already removed it.
        self._cluster = self._registry = None


def change_size(change: Change) -> int:
    """About the bytes ``change`` adds to a WatchResponse (id, data, endpoints, framing)."""
    a = change.affiliate
    if a is None:
        return len(change.id) + 8
    return len(a.id) + len(a.data) + 3 * len(a.endpoints) + sum(map(len, a.endpoints)) + 16


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINT = [_varint(i) for i in range(1 << 14)]


def _vlen(n: int) -> bytes:
    return _VARINT[n] if n < 16384 else _varint(n)


def _duration_body(remaining: float) -> bytes:
    """google.protobuf.Duration body for a positive duration, rounded to the millisecond."""
    ms = int(remaining * 1000.0 + 0.5)
    s, ms = divmod(ms, 1000)
    body = b"\x08" + _vlen(s) if s else b""
    if ms:
        body += b"\x10" + _varint(ms * 1_000_000)
    return body


def _duration_seconds(seconds: int, nanos: int) -> float:
    return seconds + nanos * 1e-9


class Registry:
    """The in-memory registry. Not thread-safe: use it from one thread (the event loop)."""

    __slots__ = ("_buf", "_buf_bytes", "_clock", "_clusters", "_limits", "_n_affs", "_n_eps", "_n_subs")

    def __init__(self, limits: Limits = DEFAULT_LIMITS, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._buf = limits.watch_buffer
        self._buf_bytes = limits.watch_buffer_bytes
        self._clusters: dict[str, _Cluster] = {}
        self._n_affs = 0
        self._n_eps = 0
        self._n_subs = 0

    @property
    def limits(self) -> Limits:
        return self._limits

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_id(value: str, field: str, limit: int) -> None:
        if value.isascii():
            n = len(value)
        else:
            try:
                n = len(value.encode())
            except UnicodeEncodeError:
                raise RegistryError(Code.INVALID_ARGUMENT, field, "is not valid UTF-8") from None
        if n == 0:
            raise RegistryError(Code.INVALID_ARGUMENT, field, f"is empty (must be 1..{limit} bytes)")
        if n > limit:
            raise RegistryError(Code.INVALID_ARGUMENT, field, f"{n} bytes exceeds the limit of {limit}")

    def validate_ids(self, cluster_id: str, affiliate_id: str | None = None) -> None:
        """Raise INVALID_ARGUMENT unless the IDs are 1..limit bytes of UTF-8."""
        lim = self._limits
        self._check_id(cluster_id, "cluster_id", lim.cluster_id_max)
        if affiliate_id is not None:
            self._check_id(affiliate_id, "affiliate_id", lim.affiliate_id_max)

    def _endpoint_error(self, index: int, ep: bytes) -> RegistryError:
        n = len(ep)
        field = f"affiliate_endpoints[{index}]"
        if n == 0:
            return RegistryError(Code.INVALID_ARGUMENT, field, "is empty")
        if n > self._limits.endpoint_max:
            return RegistryError(
                Code.INVALID_ARGUMENT, field, f"{n} bytes exceeds the limit of {self._limits.endpoint_max}"
            )
        return RegistryError(Code.INVALID_ARGUMENT, field, f"{n} bytes is not a multiple of 16")

    # the errors of an update, shared by :meth:`_update_at` and :meth:`validate_update` (one text for
    # both stores); built only on the rejecting path

    def _data_error(self, n: int) -> RegistryError:
        limit = self._limits.affiliate_data_max
        return RegistryError(
            Code.INVALID_ARGUMENT, "affiliate_data", f"{n} bytes exceeds the limit of {limit}"
        )

    def _ttl_error(self, ttl: float) -> RegistryError:
        limit = self._limits.ttl_max
        return RegistryError(Code.INVALID_ARGUMENT, "ttl", f"{ttl:g} s exceeds the limit of {limit:g} s")

    def _cluster_full_error(self, size: int) -> RegistryError:
        limit = self._limits.affiliates_per_cluster_max
        return RegistryError(
            Code.RESOURCE_EXHAUSTED,
            "affiliates",
            f"the cluster already holds {size} affiliates, the limit is {limit}",
        )

    def _endpoints_full_error(self, n: int) -> RegistryError:
        limit = self._limits.endpoints_per_affiliate_max
        return RegistryError(
            Code.RESOURCE_EXHAUSTED, "affiliate_endpoints", f"{n} endpoints exceeds the limit of {limit}"
        )

    # ------------------------------------------------------------------ mutations

    def update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: Sequence[bytes],
        ttl: float,
        journal: Journal | None = None,
    ) -> bool:
        """Create or update an affiliate; merge endpoints; extend TTLs.

        ``data`` None or empty leaves the stored data alone. Returns True when
        something visible changed (new affiliate, different data or a new
        endpoint), in which case one :class:`Change` was queued to every
        watcher of the cluster (there may be none). Raises
        :class:`RegistryError` without changing anything.

        With a ``journal``, the request is validated completely, then
        ``journal.record_update`` is called with the arguments as given, then
        it is applied: a journal that raises leaves everything unchanged, and
        a journalled update is never refused afterwards.
        """
        return self._update_at(self._clock(), cluster_id, affiliate_id, data, endpoints, ttl, journal)

    def _update_at(
        self,
        now: float,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: Sequence[bytes],
        ttl: float,
        journal: Journal | None = None,
    ) -> bool:
        lim = self._limits
        raw_ttl = ttl
        # --- validate everything first: a rejected request changes nothing.
        if not (cluster_id.isascii() and 0 < len(cluster_id) <= lim.cluster_id_max):
            self._check_id(cluster_id, "cluster_id", lim.cluster_id_max)
        if not (affiliate_id.isascii() and 0 < len(affiliate_id) <= lim.affiliate_id_max):
            self._check_id(affiliate_id, "affiliate_id", lim.affiliate_id_max)
        if data and len(data) > lim.affiliate_data_max:
            raise self._data_error(len(data))
        if not ttl <= lim.ttl_max:  # also rejects NaN
            raise self._ttl_error(ttl)
        if ttl < 0:
            ttl = 0.0
        cluster = self._clusters.get(cluster_id)
        aff = cluster.affiliates.get(affiliate_id) if cluster is not None else None
        stored = aff.endpoints if aff is not None else None
        emax = lim.endpoint_max
        fresh = 0
        for i, ep in enumerate(endpoints):
            n = len(ep)
            if n == 0 or n > emax or n & 15:
                raise self._endpoint_error(i, ep)
            if stored is None or ep not in stored:
                fresh += 1
        if aff is None and cluster is not None and len(cluster.affiliates) >= lim.affiliates_per_cluster_max:
            raise self._cluster_full_error(len(cluster.affiliates))
        if fresh:
            have = len(stored) if stored is not None else 0
            if have + fresh > lim.endpoints_per_affiliate_max:
                # Duplicates inside the request count once: compute exactly (rare path).
                fresh = len({ep for ep in endpoints if stored is None or ep not in stored})
                if have + fresh > lim.endpoints_per_affiliate_max:
                    raise self._endpoints_full_error(have + fresh)
        # --- journal (may raise: still nothing changed), then apply (cannot fail).
        if journal is not None:
            journal.record_update(cluster_id, affiliate_id, data, endpoints, raw_ttl)
        expiration = now + ttl
        if cluster is None:
            cluster = self._clusters[cluster_id] = _Cluster()
        if aff is None:
            aff = cluster.affiliates[affiliate_id] = _Affiliate(data or b"", expiration)
            self._n_affs += 1
            changed = True
        else:
            changed = False
            if data and data != aff.data:
                aff.data = data
                changed = True
            if aff.expiration < expiration:
                aff.expiration = expiration
        if endpoints:
            eps = aff.endpoints
            for ep in endpoints:
                old = eps.get(ep)
                if old is None:
                    eps[ep] = expiration
                    self._n_eps += 1
                    if expiration < aff.ep_min:
                        aff.ep_min = expiration
                    changed = True
                elif old < expiration:
                    eps[ep] = expiration
        if changed:
            aff.view = None
            if cluster.subscribers:
                self._publish(cluster, Change(affiliate_id, _view(affiliate_id, aff)))
        return changed

    def validate_update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: Sequence[bytes],
        ttl: float,
        stored: Iterable[bytes] | None,
        cluster_size: int | None,
    ) -> None:
        """The checks of :meth:`update` against state held elsewhere (the etcd store): ``stored`` is the
        affiliate's current endpoints (None: the affiliate is new), ``cluster_size`` the affiliates its
        cluster holds (None: check only what does not depend on the state). Raises the same
        :class:`RegistryError` as :meth:`update` would, in the same order. Keep in step with
        :meth:`_update_at`."""
        lim = self._limits
        self._check_id(cluster_id, "cluster_id", lim.cluster_id_max)
        self._check_id(affiliate_id, "affiliate_id", lim.affiliate_id_max)
        if data and len(data) > lim.affiliate_data_max:
            raise self._data_error(len(data))
        if not ttl <= lim.ttl_max:
            raise self._ttl_error(ttl)
        have = frozenset(stored) if stored is not None else frozenset()
        emax = lim.endpoint_max
        fresh: set[bytes] = set()
        for i, ep in enumerate(endpoints):
            n = len(ep)
            if n == 0 or n > emax or n & 15:
                raise self._endpoint_error(i, ep)
            if ep not in have:
                fresh.add(ep)
        if cluster_size is None:
            return
        if stored is None and cluster_size >= lim.affiliates_per_cluster_max:
            raise self._cluster_full_error(cluster_size)
        if len(have) + len(fresh) > lim.endpoints_per_affiliate_max:
            raise self._endpoints_full_error(len(have) + len(fresh))

    def drop_endpoints(self, cluster_id: str, affiliate_id: str, endpoints: Iterable[bytes]) -> bool:
        """Remove these endpoints of one affiliate (a store told us they expired); True (and watchers
        get the updated affiliate) if any was there."""
        cluster = self._clusters.get(cluster_id)
        aff = cluster.affiliates.get(affiliate_id) if cluster is not None else None
        if cluster is None or aff is None:
            return False
        eps = aff.endpoints
        dropped = 0
        for ep in endpoints:
            if eps.pop(ep, None) is not None:
                dropped += 1
        if not dropped:
            return False
        self._n_eps -= dropped
        aff.ep_min = min(eps.values(), default=_INF)
        aff.view = None
        if cluster.subscribers:
            self._publish(cluster, Change(affiliate_id, _view(affiliate_id, aff)))
        return True

    def replay_update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: Sequence[bytes],
        ttl: float,
        age: float,
    ) -> bool:
        """Re-apply an update that was accepted ``age`` seconds ago (journal replay).

        The update is applied at the virtual time ``now - age`` so its TTLs
        count from when it was accepted. Before applying it, what GC would have
        removed by then from the affected affiliate is removed, so an update
        that was accepted is not rejected because of stale endpoints or
        affiliates. Raises :class:`RegistryError` when it violates the current
        limits anyway.
        """
        now = self._clock() - max(age, 0.0)
        cluster = self._clusters.get(cluster_id)
        if cluster is not None:
            aff = cluster.affiliates.get(affiliate_id)
            if aff is not None:
                self._expire_affiliate(cluster, affiliate_id, aff, now, GcStats())
        try:
            return self._update_at(now, cluster_id, affiliate_id, data, endpoints, ttl)
        except RegistryError as e:
            if cluster is None or e.field != "affiliates":
                raise
            self._gc_cluster(cluster, now, GcStats())
            return self._update_at(now, cluster_id, affiliate_id, data, endpoints, ttl)

    def delete(self, cluster_id: str, affiliate_id: str, journal: Journal | None = None) -> bool:
        """Remove an affiliate; idempotent. True if it existed (watchers are then notified).

        With a ``journal``, ``journal.record_delete`` is called when the
        affiliate exists, before it is removed; if it raises, nothing changes.
        """
        lim = self._limits
        self._check_id(cluster_id, "cluster_id", lim.cluster_id_max)
        self._check_id(affiliate_id, "affiliate_id", lim.affiliate_id_max)
        cluster = self._clusters.get(cluster_id)
        if cluster is None or affiliate_id not in cluster.affiliates:
            return False
        if journal is not None:
            journal.record_delete(cluster_id, affiliate_id)
        aff = cluster.affiliates.pop(affiliate_id)
        self._n_affs -= 1
        self._n_eps -= len(aff.endpoints)
        if cluster.subscribers:
            self._publish(cluster, Change(affiliate_id, None))
        return True

    def _publish(self, cluster: _Cluster, change: Change) -> None:
        buf = self._buf
        buf_bytes = self._buf_bytes
        size = change_size(change)
        lost: list[Subscription] | None = None
        for sub in tuple(cluster.subscribers):
            pending = sub._pending
            pending.append(change)
            sub._pending_bytes += size
            if len(pending) > buf or sub._pending_bytes > buf_bytes:
                sub.lost = True
                sub._pending = []
                sub._pending_bytes = 0
                if lost is None:
                    lost = [sub]
                else:
                    lost.append(sub)
            waker = sub.waker
            if waker is not None:
                waker()
        if lost is not None:
            subs = cluster.subscribers
            for sub in lost:
                if subs.pop(sub, False) is None:
                    self._n_subs -= 1
                sub._detach()

    # ------------------------------------------------------------------ queries

    def _cluster_for(self, cluster_id: str) -> _Cluster:
        self._check_id(cluster_id, "cluster_id", self._limits.cluster_id_max)
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            cluster = self._clusters[cluster_id] = _Cluster()
        return cluster

    def list(self, cluster_id: str) -> list[AffiliateView]:
        """Every affiliate of the cluster (including data-less ones); creates the cluster."""
        cluster = self._cluster_for(cluster_id)
        return [aff.view or _view(aid, aff) for aid, aff in cluster.affiliates.items()]

    def subscribe(self, cluster_id: str) -> Subscription:
        """Atomically take a snapshot of the cluster and start queueing its changes."""
        cluster = self._cluster_for(cluster_id)
        snapshot = [aff.view or _view(aid, aff) for aid, aff in cluster.affiliates.items()]
        sub = Subscription(self, cluster, cluster_id, snapshot)
        cluster.subscribers[sub] = None
        self._n_subs += 1
        return sub

    def stats(self) -> tuple[int, int, int, int]:
        """(clusters, affiliates, endpoints, subscriptions), O(1)."""
        return len(self._clusters), self._n_affs, self._n_eps, self._n_subs

    # ------------------------------------------------------------------ GC

    def _expire_affiliate(
        self, cluster: _Cluster, aid: str, aff: _Affiliate, now: float, st: GcStats
    ) -> bool:
        """Apply GC at ``now`` to one affiliate; True if the affiliate was removed."""
        if aff.expiration <= now:
            del cluster.affiliates[aid]
            n = len(aff.endpoints)
            self._n_affs -= 1
            self._n_eps -= n
            st.affiliates += 1
            st.endpoints += n
            if cluster.subscribers:
                self._publish(cluster, Change(aid, None))
            return True
        if aff.ep_min <= now:
            eps = aff.endpoints
            keep = {ep: exp for ep, exp in eps.items() if exp > now}
            dropped = len(eps) - len(keep)
            aff.ep_min = min(keep.values(), default=_INF)
            if dropped:
                aff.endpoints = keep
                aff.view = None
                self._n_eps -= dropped
                st.endpoints += dropped
                if cluster.subscribers:
                    self._publish(cluster, Change(aid, _view(aid, aff)))
        return False

    def _gc_cluster(self, cluster: _Cluster, now: float, st: GcStats) -> None:
        affs = cluster.affiliates
        todo = [(aid, aff) for aid, aff in affs.items() if aff.expiration <= now or aff.ep_min <= now]
        for aid, aff in todo:
            self._expire_affiliate(cluster, aid, aff, now, st)

    def gc(self) -> GcStats:
        """Remove expired affiliates and endpoints, then empty clusters nobody watches."""
        now = self._clock()
        st = GcStats()
        dead: list[str] = []
        for cid, cluster in self._clusters.items():
            self._gc_cluster(cluster, now, st)
            if not cluster.affiliates and not cluster.subscribers:
                dead.append(cid)
        for cid in dead:
            del self._clusters[cid]
        st.clusters = len(dead)
        return st

    # ------------------------------------------------------------------ snapshots

    def export_snapshot(self) -> bytes:
        """Serialize the live state as an upstream ``StateSnapshot`` with relative TTLs."""
        return self.export_snapshot_with_counts()[0]

    def export_snapshot_with_counts(self) -> tuple[bytes, int, int, int]:
        """Like :meth:`export_snapshot`, plus the (clusters, affiliates, endpoints) written.

        Encoded by hand (the upstream message layout, fields in number order,
        byte-identical to ``SerializeToString``); expired entries are skipped
        and TTLs are rounded to the millisecond.
        """
        now = self._clock()
        out: list[bytes] = []
        durations: dict[float, bytes] = {}
        n_clusters = n_affs = n_eps = 0
        for cid, cluster in self._clusters.items():
            parts: list[bytes] = []
            for aid, aff in cluster.affiliates.items():
                exp = aff.expiration
                if exp <= now:
                    continue
                dur = durations.get(exp)
                if dur is None:
                    dur = durations[exp] = _duration_body(exp - now)
                ab = aid.encode()
                ap = [b"\x0a", _vlen(len(ab)), ab]
                data = aff.data
                if data:
                    ap += (b"\x1a", _vlen(len(data)), data)
                for ep, eexp in aff.endpoints.items():
                    if eexp <= now:
                        continue
                    edur = durations.get(eexp)
                    if edur is None:
                        edur = durations[eexp] = _duration_body(eexp - now)
                    eb = b"".join((b"\x12", _vlen(len(ep)), ep, b"\x1a", _vlen(len(edur)), edur))
                    ap += (b"\x22", _vlen(len(eb)), eb)
                    n_eps += 1
                ap += (b"\x2a", _vlen(len(dur)), dur)
                a = b"".join(ap)
                parts += (b"\x12", _vlen(len(a)), a)
                n_affs += 1
            if not parts:
                continue
            cb = cid.encode()
            c = b"".join([b"\x0a", _vlen(len(cb)), cb, *parts])
            out += (b"\x0a", _vlen(len(c)), c)
            n_clusters += 1
        return b"".join(out), n_clusters, n_affs, n_eps

    def import_snapshot(
        self,
        data: bytes,
        now_wall: float | None = None,
        *,
        elapsed: float = 0.0,
        problems: builtins.list[str] | None = None,
    ) -> tuple[int, int, int]:
        """Merge a serialized ``StateSnapshot`` into the registry.

        Relative TTLs are reduced by ``elapsed`` seconds (how long ago the
        snapshot was taken, in the journal's notion of time); legacy absolute
        ``expiration`` timestamps are converted with the wall clock
        ``now_wall`` (default: ``time.time()``). Expired entries are dropped
        silently; entries that violate the limits are skipped and described in
        ``problems`` (by position, never by content); TTLs beyond the limit are
        clamped to it. Returns (clusters, affiliates, endpoints) imported.
        Raises :class:`SnapshotError` (importing nothing) if ``data`` does not
        decode.
        """
        try:
            snap = storage_pb2.StateSnapshot.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as e:
            raise SnapshotError(
                f"snapshot does not decode as StateSnapshot ({len(data)} bytes): {e}"
            ) from None
        wall = time.time() if now_wall is None else now_wall
        now = self._clock()
        lim = self._limits
        report = problems if problems is not None else []
        n_clusters = n_affs = n_eps = 0

        def remaining(msg: storage_pb2.AffiliateSnapshot | storage_pb2.EndpointSnapshot) -> float:
            if msg.HasField("ttl"):
                rem = _duration_seconds(msg.ttl.seconds, msg.ttl.nanos) - elapsed
            elif msg.HasField("expiration"):
                rem = _duration_seconds(msg.expiration.seconds, msg.expiration.nanos) - wall
            else:
                return 0.0
            return min(rem, lim.ttl_max)

        for ci, cs in enumerate(snap.clusters):
            try:
                self._check_id(cs.id, "cluster_id", lim.cluster_id_max)
            except RegistryError as e:
                report.append(f"snapshot cluster #{ci}: skipped: {e}")
                continue
            imported_here = 0
            for ai, asnap in enumerate(cs.affiliates):
                where = f"snapshot cluster #{ci} affiliate #{ai}"
                try:
                    self._check_id(asnap.id, "affiliate_id", lim.affiliate_id_max)
                except RegistryError as e:
                    report.append(f"{where}: skipped: {e}")
                    continue
                if len(asnap.data) > lim.affiliate_data_max:
                    report.append(
                        f"{where}: skipped: affiliate_data: {len(asnap.data)} bytes exceeds the limit of "
                        f"{lim.affiliate_data_max}"
                    )
                    continue
                rem = remaining(asnap)
                if not rem > 0:
                    continue
                eps: dict[bytes, float] = {}
                for ei, esnap in enumerate(asnap.endpoints):
                    ep = esnap.data
                    n = len(ep)
                    if n == 0 or n > lim.endpoint_max or n & 15:
                        report.append(f"{where}: endpoint #{ei} skipped: {self._endpoint_error(ei, ep)}")
                        continue
                    erem = remaining(esnap)
                    if not erem > 0:
                        continue
                    eexp = now + erem
                    if eps.get(ep, -_INF) < eexp:
                        eps[ep] = eexp
                got = self._merge_imported(cs.id, asnap.id, asnap.data, now + rem, eps, where, report)
                if got is not None:
                    n_affs += 1
                    n_eps += got
                    imported_here += 1
            if imported_here:
                n_clusters += 1
        return n_clusters, n_affs, n_eps

    def _merge_imported(
        self,
        cluster_id: str,
        aid: str,
        data: bytes,
        expiration: float,
        eps: dict[bytes, float],
        where: str,
        report: builtins.list[str],
    ) -> int | None:
        """Merge one validated snapshot entry; return the endpoints added, or None if skipped."""
        lim = self._limits
        cluster = self._clusters.get(cluster_id)
        aff = cluster.affiliates.get(aid) if cluster is not None else None
        if aff is None and cluster is not None and len(cluster.affiliates) >= lim.affiliates_per_cluster_max:
            report.append(
                f"{where}: skipped: affiliates: the cluster limit of {lim.affiliates_per_cluster_max} is reached"
            )
            return None
        if cluster is None:
            cluster = self._clusters[cluster_id] = _Cluster()
        changed = False
        if aff is None:
            aff = cluster.affiliates[aid] = _Affiliate(data, expiration)
            self._n_affs += 1
            changed = True
        else:
            if data and data != aff.data:
                aff.data = data
                changed = True
            if aff.expiration < expiration:
                aff.expiration = expiration
        stored = aff.endpoints
        added = skipped = 0
        for ep, eexp in eps.items():
            old = stored.get(ep)
            if old is None:
                if len(stored) >= lim.endpoints_per_affiliate_max:
                    skipped += 1
                    continue
                stored[ep] = eexp
                added += 1
                if eexp < aff.ep_min:
                    aff.ep_min = eexp
            elif old < eexp:
                stored[ep] = eexp
        if skipped:
            report.append(
                f"{where}: {skipped} endpoint(s) skipped: affiliate_endpoints: the limit of "
                f"{lim.endpoints_per_affiliate_max} is reached"
            )
        if added:
            self._n_eps += added
            changed = True
        if changed:
            aff.view = None
            if cluster.subscribers:
                self._publish(cluster, Change(aid, _view(aid, aff)))
        return added

    # ------------------------------------------------------------------ introspection (tests, debugging)

    def expirations(self, cluster_id: str, affiliate_id: str) -> tuple[float, dict[bytes, float]] | None:
        """(affiliate expiration, {endpoint: expiration}) on the registry clock, or None."""
        cluster = self._clusters.get(cluster_id)
        aff = cluster.affiliates.get(affiliate_id) if cluster is not None else None
        if aff is None:
            return None
        return aff.expiration, dict(aff.endpoints)

    def cluster_ids(self) -> Iterable[str]:
        """The IDs of the clusters currently held (including empty ones awaiting GC)."""
        return tuple(self._clusters)
