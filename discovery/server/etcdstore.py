"""The etcd store: stateless registry replicas that share one etcd v3 cluster (issue 15).

Keys (:mod:`discovery.server.etcdkeys`): one per affiliate data blob, one per encrypted endpoint (so
etcd expires each on its own), one per bucket lease, one barrier key per replica.

TTL: one lease per time bucket of ``bucket`` seconds, never one per key. A key that must live until
``now + ttl`` goes on bucket ``floor((now + ttl) / bucket) + 1``, whose lease ends at that bucket's end:
expiry never early, at most one bucket late. A write happens only for new data, a new endpoint, or a
key that must move to a later bucket; an unchanged refresh within its bucket writes nothing.

Every update reads the affiliate, its endpoints, the cluster's affiliate count and the bucket leases at
one revision R, validates with :class:`Registry`'s rules (same errors), then commits a Txn guarded by
compares (a new affiliate: no affiliate of the cluster created after R, and the key still absent; an
existing one: its data key unchanged since R; new endpoints: no endpoint of it created after R), and
retries on conflict: the per-cluster and per-affiliate limits hold exactly across replicas.

The fast path (:meth:`EtcdBackend._fast_update`): an affiliate the mirror holds is updated without that
read, planned on the mirror's view at its applied revision A with the same guards taken at A; writes of
different affiliates share Txns (:mod:`discovery.server.groupcommit`). A failed compare, a lost lease
or a validation error on that view falls back to the read path.

Each replica mirrors the whole prefix in a :class:`Registry` (TTL GC off: entries leave only on etcd
DELETE events) fed by one etcd watch, and hands out the mirror's subscriptions for Watch. An update is
acknowledged after etcd committed it and the mirror applied its revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from discovery.etcd.client import (
    Compare,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdIndeterminate,
    EtcdLeaseNotFound,
    EtcdUnavailable,
    Event,
    EventType,
    KeyValue,
    Op,
    RangeResult,
    TLSFiles,
)
from discovery.limits import DEFAULT_LIMITS, Limits
from discovery.server.backend import StoreUnavailable
from discovery.server.etcdkeys import (
    affiliate_key,
    affiliate_prefix,
    barrier_key,
    cluster_prefix,
    endpoint_prefix,
    escape_id,
    lease_key,
    parse_key,
)
from discovery.server.groupcommit import GroupCommit
from discovery.server.state import AffiliateView, GcStats, Registry, RegistryError, Subscription
from spanutil.logs import log_event

__all__ = ["DEFAULT_BUCKET", "DEFAULT_PREFIX", "EtcdBackend", "StoreMetrics", "escape_id"]

log = logging.getLogger("discovery.server.etcd")

DEFAULT_PREFIX = "/discovery/"
DEFAULT_BUCKET = 60.0  # seconds per shared lease
PROBE_INTERVAL = 1.0
CONTENTION_TIMEOUT = 30.0  # how long an update retries Txns that lost to concurrent writes
_INF = math.inf


def _mirror_limits(limits: Limits) -> Limits:
    """The mirror holds whatever etcd holds (checked when written): only the watch buffers bind."""
    big = 1 << 40
    return replace(
        limits,
        ttl_max=_INF,
        affiliates_per_cluster_max=big,
        endpoints_per_affiliate_max=big,
        affiliate_data_max=big,
        endpoint_max=1 << 20,
    )


class StoreMetrics:
    """``discovery_store_up`` (1 while etcd answers and the mirror follows it) and
    ``discovery_store_errors_total`` by operation."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.up = Gauge(
            "discovery_store_up",
            "1 while the registry store (etcd) answers and this replica's mirror follows it; 0: updates, "
            "deletes, lists and new watches fail with UNAVAILABLE.",
            registry=r,
        )
        self.errors = Counter(
            "discovery_store_errors",
            "Store (etcd) operations that failed: etcd unreachable, outcome unknown, or a watch broke.",
            ["operation"],
            registry=r,
        )
        for op in ("update", "delete", "list", "watch", "probe", "follow"):
            self.errors.labels(op)


@dataclass(slots=True)
class _Snap:
    """One affiliate, its endpoints, its cluster's size and the bucket leases at ``revision``."""

    revision: int
    data: KeyValue | None
    endpoints: dict[bytes, int]  # endpoint -> the lease its key is on
    cluster_size: int
    bucket_of: dict[int, int]  # lease id -> bucket
    lease_of: dict[int, int]  # bucket -> lease id


