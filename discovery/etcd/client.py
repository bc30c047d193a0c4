"""A thin asyncio client for etcd v3 on grpc.aio and our own stubs (``spanapi.etcd``).

What the registry needs and nothing more: KV (range, put, delete, txn, compact), leases (grant, revoke,
one keep-alive, time-to-live), a watch that resumes after a broken stream, and member status.

- Several endpoints (``http://host:port``, ``https://host:port`` with an optional CA, client cert and
  key). A call goes to the current endpoint; on UNAVAILABLE or a lost connection it moves on to the next,
  round after round, until the call's deadline; then :class:`EtcdUnavailable`.
- Retries never change the outcome. Reads and lease calls are repeated freely (a lease granted twice
  leaves one to expire; a revoke repeated finds it gone). Writes (put, delete, txn) are repeated only
  when etcd surely did not take them (no connection, no leader): once sent, a write that times out or
  loses its connection may still be applied later, after a repeat and after other clients' writes, so
  the call raises :class:`EtcdIndeterminate` instead and the caller decides (re-read, or write again).
- A key prefix (``namespace``) puts every key under it, so several registries can share one etcd;
  keys the caller sees and passes never carry it.
- :meth:`EtcdClient.watch` follows a key or a range from a revision; when its stream breaks it opens a
  new one (on the next endpoint) from the last revision it delivered + 1, so the caller sees every event
  once, in order. A start revision older than the last compaction raises :class:`EtcdCompacted`.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio

from spanapi.etcd.etcdserverpb import rpc_pb2 as pb
from spanapi.etcd.etcdserverpb import rpc_pb2_grpc as pbg
from spanapi.etcd.mvccpb import kv_pb2 as mvccpb

log = logging.getLogger(__name__)

T = TypeVar("T")

# A full registry cluster is ~4.6 MB in one Range: above grpc's default 4 MiB receive limit.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
# etcd's server answers pings no more often than every 5 s (--grpc-keepalive-min-time).
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
# A member without a leader refuses our calls at once ("no leader": safe to send elsewhere) and ends our
# watch streams, instead of timing out or keeping the stream silent.
_REQUIRE_LEADER = (("hasleader", "true"),)
# UNAVAILABLE answers etcd gives before a request reaches raft: a write may be sent again.
_REFUSED_UNSEEN = ("etcdserver: no leader", "etcdserver: not capable", "etcdserver: unhealthy cluster")
# etcd never answers INTERNAL itself: grpc reports a connection that broke under a call with it too.
_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)
# watch(give_up_after=CLIENT_TIMEOUT): the client's timeout
CLIENT_TIMEOUT = -1.0


class EtcdError(Exception):
    """etcd refused a request (the gRPC status code and etcd's message are kept)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the deadline."""


class EtcdIndeterminate(EtcdUnavailable):
    """The connection broke after a txn was sent: it may or may not have been applied."""


class EtcdCompacted(EtcdError):
    """The revision asked for is compacted away. ``compact_revision`` is the oldest one still
    available (a watch learns it; a range at a compacted revision does not: then 0)."""

    def __init__(self, compact_revision: int, message: str = "") -> None:
        super().__init__(message or f"revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


class EtcdLeaseNotFound(EtcdError):
    """The lease does not exist (expired or revoked)."""


# --- values


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes  # without the client's namespace
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class EventType(enum.Enum):
    PUT = mvccpb.Event.PUT
    DELETE = mvccpb.Event.DELETE


_EVENT_TYPES = {t.value: t for t in EventType}


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    kv: KeyValue  # a DELETE carries the key and its mod_revision (the delete's revision) only
    prev_kv: KeyValue | None = None  # only when the watch asked for prev_kv

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int  # the store revision the range was read at
    kvs: list[KeyValue]
    count: int  # keys in the range, regardless of limit
    more: bool  # the limit cut the answer short


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    prev_kv: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    revision: int
    deleted: int
    prev_kvs: list[KeyValue] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TxnResult:
    revision: int
    succeeded: bool
    responses: list[RangeResult | PutResult | DeleteResult]


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # seconds


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    id: int
    ttl: int  # remaining seconds; -1 when the lease is gone
    granted_ttl: int
    keys: list[bytes]  # without the namespace (only with keys=True)


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: events in revision order, or a progress notification (no events): the
    watch has delivered everything up to ``revision``."""

    revision: int
    events: list[Event]

    @property
    def progress(self) -> bool:
        return not self.events


# --- txn builders

CompareOp = Literal["==", "!=", "<", ">"]
_RESULTS: dict[str, int] = {
    "==": pb.Compare.EQUAL,
    "!=": pb.Compare.NOT_EQUAL,
    "<": pb.Compare.LESS,
    ">": pb.Compare.GREATER,
}
_TARGETS: dict[str, tuple[str, int]] = {
    "version": ("version", pb.Compare.VERSION),
    "create": ("create_revision", pb.Compare.CREATE),
    "mod": ("mod_revision", pb.Compare.MOD),
    "value": ("value", pb.Compare.VALUE),
    "lease": ("lease", pb.Compare.LEASE),
}


@dataclass(frozen=True, slots=True)
class Compare:
    """One txn condition: ``<target of key> <op> <value>``; with ``prefix`` (or ``range_end``) it must
    hold for every key of the range. Build with :meth:`version`, :meth:`create`, :meth:`mod`,
    :meth:`value`, :meth:`lease`."""

    key: bytes
    target: Literal["version", "create", "mod", "value", "lease"]
    op: CompareOp
    operand: int | bytes
    prefix: bool = False
    range_end: bytes | None = None

    @classmethod
    def version(cls, key: bytes | str, op: CompareOp, version: int, *, prefix: bool = False) -> Compare:
        return cls(_b(key), "version", op, version, prefix)

    @classmethod
    def create(cls, key: bytes | str, op: CompareOp, revision: int, *, prefix: bool = False) -> Compare:
        return cls(_b(key), "create", op, revision, prefix)

    @classmethod
    def mod(cls, key: bytes | str, op: CompareOp, revision: int, *, prefix: bool = False) -> Compare:
        return cls(_b(key), "mod", op, revision, prefix)

    @classmethod
    def value(cls, key: bytes | str, op: CompareOp, value: bytes | str) -> Compare:
        return cls(_b(key), "value", op, _b(value))

    @classmethod
    def lease(cls, key: bytes | str, op: CompareOp, lease: int) -> Compare:
        return cls(_b(key), "lease", op, lease)


@dataclass(frozen=True, slots=True)
class Op:
    """One txn operation. Build with :meth:`get`, :meth:`put`, :meth:`delete`."""

    kind: Literal["range", "put", "delete"]
    key: bytes
    value: bytes = b""
    prefix: bool = False
    range_end: bytes | None = None
    lease: int = 0
    prev_kv: bool = False
    ignore_value: bool = False
    ignore_lease: bool = False
    limit: int = 0
    count_only: bool = False

    @classmethod
    def get(cls, key: bytes | str, *, prefix: bool = False, limit: int = 0, count_only: bool = False) -> Op:
        return cls("range", _b(key), prefix=prefix, limit=limit, count_only=count_only)

    @classmethod
    def put(
        cls,
        key: bytes | str,
        value: bytes | str = b"",
        *,
        lease: int = 0,
        prev_kv: bool = False,
        ignore_value: bool = False,
        ignore_lease: bool = False,
    ) -> Op:
        return cls(
            "put",
            _b(key),
            _b(value),
            lease=lease,
            prev_kv=prev_kv,
            ignore_value=ignore_value,
            ignore_lease=ignore_lease,
        )

    @classmethod
    def delete(cls, key: bytes | str, *, prefix: bool = False, prev_kv: bool = False) -> Op:
        return cls("delete", _b(key), prefix=prefix, prev_kv=prev_kv)


def _b(s: bytes | str) -> bytes:
    return s.encode() if isinstance(s, str) else bytes(s)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key above every key starting with ``prefix`` (b"\\0" = no end: all keys)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


# --- endpoints


@dataclass(frozen=True, slots=True)
class Endpoint:
    target: str  # host:port as grpc dials it
    secure: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """``http://host:port``, ``https://host:port`` or ``host:port`` (plain); IPv6 in brackets."""
        if "://" not in url:
            url = "http://" + url
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
            raise ValueError(f"etcd endpoint must be http(s)://host:port, not {url!r}")
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        return cls(f"{host}:{u.port or 2379}", u.scheme == "https")


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files for https endpoints: ``ca`` (default: the system's roots), a client ``cert`` + ``key``."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("an etcd client certificate needs both cert and key")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


class _Conn:
    """One endpoint's channel and stubs."""

    def __init__(self, index: int, channel: grpc.aio.Channel) -> None:
        self.index = index
        self.channel = channel
        self.kv = pbg.KVStub(channel)
        self.lease = pbg.LeaseStub(channel)
        self.watch = pbg.WatchStub(channel)
        self.maintenance = pbg.MaintenanceStub(channel)


# --- the client


class EtcdClient:
    """An asyncio etcd v3 client over several endpoints. Use as ``async with EtcdClient([...]) as c``
    (or call :meth:`close`).

    ``timeout``: how long one call may take, failovers included, before :class:`EtcdUnavailable`;
    ``connect_timeout``: how long to wait for one endpoint's connection before trying the next;
    ``attempt_timeout``: how long a read waits for one endpoint before trying the next."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        namespace: bytes | str = b"",
        tls: TLSFiles | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        attempt_timeout: float = 2.0,
        max_receive_bytes: int = MAX_RECEIVE_BYTES,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint")
        self.endpoints = [Endpoint.parse(e) for e in endpoints]
        self.namespace = _b(namespace)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.attempt_timeout = attempt_timeout
        self._tls = tls or TLSFiles()
        self._options = (*_CHANNEL_OPTIONS, ("grpc.max_receive_message_length", max_receive_bytes))
        self._conns: dict[int, _Conn] = {}
        self._current = 0
        self._closed = False

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            await c.channel.close()

    @property
    def current_endpoint(self) -> str:
        return self.endpoints[self._current].target

    # -- connection and failover

    def _conn(self, i: int) -> _Conn:
        c = self._conns.get(i)
        if c is None:
            if self._closed:
                raise EtcdError("client closed")
            ep = self.endpoints[i]
            if ep.secure:
                ch = grpc.aio.secure_channel(ep.target, self._tls.credentials(), options=self._options)
            else:
                ch = grpc.aio.insecure_channel(ep.target, options=self._options)
            c = self._conns[i] = _Conn(i, ch)
        return c

    def _advance(self, i: int) -> None:
        # Only the first of several concurrent failures on endpoint i moves on.
        if self._current == i:
            self._current = (i + 1) % len(self.endpoints)
            log.info("etcd: %s failed, trying %s", self.endpoints[i].target, self.current_endpoint)

    async def _ready(self, i: int, remaining: float) -> bool:
        try:
            async with asyncio.timeout(min(self.connect_timeout, remaining)):
                await self._conn(i).channel.channel_ready()
            return True
        except TimeoutError:
            return False

    async def _call(
        self,
        what: str,
        attempt: Callable[[_Conn, float], Awaitable[T]],
        *,
        retry_sent: bool,
        within: float | None = None,
    ) -> T:
        """Run ``attempt(conn, seconds)`` on the current endpoint, moving on to the next on UNAVAILABLE
        (a write, ``retry_sent=False``, only when etcd surely did not take it) until ``within`` (default:
        the client's ``timeout``)."""
        loop = asyncio.get_running_loop()
        limit = self.timeout if within is None else within
        deadline = loop.time() + limit
        last = "no endpoint tried"
        for n in itertools.count():
            if n and n % len(self.endpoints) == 0:
                await asyncio.sleep(min(0.1 * (n // len(self.endpoints)), 0.5))
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            i = self._current
            target = self.endpoints[i].target
            if not await self._ready(i, remaining):
                last = f"{target}: not connected"
                self._advance(i)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                return await attempt(
                    self._conn(i), min(remaining, self.attempt_timeout) if retry_sent else remaining
                )
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RETRY_CODES:
                    raise _translate(e) from None
                last = f"{target}: {e.code().name} {e.details()}"
                if not retry_sent and not any(r in (e.details() or "") for r in _REFUSED_UNSEEN):
                    raise EtcdIndeterminate(f"etcd {what}: outcome unknown ({last})", e.code()) from None
                self._advance(i)
        raise EtcdUnavailable(
            f"etcd {what}: no endpoint answered within {limit:g} s ({last})",
            grpc.StatusCode.UNAVAILABLE,
        )

    # -- namespace

    def _k(self, key: bytes | str) -> bytes:
        return self.namespace + _b(key)

    def _end(self, key: bytes, prefix: bool, range_end: bytes | None) -> bytes:
        if prefix:
            return prefix_end(self.namespace + key)
        if range_end is None:
            return b""
        if range_end == b"\0":  # every key >= key: within the namespace only
            return prefix_end(self.namespace) if self.namespace else b"\0"
        return self.namespace + range_end

    def _kv(self, kv: mvccpb.KeyValue) -> KeyValue:
        n = len(self.namespace)
        return KeyValue(kv.key[n:], kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)

    def _range_result(self, r: pb.RangeResponse) -> RangeResult:
        return RangeResult(r.header.revision, [self._kv(kv) for kv in r.kvs], r.count, r.more)

    def _put_result(self, r: pb.PutResponse) -> PutResult:
        return PutResult(r.header.revision, self._kv(r.prev_kv) if r.HasField("prev_kv") else None)

    def _delete_result(self, r: pb.DeleteRangeResponse) -> DeleteResult:
        return DeleteResult(r.header.revision, r.deleted, [self._kv(kv) for kv in r.prev_kvs])

    # -- KV

    def _range_request(
        self,
        key: bytes | str,
        *,
        prefix: bool = False,
        range_end: bytes | None = None,
        revision: int = 0,
        limit: int = 0,
        count_only: bool = False,
        keys_only: bool = False,
        serializable: bool = False,
    ) -> pb.RangeRequest:
        k = _b(key)
        return pb.RangeRequest(
            key=self.namespace + k,
            range_end=self._end(k, prefix, range_end),
            revision=revision,
            limit=limit,
            count_only=count_only,
            keys_only=keys_only,
            serializable=serializable,
        )

    async def range(
        self,
        key: bytes | str,
        *,
        prefix: bool = False,
        range_end: bytes | None = None,
        revision: int = 0,
        limit: int = 0,
        count_only: bool = False,
        keys_only: bool = False,
        serializable: bool = False,
    ) -> RangeResult:
        """Keys ``key`` alone, all keys starting with it (``prefix``), or ``[key, range_end)``
        (``range_end=b"\\0"``: every key from ``key`` on), in key order, at ``revision`` (0: now)."""
        req = self._range_request(
            key,
            prefix=prefix,
            range_end=range_end,
            revision=revision,
            limit=limit,
            count_only=count_only,
            keys_only=keys_only,
            serializable=serializable,
        )

        async def attempt(c: _Conn, t: float) -> pb.RangeResponse:
            return await c.kv.Range(req, timeout=t, metadata=_REQUIRE_LEADER)

        return self._range_result(await self._call("range", attempt, retry_sent=True))

    async def get(self, key: bytes | str, *, revision: int = 0) -> KeyValue | None:
        r = await self.range(key, revision=revision)
        return r.kvs[0] if r.kvs else None

    async def put(
        self,
        key: bytes | str,
        value: bytes | str = b"",
        *,
        lease: int = 0,
        prev_kv: bool = False,
        ignore_value: bool = False,
        ignore_lease: bool = False,
    ) -> PutResult:
        """Set ``key`` (on ``lease``; ``ignore_value``/``ignore_lease`` keep the current one). Raises
        :class:`EtcdIndeterminate` when it may or may not have been applied."""
        req = pb.PutRequest(
            key=self._k(key),
            value=_b(value),
            lease=lease,
            prev_kv=prev_kv,
            ignore_value=ignore_value,
            ignore_lease=ignore_lease,
        )

        async def attempt(c: _Conn, t: float) -> pb.PutResponse:
            return await c.kv.Put(req, timeout=t, metadata=_REQUIRE_LEADER)

        return self._put_result(await self._call("put", attempt, retry_sent=False))

    async def delete(
        self,
        key: bytes | str,
        *,
        prefix: bool = False,
        range_end: bytes | None = None,
        prev_kv: bool = False,
    ) -> DeleteResult:
        """Delete ``key``, a prefix, or ``[key, range_end)``. Raises :class:`EtcdIndeterminate` as
        :meth:`put` does."""
        k = _b(key)
        req = pb.DeleteRangeRequest(
            key=self.namespace + k, range_end=self._end(k, prefix, range_end), prev_kv=prev_kv
        )

        async def attempt(c: _Conn, t: float) -> pb.DeleteRangeResponse:
            return await c.kv.DeleteRange(req, timeout=t, metadata=_REQUIRE_LEADER)

        return self._delete_result(await self._call("delete", attempt, retry_sent=False))

    def _compare(self, c: Compare) -> pb.Compare:
        field_name, target = _TARGETS[c.target]
        return pb.Compare(
            result=_RESULTS[c.op],
            target=target,
            key=self.namespace + c.key,
            range_end=self._end(c.key, c.prefix, c.range_end),
            **{field_name: c.operand},
        )

    def _op(self, op: Op) -> pb.RequestOp:
        end = self._end(op.key, op.prefix, op.range_end)
        match op.kind:
            case "range":
                return pb.RequestOp(
                    request_range=pb.RangeRequest(
                        key=self.namespace + op.key, range_end=end, limit=op.limit, count_only=op.count_only
                    )
                )
            case "put":
                return pb.RequestOp(
                    request_put=pb.PutRequest(
                        key=self.namespace + op.key,
                        value=op.value,
                        lease=op.lease,
                        prev_kv=op.prev_kv,
                        ignore_value=op.ignore_value,
                        ignore_lease=op.ignore_lease,
                    )
                )
            case "delete":
                return pb.RequestOp(
                    request_delete_range=pb.DeleteRangeRequest(
                        key=self.namespace + op.key, range_end=end, prev_kv=op.prev_kv
                    )
                )

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op] = (), failure: Sequence[Op] = ()
    ) -> TxnResult:
        """If every ``compare`` holds, run ``success``, else ``failure``, atomically. Raises
        :class:`EtcdIndeterminate` when it may or may not have been applied."""
        req = pb.TxnRequest(
            compare=[self._compare(c) for c in compare],
            success=[self._op(o) for o in success],
            failure=[self._op(o) for o in failure],
        )

        async def attempt(c: _Conn, t: float) -> pb.TxnResponse:
            return await c.kv.Txn(req, timeout=t, metadata=_REQUIRE_LEADER)

        r = await self._call("txn", attempt, retry_sent=False)
        out: list[RangeResult | PutResult | DeleteResult] = []
        for op in r.responses:
            kind = op.WhichOneof("response")
            if kind == "response_range":
                out.append(self._range_result(op.response_range))
            elif kind == "response_put":
                out.append(self._put_result(op.response_put))
            elif kind == "response_delete_range":
                out.append(self._delete_result(op.response_delete_range))
        return TxnResult(r.header.revision, r.succeeded, out)

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Forget the history before ``revision`` (for every namespace: it is the whole store's)."""
        req = pb.CompactionRequest(revision=revision, physical=physical)

        async def attempt(c: _Conn, t: float) -> pb.CompactionResponse:
            return await c.kv.Compact(req, timeout=t, metadata=_REQUIRE_LEADER)

        await self._call("compact", attempt, retry_sent=True)

    # -- leases

    async def lease_grant(self, ttl: int, *, lease_id: int = 0) -> Lease:
        req = pb.LeaseGrantRequest(TTL=ttl, ID=lease_id)

        async def attempt(c: _Conn, t: float) -> pb.LeaseGrantResponse:
            return await c.lease.LeaseGrant(req, timeout=t, metadata=_REQUIRE_LEADER)

        # A grant repeated after a lost answer leaves an unused lease behind: it expires on its own.
        r = await self._call("lease grant", attempt, retry_sent=lease_id == 0)
        if r.error:
            raise EtcdError(f"etcd lease grant: {r.error}")
        return Lease(r.ID, r.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease: etcd deletes its keys (watches see DELETE events). A lease already gone
        raises :class:`EtcdLeaseNotFound`."""
        req = pb.LeaseRevokeRequest(ID=lease_id)
        tries = 0

        async def attempt(c: _Conn, t: float) -> pb.LeaseRevokeResponse:
            nonlocal tries
            tries += 1
            try:
                return await c.lease.LeaseRevoke(req, timeout=t, metadata=_REQUIRE_LEADER)
            except grpc.aio.AioRpcError as e:
                if tries > 1 and e.code() == grpc.StatusCode.NOT_FOUND:
                    return pb.LeaseRevokeResponse()  # our earlier try did it; its answer was lost
                raise

        await self._call("lease revoke", attempt, retry_sent=True)

    async def lease_keepalive_once(self, lease_id: int) -> int:
        """Renew the lease once; return its new TTL. Raises :class:`EtcdLeaseNotFound` when it is gone."""

        async def attempt(c: _Conn, t: float) -> pb.LeaseKeepAliveResponse:
            call = c.lease.LeaseKeepAlive(timeout=t, metadata=_REQUIRE_LEADER)
            try:
                await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
                r = await call.read()
            finally:
                call.cancel()
            if r is grpc.aio.EOF:
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "lease keepalive stream closed")
            return r

        r = await self._call("lease keepalive", attempt, retry_sent=True)
        if r.TTL <= 0:
            raise EtcdLeaseNotFound(f"etcd lease {lease_id:x} not found", grpc.StatusCode.NOT_FOUND)
        return r.TTL

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo:
        req = pb.LeaseTimeToLiveRequest(ID=lease_id, keys=keys)

        async def attempt(c: _Conn, t: float) -> pb.LeaseTimeToLiveResponse:
            return await c.lease.LeaseTimeToLive(req, timeout=t, metadata=_REQUIRE_LEADER)

        r = await self._call("lease time-to-live", attempt, retry_sent=True)
        n = len(self.namespace)
        mine = [k[n:] for k in r.keys if k.startswith(self.namespace)]
        return LeaseInfo(r.ID, r.TTL, r.grantedTTL, mine)

    # -- maintenance

    async def status(self, *, within: float | None = None) -> pb.StatusResponse:
        """The answering member's status (version, leader, db size, raft indexes)."""

        async def attempt(c: _Conn, t: float) -> pb.StatusResponse:
            return await c.maintenance.Status(pb.StatusRequest(), timeout=t)  # leader or not

        return await self._call("status", attempt, retry_sent=True, within=within)

    # -- watch

    def watch(
        self,
        key: bytes | str,
        *,
        prefix: bool = False,
        range_end: bytes | None = None,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress_notify: bool = False,
        filters: Sequence[Literal["noput", "nodelete"]] = (),
        give_up_after: float | None = CLIENT_TIMEOUT,
    ) -> Watch:
        """Follow ``key`` (or a prefix or range) from ``start_revision`` (0: from now on). Iterate the
        returned :class:`Watch` for :class:`WatchBatch` es. ``give_up_after``: seconds without any
        endpoint before the iteration raises :class:`EtcdUnavailable` (default: the client's
        ``timeout``; None: keep trying); to go on after that, or after :class:`EtcdCompacted` and a
        re-read, watch again from ``Watch.next_revision`` or the re-read's revision + 1."""
        k = _b(key)
        create = pb.WatchCreateRequest(
            key=self.namespace + k,
            range_end=self._end(k, prefix, range_end),
            start_revision=start_revision,
            prev_kv=prev_kv,
            progress_notify=progress_notify,
            filters=[
                pb.WatchCreateRequest.NOPUT if f == "noput" else pb.WatchCreateRequest.NODELETE
                for f in filters
            ],
        )
        return Watch(self, create, self.timeout if give_up_after == CLIENT_TIMEOUT else give_up_after)


class Watch:
    """An async iterator of :class:`WatchBatch` es that reopens its stream where it broke off.
    ``next_revision``: the first revision not delivered yet (0 until the first stream is open, when the
    watch started from now)."""

    def __init__(
        self, client: EtcdClient, create: pb.WatchCreateRequest, give_up_after: float | None
    ) -> None:
        self._client = client
        self._create = create
        self._give_up_after = give_up_after
        self.next_revision = create.start_revision
        self.reconnects = 0
        self._call: grpc.aio.StreamStreamCall | None = None
        self._closed = False
        self._it: AsyncGenerator[WatchBatch, None] | None = None

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchBatch:
        if self._it is None:
            self._it = self._run()
        return await anext(self._it)

    async def request_progress(self) -> None:
        """Ask etcd for a progress notification now (a batch without events, at the current revision)."""
        if self._call is not None:
            await self._call.write(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    async def aclose(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        if self._it is not None and not self._it.ag_running:
            await self._it.aclose()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _open(self) -> tuple[grpc.aio.StreamStreamCall, pb.WatchResponse, int]:
        """A new stream from next_revision, on the current endpoint or the next ones."""
        create = pb.WatchCreateRequest()
        create.CopyFrom(self._create)
        create.start_revision = self.next_revision

        async def attempt(c: _Conn, t: float) -> tuple[grpc.aio.StreamStreamCall, pb.WatchResponse, int]:
            call = c.watch.Watch(metadata=_REQUIRE_LEADER)
            try:
                await call.write(pb.WatchRequest(create_request=create))
                async with asyncio.timeout(t):
                    first = await call.read()
            except TimeoutError:
                call.cancel()
                raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to watch create") from None
            except BaseException:
                call.cancel()
                raise
            if first is grpc.aio.EOF:
                call.cancel()
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "watch stream closed by the server")
            return call, first, c.index

        within = float("inf") if self._give_up_after is None else self._give_up_after
        return await self._client._call("watch", attempt, retry_sent=True, within=within)

    def _batch(self, resp: pb.WatchResponse) -> WatchBatch | None:
        """What to deliver of one response (None: nothing) and where the watch then stands."""
        if resp.canceled:
            if resp.compact_revision:
                raise EtcdCompacted(resp.compact_revision)
            raise EtcdError(f"etcd watch canceled: {resp.cancel_reason or 'no reason given'}")
        if resp.created and not resp.events:
            if self.next_revision == 0:  # started "from now": now is known
                self.next_revision = resp.header.revision + 1
            return None
        if not resp.events:  # progress: everything up to header.revision has been sent
            self.next_revision = max(self.next_revision, resp.header.revision + 1)
            return WatchBatch(resp.header.revision, [])
        kv = self._client._kv
        types = _EVENT_TYPES
        nxt = self.next_revision
        events = [
            Event(types[e.type], kv(e.kv), kv(e.prev_kv) if e.HasField("prev_kv") else None)
            for e in resp.events
            if e.kv.mod_revision >= nxt  # never deliver one twice
        ]
        if not events:
            return None
        self.next_revision = events[-1].revision + 1
        return WatchBatch(resp.header.revision, events)

    def _stopped(self) -> bool:
        return self._closed or self._client._closed

    async def _run(self) -> AsyncGenerator[WatchBatch, None]:
        while not self._closed:
            try:
                call, resp, index = await self._open()
            except EtcdError:
                if self._stopped():
                    return
                raise
            self._call = call
            try:
                while True:
                    batch = self._batch(resp)
                    if batch is not None:
                        yield batch
                    nxt = await call.read()
                    if nxt is grpc.aio.EOF:
                        raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "watch stream closed by the server")
                    resp = nxt
            except asyncio.CancelledError:
                # grpc raises this in read() when our own aclose() or the client's close() cancelled
                # the call; a cancellation of the iterating task goes on up
                task = asyncio.current_task()
                if self._stopped() and task is not None and not task.cancelling():
                    return
                raise
            except grpc.aio.AioRpcError as e:
                if self._stopped():
                    return
                if e.code() not in (*_RETRY_CODES, grpc.StatusCode.CANCELLED):
                    raise _translate(e) from None
                self.reconnects += 1
                log.info(
                    "etcd watch on %s broke (%s %s); resuming from revision %d",
                    self._client.endpoints[index].target,
                    e.code().name,
                    e.details(),
                    self.next_revision,
                )
                self._client._advance(index)
            finally:
                self._call = None
                call.cancel()


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _translate(e: grpc.aio.AioRpcError) -> EtcdError:
    details = e.details() or ""
    if e.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return EtcdCompacted(0, details)
    if e.code() == grpc.StatusCode.NOT_FOUND and "lease" in details:
        return EtcdLeaseNotFound(details, e.code())
    return EtcdError(f"etcd: {e.code().name}: {details}", e.code())