@dataclass(slots=True)
class _Known:
    """What the mirror last applied of one affiliate's keys (from the watch): the data key, and the
    lease of each endpoint key."""

    data: KeyValue | None = None
    endpoints: dict[bytes, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    data: bytes | None = None
    add: list[bytes] = field(default_factory=list)
    drop: list[bytes] = field(default_factory=list)
    deleted: bool = False


class EtcdBackend:
    """The registry on etcd. ``await start()`` before use (it does not wait for etcd: until etcd
    answers, calls fail with :class:`StoreUnavailable` and :meth:`health` says why)."""

    kind = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str] = (),
        *,
        prefix: str = DEFAULT_PREFIX,
        tls: TLSFiles | None = None,
        limits: Limits = DEFAULT_LIMITS,
        bucket: float = DEFAULT_BUCKET,
        timeout: float = 5.0,
        metrics: CollectorRegistry | None = None,
        client: EtcdClient | None = None,
        clock: Callable[[], float] = time.time,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        if bucket <= 0:
            raise ValueError("the lease bucket must be positive")
        self.client = client or EtcdClient(endpoints, namespace=prefix, tls=tls, timeout=timeout)
        self._limits = limits
        self._rules = Registry(limits)  # validation only
        self.mirror = Registry(_mirror_limits(limits))
        self.bucket = bucket
        self.timeout = timeout
        self.clock = clock
        self.probe_interval = probe_interval
        self.metrics = StoreMetrics(metrics)
        self.replica_id = uuid.uuid4().hex
        self.applied = 0  # the etcd revision the mirror has applied
        self.synced = False
        self.resyncs = 0
        self.on_health_change: Callable[[str | None], None] | None = None
        self._problem: str | None = "not connected to etcd yet"
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._leases: dict[int, int] = {}  # bucket -> lease id (change only through _set_lease)
        self._bucket_of: dict[int, int] | None = None  # lease id -> bucket, built from _leases on demand
        self._lease_tasks: dict[int, asyncio.Task[int]] = {}
        self._admit: dict[str, asyncio.Lock] = {}
        self._known: dict[tuple[str, str], _Known] = {}  # see _fast_update
        self.fast_updates = 0  # updates committed without a read first
        self.commits = GroupCommit(
            self.client,
            lambda: self.applied,
            lambda rev, n: self._wait_applied(rev, "update", n),
            self._spawn,
        )
        self.slow_updates = 0  # updates that read first (new affiliates, conflicts, unknown leases)
        self._barrier_next: asyncio.Future[int] | None = None
        self._barrier_running: asyncio.Future[int] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.metrics.up.set(0)

    # -- Backend: plumbing

    @property
    def limits(self) -> Limits:
        return self._limits

    def validate_ids(self, cluster_id: str, affiliate_id: str | None = None) -> None:
        self._rules.validate_ids(cluster_id, affiliate_id)

    def stats(self) -> tuple[int, int, int, int]:
        return self.mirror.stats()

    def gc(self) -> GcStats:
        """etcd expires keys itself; this only drops the mirror's empty, unwatched clusters (and idle
        admission locks)."""
        for cid in [c for c, lock in self._admit.items() if not lock.locked()]:
            del self._admit[cid]
        return self.mirror.gc()

    def health(self) -> str | None:
        return self._problem

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._probe())]

    async def wait_ready(self, within: float) -> bool:
        """Wait until the mirror has loaded etcd and etcd answers (False after ``within`` seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not (self.synced and self._problem is None):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in (*tasks, *self._background, *self._lease_tasks.values()):
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(StoreUnavailable("registry store stopped"))
        self._waiters.clear()
        self.commits.fail_all(StoreUnavailable("registry store stopped"))
        await self.client.close()

    def _set_problem(self, problem: str | None) -> None:
        if problem == self._problem:
            return
        before, self._problem = self._problem, problem
        self.metrics.up.set(0 if problem else 1)
        if problem:
            level = logging.ERROR if "unreachable" in problem else logging.INFO
            log_event(log, "registry store (etcd) unavailable", level, reason=problem)
        else:
            log_event(log, "registry store (etcd) available", previously=before)
        if self.on_health_change is not None:
            self.on_health_change(problem)

    def _unavailable(self, op: str, e: Exception) -> StoreUnavailable:
        self.metrics.errors.labels(op).inc()
        reason = f"etcd: {e}"
        if isinstance(e, EtcdUnavailable) and not isinstance(e, EtcdIndeterminate):
            self._set_problem(f"etcd unreachable: {e}")
        return StoreUnavailable(f"registry store unavailable: {reason}")

    # -- Backend: RPCs

    async def update(
        self, cluster_id: str, affiliate_id: str, data: bytes | None, endpoints: Sequence[bytes], ttl: float
    ) -> bool:
        """Validate, then commit what changed (see the module doc); True if something visible changed."""
        # What does not depend on the state is refused without a round trip (and while etcd is down).
        self._rules.validate_update(cluster_id, affiliate_id, data, endpoints, ttl, None, None)
        ttl = max(ttl, 0.0)
        snap = self._known_snap(cluster_id, affiliate_id)
        if snap is not None:
            done = await self._fast_update(snap, cluster_id, affiliate_id, data, endpoints, ttl)
            if done is not None:
                self.fast_updates += 1
                return done
        self.slow_updates += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        # Conflicts are retried for longer than one etcd call may take (the client's deadline binds too).
        give_up = loop.time() + CONTENTION_TIMEOUT
        lock: asyncio.Lock | None = None
        try:
            for attempt in itertools.count():
                if lock is None and (attempt or self.mirror.expirations(cluster_id, affiliate_id) is None):
                    # Adds to one cluster conflict with each other: take turns within this replica,
                    # but never past this call's deadline (while etcd is down, each add ahead of us
                    # waits out its own: UNAVAILABLE in time, not the client's DEADLINE_EXCEEDED).
                    turn = self._admit.setdefault(cluster_id, asyncio.Lock())
                    try:
                        async with asyncio.timeout(max(0.0, deadline - loop.time())):
                            await turn.acquire()
                    except TimeoutError:
                        self.metrics.errors.labels("update").inc()
                        raise StoreUnavailable(
                            "registry store unavailable: etcd did not answer in time (adds queued)"
                        ) from None
                    lock = turn
                snap = await self._read(cluster_id, affiliate_id, deadline)
                if snap.data is not None and lock is not None:
                    self._unlock(cluster_id, lock)
                    lock = None
                plan = await self._plan(snap, cluster_id, affiliate_id, data, endpoints, ttl)
                if plan is None:
                    return False
                compares, ops, changed, bucket = plan
                try:
                    res = await self.client.txn(compares, ops)
                except EtcdLeaseNotFound:
                    self._set_lease(bucket, None)
                    continue
                except EtcdError as e:
                    raise self._unavailable("update", e) from None
                if res.succeeded:
                    if lock is not None:
                        self._unlock(cluster_id, lock)
                        lock = None
                    await self._wait_applied(res.revision, "update")
                    return changed
                if loop.time() > give_up:
                    self.metrics.errors.labels("update").inc()
                    raise StoreUnavailable("registry store unavailable: too many conflicting writes; retry")
                deadline = loop.time() + self.timeout
                await asyncio.sleep(random.uniform(0, min(0.001 * attempt, 0.02)))
        finally:
            if lock is not None:
                self._unlock(cluster_id, lock)
        raise AssertionError("unreachable")

    def _unlock(self, cluster_id: str, lock: asyncio.Lock) -> None:
        lock.release()

    def _known_snap(self, cid: str, aid: str) -> _Snap | None:
        """The affiliate as the mirror last applied it (at revision ``applied``), if it exists there
        and every lease its keys are on is known; else None (read etcd first)."""
        if not self.synced:
            return None
        known = self._known.get((cid, aid))
        if known is None or known.data is None:
            return None
        bucket_of = self._bucket_of
        if bucket_of is None:
            bucket_of = self._bucket_of = {lid: b for b, lid in self._leases.items()}
        if known.data.lease not in bucket_of or any(lid not in bucket_of for lid in known.endpoints.values()):
            return None
        # Live views, not copies: the plan reads them before its first await (a lease creation, after
        # which only the writes it planned are used), so they are the state at ``applied``.
        return _Snap(self.applied, known.data, known.endpoints, 0, bucket_of, self._leases)

    async def _fast_update(
        self, snap: _Snap, cid: str, aid: str, data: bytes | None, endpoints: Sequence[bytes], ttl: float
    ) -> bool | None:
        """One guarded Txn planned on the mirror's view instead of a read: the data key's mod revision
        must be the one the mirror applied (so it still exists, unchanged), and new endpoints need no
        endpoint of the affiliate created after the mirror's revision, the same compares the read path
        makes at its read revision. None: fall back to the read path (a compare failed, a lease is gone,
        or validation refused on a view that may be stale: the read path decides on etcd's state)."""
        assert snap.data is not None
        try:
            plan = await self._plan(snap, cid, aid, data, endpoints, ttl)
        except RegistryError:
            return None
        if plan is None:
            # Nothing to write if the data key is still the one the mirror saw (a linearizable read).
            try:
                res = await self.client.txn(
                    [Compare.mod(affiliate_key(cid, aid), "==", snap.data.mod_revision)]
                )
            except EtcdIndeterminate:
                return None
            except EtcdError as e:
                raise self._unavailable("update", e) from None
            return False if res.succeeded else None
        compares, ops, changed, bucket = plan
        try:
            succeeded = await self.commits.commit((cid, aid), compares, ops)
        except EtcdLeaseNotFound:
            self._set_lease(bucket, None)
            return None
        except EtcdError as e:
            raise self._unavailable("update", e) from None
        return changed if succeeded else None

    async def _read(self, cid: str, aid: str, deadline: float) -> _Snap:
        """The affiliate's keys, its cluster's size and the bucket leases, at one revision."""
        ops = [
            Op.get(affiliate_key(cid, aid)),
            Op.get(endpoint_prefix(cid, aid), prefix=True),
            Op.get(affiliate_prefix(cid), prefix=True, count_only=True),
            Op.get("l/", prefix=True),
        ]
        loop = asyncio.get_running_loop()
        while True:
            try:
                res = await self.client.txn((), ops)
                break
            except EtcdIndeterminate as e:  # a read-only txn may be sent again, until the deadline
                if loop.time() > deadline:
                    raise self._unavailable("update", e) from None
            except EtcdError as e:
                raise self._unavailable("update", e) from None
        a, e, n, leases = (r for r in res.responses if isinstance(r, RangeResult))
        eps: dict[bytes, int] = {}
        for kv in e.kvs:
            parsed = parse_key(kv.key)
            if parsed is not None and parsed[2] is not None:
                eps[parsed[2]] = kv.lease
        bucket_of: dict[int, int] = {}
        lease_of: dict[int, int] = {}
        for kv in leases.kvs:
            with contextlib.suppress(ValueError):
                b, lid = int(kv.key[2:]), int(kv.value)
                bucket_of[lid] = b
                lease_of[b] = lid
        return _Snap(res.revision, a.kvs[0] if a.kvs else None, eps, n.count, bucket_of, lease_of)

    async def _plan(
        self,
        snap: _Snap,
        cid: str,
        aid: str,
        data: bytes | None,
        endpoints: Sequence[bytes],
        ttl: float,
    ) -> tuple[list[Compare], list[Op], bool, int] | None:
        """The guarded Txn for this update at ``snap`` (None: nothing to write); raises RegistryError."""
        exists = snap.data is not None
        self._rules.validate_update(
            cid, aid, data, endpoints, ttl, snap.endpoints.keys() if exists else None, snap.cluster_size
        )
        bucket = math.floor((self.clock() + ttl) / self.bucket) + 1

        def must_move(lease: int) -> bool:
            return snap.bucket_of.get(lease, -1) < bucket

        akey = affiliate_key(cid, aid)
        compares: list[Compare] = []
        # (key, value or None to keep it, keep the current lease)
        writes: list[tuple[str, bytes | None, bool]] = []
        changed = False
        if snap.data is None:
            compares += [
                Compare.version(akey, "==", 0),
                Compare.create(affiliate_prefix(cid), "<", snap.revision + 1, prefix=True),
            ]
            writes.append((akey, data or b"", False))
            changed = True
        else:
            compares.append(Compare.mod(akey, "==", snap.data.mod_revision))
            move = must_move(snap.data.lease)
            if data and data != snap.data.value:
                writes.append((akey, data, not move))
                changed = True
            elif move:
                writes.append((akey, None, False))
        eprefix = endpoint_prefix(cid, aid)
        fresh = False
        seen: set[bytes] = set()
        for ep in endpoints:
            if ep in seen:
                continue
            seen.add(ep)
            lease_id = snap.endpoints.get(ep)
            if lease_id is None:
                writes.append((eprefix + ep.hex(), b"", False))
                changed = fresh = True
            elif must_move(lease_id):
                writes.append((eprefix + ep.hex(), b"", False))  # the value is empty: a plain put
        if not writes:
            return None
        if fresh and snap.data is not None:
            compares.append(Compare.create(eprefix, "<", snap.revision + 1, prefix=True))
        lease = snap.lease_of.get(bucket) or await self._lease(bucket)
        ops = [
            Op.put(
                key, value or b"", lease=0 if keep else lease, ignore_value=value is None, ignore_lease=keep
            )
            for key, value, keep in writes
        ]
        return compares, ops, changed, bucket

    async def _lease(self, bucket: int) -> int:
        """The shared lease of ``bucket``: ours, another replica's, or a new one (created if absent)."""
        lid = self._leases.get(bucket)
        if lid is not None:
            return lid
        task = self._lease_tasks.get(bucket)
        if task is None:
            task = self._lease_tasks[bucket] = asyncio.create_task(self._create_lease(bucket))
            task.add_done_callback(lambda _: self._lease_tasks.pop(bucket, None))
        try:
            return await asyncio.shield(task)
        except EtcdError as e:
            raise self._unavailable("update", e) from None

    async def _create_lease(self, bucket: int) -> int:
        now = self.clock()
        for b in [b for b in self._leases if b * self.bucket < now]:
            self._set_lease(b, None)
        lease = await self.client.lease_grant(max(1, math.ceil(bucket * self.bucket - now)))
        key = lease_key(bucket)
        res = await self.client.txn(
            [Compare.version(key, "==", 0)],
            [Op.put(key, str(lease.id), lease=lease.id)],
            [Op.get(key)],
        )
        lid = lease.id
        if not res.succeeded:
            got = res.responses[0]
            assert isinstance(got, RangeResult) and got.kvs
            lid = int(got.kvs[0].value)
            self._spawn(self._revoke(lease.id))
        self._set_lease(bucket, lid)
        return lid

    async def _revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdError):
            await self.client.lease_revoke(lease_id)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def delete(self, cluster_id: str, affiliate_id: str) -> bool:
        self._rules.validate_ids(cluster_id, affiliate_id)
        try:
            res = await self.client.txn(
                (),
                [
                    Op.delete(affiliate_key(cluster_id, affiliate_id)),
                    Op.delete(endpoint_prefix(cluster_id, affiliate_id), prefix=True),
                ],
            )
        except EtcdError as e:
            raise self._unavailable("delete", e) from None
        deleted = sum(getattr(r, "deleted", 0) for r in res.responses)
        if deleted:
            await self._wait_applied(res.revision, "delete")
        return bool(getattr(res.responses[0], "deleted", 0))

    async def list(self, cluster_id: str) -> list[AffiliateView]:
        """Read from etcd (linearizable): every acknowledged update, on any replica, is in it."""
        self._rules.validate_ids(cluster_id)
        try:
            r = await self.client.range(cluster_prefix(cluster_id), prefix=True)
        except EtcdError as e:
            raise self._unavailable("list", e) from None
        return list(_views(r.kvs).get(cluster_id, {}).values())

    async def subscribe(self, cluster_id: str) -> Subscription:
        """The mirror's subscription, once the mirror has applied everything etcd acknowledged before
        this call (a barrier write, then its event): snapshot and deltas without a gap."""
        self._rules.validate_ids(cluster_id)
        await self._barrier()
        return self.mirror.subscribe(cluster_id)

    # -- read-your-writes

    async def _wait_applied(self, revision: int, op: str, count: int = 1) -> None:
        """Wait until the mirror applied ``revision`` (``count``: the operations that fail, for the
        error metric, if it does not in time)."""
        if self.applied >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, fut))
        try:
            async with asyncio.timeout(self.timeout):
                await fut
        except TimeoutError:
            self.metrics.errors.labels(op).inc(count)
            raise StoreUnavailable(
                f"registry store unavailable: etcd committed revision {revision} but this replica's watch "
                f"has not caught up (applied {self.applied}); retry"
            ) from None

    def _wake(self) -> None:
        applied = self.applied
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for rev, fut in self._waiters:
            if fut.done():
                continue
            if rev <= applied:
                fut.set_result(None)
            else:
                keep.append((rev, fut))
        self._waiters = keep

    async def _barrier(self) -> int:
        """Write this replica's barrier key and wait for its event; callers that arrive while one is
        being written share the next one (which starts after they arrived)."""
        fut = self._barrier_next
        if fut is None:
            fut = self._barrier_next = asyncio.ensure_future(self._barrier_after(self._barrier_running))
        return await asyncio.shield(fut)

    async def _barrier_after(self, previous: asyncio.Future[int] | None) -> int:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        self._barrier_running, self._barrier_next = self._barrier_next, None
        try:
            lease = await self._lease(math.floor(self.clock() / self.bucket) + 2)
            r = await self.client.put(barrier_key(self.replica_id), b"", lease=lease)
        except StoreUnavailable:
            raise
        except EtcdError as e:
            raise self._unavailable("watch", e) from None
        await self._wait_applied(r.revision, "watch")
        return r.revision

    # -- the mirror

    async def _probe(self) -> None:
        """Health: a linearizable read every ``probe_interval`` (needs a quorum)."""
        while True:
            try:
                async with asyncio.timeout(max(2.0, self.probe_interval)):
                    await self.client.range("l/", prefix=True, count_only=True)
                self._set_problem(None if self.synced else "registry mirror not synced with etcd yet")
            except (EtcdError, TimeoutError) as e:
                self.metrics.errors.labels("probe").inc()
                self._set_problem(f"etcd unreachable: {e or 'no answer'}")
            await asyncio.sleep(self.probe_interval)

    async def _follow(self, resync: bool = True) -> None:
        """Load the prefix (``resync``), then follow it from the next revision; resume after breaks;
        re-read after a compaction."""
        while True:
            try:
                if resync:
                    await self._resync()
                    resync = False
                w = self.client.watch(
                    "", prefix=True, start_revision=self.applied + 1, progress_notify=True, give_up_after=None
                )
                async with w:
                    async for batch in w:
                        if batch.events:
                            self._apply(batch.events)
                            self.applied = max(self.applied, batch.events[-1].revision)
                        else:
                            self.applied = max(self.applied, batch.revision)
                        self._wake()
            except asyncio.CancelledError:
                raise
            except EtcdCompacted as e:
                log_event(
                    log,
                    "etcd history compacted past this replica's watch: re-reading the registry",
                    logging.WARNING,
                    applied=self.applied,
                    compact_revision=e.compact_revision,
                )
                resync = True
            except Exception as e:
                self.metrics.errors.labels("follow").inc()
                log_event(log, "etcd watch failed; retrying", logging.WARNING, error=str(e))
                await asyncio.sleep(0.5)

    async def _resync(self) -> None:
        """Range the prefix at one revision, make the mirror equal to it (watchers get the differences
        as updates and deletes), and continue from there."""
        r = await self.client.range("c/", prefix=True)
        leases = await self.client.range("l/", prefix=True, revision=r.revision)
        for kv in leases.kvs:
            self._lease_event(EventType.PUT, kv)
        want = _views(r.kvs)
        known: dict[tuple[str, str], _Known] = {}
        for kv in r.kvs:
            self._know(known, EventType.PUT, kv)
        self._known = known
        mirror = self.mirror
        for cid in list(mirror.cluster_ids()):
            keep = want.get(cid, {})
            for view in mirror.list(cid):
                if view.id not in keep:
                    mirror.delete(cid, view.id)
        for cid, affs in want.items():
            have = {v.id: v for v in mirror.list(cid)}
            for aid, view in affs.items():
                old = have.get(aid)
                if old is not None and old.data and not view.data:
                    mirror.delete(cid, aid)  # deleted and re-created without data meanwhile
                    old = None
                old_eps = set(old.endpoints) if old is not None else set()
                self._mirror_update(cid, aid, view.data, [ep for ep in view.endpoints if ep not in old_eps])
                gone = old_eps.difference(view.endpoints)
                if gone:
                    mirror.drop_endpoints(cid, aid, gone)
        self.applied = max(self.applied, r.revision) if self.synced else r.revision
        self.synced = True
        self.resyncs += 1
        self._wake()

    def _mirror_update(self, cid: str, aid: str, data: bytes | None, eps: Sequence[bytes]) -> None:
        try:
            self.mirror.update(cid, aid, data or None, eps, _INF)
        except RegistryError as e:  # not written by a replica of ours: skip it
            log_event(log, "etcd key skipped", logging.WARNING, error=str(e))

    def _set_lease(self, bucket: int, lease_id: int | None) -> None:
        if lease_id is None:
            if self._leases.pop(bucket, None) is None:
                return
        elif self._leases.get(bucket) == lease_id:
            return
        else:
            self._leases[bucket] = lease_id
        self._bucket_of = None

    def _lease_event(self, kind: EventType, kv: KeyValue) -> None:
        with contextlib.suppress(ValueError):
            b = int(kv.key[2:])
            self._set_lease(b, int(kv.value) if kind is EventType.PUT else None)

    @staticmethod
    def _know(
        known: dict[tuple[str, str], _Known],
        kind: EventType,
        kv: KeyValue,
        parsed: tuple[str, str, bytes | None] | None = None,
    ) -> None:
        """Record one applied change of a ``c/`` key in ``known``."""
        if parsed is None:
            parsed = parse_key(kv.key)
            if parsed is None:
                return
        cid, aid, ep = parsed
        k = known.get((cid, aid))
        if kind is EventType.PUT:
            if k is None:
                k = known[(cid, aid)] = _Known()
            if ep is None:
                k.data = kv
            else:
                k.endpoints[ep] = kv.lease
            return
        if k is None:
            return
        if ep is None:
            k.data = None
        else:
            k.endpoints.pop(ep, None)
        if k.data is None and not k.endpoints:
            del known[(cid, aid)]

    def _apply(self, events: Sequence[Event]) -> None:
        """Apply one watch batch, one revision at a time; per affiliate and revision one change."""
        mirror = self.mirror
        for _, group in itertools.groupby(events, key=lambda ev: ev.revision):
            pending: dict[tuple[str, str], _Pending] = {}
            for ev in group:
                key = ev.kv.key
                if key.startswith(b"l/"):
                    self._lease_event(ev.type, ev.kv)
                    continue
                parsed = parse_key(key)
                if parsed is None:
                    continue
                self._know(self._known, ev.type, ev.kv, parsed)
                cid, aid, ep = parsed
                p = pending.get((cid, aid))
                if p is None:
                    p = pending[(cid, aid)] = _Pending()
                if ep is None:
                    if ev.type is EventType.PUT:
                        p.data = ev.kv.value
                    else:
                        p.deleted = True
                elif ev.type is EventType.PUT:
                    p.add.append(ep)
                else:
                    p.drop.append(ep)
            for (cid, aid), p in pending.items():
                if p.deleted:
                    mirror.delete(cid, aid)
                    continue
                if p.data is not None or p.add:
                    self._mirror_update(cid, aid, p.data, p.add)
                if p.drop:
                    mirror.drop_endpoints(cid, aid, p.drop)


def _views(kvs: Sequence[KeyValue]) -> dict[str, dict[str, AffiliateView]]:
    """cluster -> affiliate -> view, from ``c/`` keys: affiliates and endpoints in creation order."""
    data: dict[tuple[str, str], KeyValue] = {}
    eps: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
    for kv in kvs:
        parsed = parse_key(kv.key)
        if parsed is None:
            continue
        cid, aid, ep = parsed
        if ep is None:
            data[(cid, aid)] = kv
        else:
            eps.setdefault((cid, aid), []).append((kv.create_revision, ep))
    out: dict[str, dict[str, AffiliateView]] = {}
    for (cid, aid), kv in sorted(data.items(), key=lambda item: item[1].create_revision):
        mine = sorted(eps.get((cid, aid), ()), key=lambda item: item[0])
        out.setdefault(cid, {})[aid] = AffiliateView(aid, kv.value, tuple(ep for _, ep in mine))
    return out
