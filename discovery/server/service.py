"""The ``sidero.discovery.server.Cluster`` gRPC service on top of the pure registry.

Handlers are registered as generic handlers (not the generated servicer) so that
watch notifications are serialized once and the same bytes are written to every
watcher. Every RPC: rate limit by client IP, validate, apply, journal, then
acknowledge; one structured log line and Prometheus metrics per call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge

from discovery.logs import FastEventLog, encode_str
from discovery.server.ratelimit import RateLimiter
from discovery.server.rpcmetrics import RpcMetrics
from discovery.server.state import Change, Code, Registry, RegistryError
from discovery.server.storage import Store
from spanapi.discovery.server import cluster_pb2 as pb

SERVICE = "sidero.discovery.server.Cluster"
log = logging.getLogger("discovery.server")

# A Watch snapshot is split so that no message comes near gRPC's 4 MiB default.
SNAPSHOT_CHUNK_BYTES = 1 << 20

_STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)?(-[0-9A-Za-z.-]+)?")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_version(v: str) -> str:
    """Talos client versions become ``vX.Y``, ``vX.Y-pre`` or ``unknown`` (metric label)."""
    m = _VERSION_RE.match(v.strip())
    if not m:
        return "unknown"
    return f"v{m.group(1)}.{m.group(2)}" + ("-pre" if m.group(3) else "")


def parse_peer(peer: str) -> IPAddress | None:
    """``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5`` / ``unix:...`` → address or None."""
    kind, _, rest = peer.partition(":")
    try:
        if kind == "ipv4":
            return ipaddress.IPv4Address(rest.rsplit(":", 1)[0])
        if kind == "ipv6":
            host = rest.rsplit(":", 1)[0].strip("[]")
            addr = ipaddress.IPv6Address(host.split("%", 1)[0])
            return addr.ipv4_mapped or addr
    except ValueError:
        return None
    return None


class Metrics:
    """Prometheus metrics with upstream's names, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.hello = Counter(
            "discovery_server_hello_requests_total",
            "Hello requests by client version.",
            ["client_version"],
            registry=r,
        )
        self.clusters = Gauge("discovery_state_clusters", "Clusters in the registry.", registry=r)
        self.affiliates = Gauge("discovery_state_affiliates", "Affiliates in the registry.", registry=r)
        self.endpoints = Gauge("discovery_state_endpoints", "Endpoints in the registry.", registry=r)
        self.subscriptions = Gauge("discovery_state_subscriptions", "Active watches.", registry=r)
        self.gc_runs = Counter("discovery_state_gc_runs", "Garbage collection runs.", registry=r)
        self.gc_clusters = Counter("discovery_state_gc_clusters", "Clusters removed by GC.", registry=r)
        self.gc_affiliates = Counter("discovery_state_gc_affiliates", "Affiliates removed by GC.", registry=r)
        self.storage_ops = Counter(
            "discovery_storage_operations", "Snapshot operations.", ["operation", "status"], registry=r
        )
        self.storage_size = Gauge(
            "discovery_storage_last_snapshot_size_bytes", "Last snapshot size.", registry=r
        )
        self.storage_last = {
            k: Gauge(
                f"discovery_storage_last_operation_{k}",
                f"Last snapshot operation: {k}.",
                ["operation"],
                registry=r,
            )
            for k in ("clusters", "affiliates", "endpoints", "duration_seconds")
        }
        self.rpcs = RpcMetrics(SERVICE, r)
        self.rate_limited = Counter(
            "discovery_server_rate_limited", "Requests refused by the rate limiter.", registry=r
        )
        self.watch_aborted = Counter(
            "discovery_server_watch_lost_updates", "Watches aborted: lost update.", registry=r
        )

    def refresh_state(self, reg: Registry) -> None:
        clusters, affiliates, endpoints, subs = reg.stats()
        self.clusters.set(clusters)
        self.affiliates.set(affiliates)
        self.endpoints.set(endpoints)
        self.subscriptions.set(subs)


@dataclass
class ServiceConfig:
    redirect_endpoint: str = ""
    trusted_proxies: Sequence[IPNetwork] = ()
    rate_limit: float = 15.0
    rate_burst: int = 60
    client_ip_reporting: bool = True
    log_rpcs: bool = True


_UPDATE_OK = pb.AffiliateUpdateResponse()


class _Malformed:
    """Stands in for a request whose protobuf did not parse (answered with INVALID_ARGUMENT)."""

    cluster_id = affiliate_id = client_version = ""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except DecodeError:
            return _Malformed(cls.DESCRIPTOR.name)

    return parse


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class _Call:
    """Per-RPC bookkeeping for the log line and metrics."""

    method: str
    cluster_id: str = ""
    affiliate_id: str = ""
    extra: dict[str, str] | None = None


class ClusterService:
    """Implements the five RPCs; owns no sockets (the daemon does)."""

    def __init__(
        self,
        registry: Registry,
        store: Store | None = None,
        config: ServiceConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.config = config or ServiceConfig()
        self.metrics = metrics or Metrics()
        self.limiter = RateLimiter(self.config.rate_limit, self.config.rate_burst)
        self._closing = asyncio.Event()
        self._rpc_log = FastEventLog("discovery.server")
        # peer text -> (address, the address as a JSON string for the log line); see _peer().
        self._peers: dict[str, tuple[IPAddress | None, str]] = {}
        self._wakers: set[Callable[[], None]] = set()

    # -- plumbing -----------------------------------------------------------------------------------

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[..., Awaitable[Any]], req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=_parser(req), response_serializer=resp.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Hello": unary(self.hello, pb.HelloRequest, pb.HelloResponse),
                "AffiliateUpdate": unary(
                    self.affiliate_update, pb.AffiliateUpdateRequest, pb.AffiliateUpdateResponse
                ),
                "AffiliateDelete": unary(
                    self.affiliate_delete, pb.AffiliateDeleteRequest, pb.AffiliateDeleteResponse
                ),
                "List": unary(self.list, pb.ListRequest, pb.ListResponse),
                # Watch yields pre-serialized WatchResponse bytes.
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch, request_deserializer=_parser(pb.WatchRequest), response_serializer=bytes
                ),
            },
        )

    def client_ip(self, context: grpc.aio.ServicerContext) -> IPAddress | None:
        """The client's address: the peer, or the forwarded one when the peer is a trusted proxy."""
        return self._peer(context)[0]

    def _peer(self, context: grpc.aio.ServicerContext) -> tuple[IPAddress | None, str]:
        """``(client address, that address as a JSON string for the log line)``.

        Both are cached per peer text (``ipv4:1.2.3.4:5``), so the common case costs one
        ``context.peer()`` and one dict lookup: formatting an address is ~1 µs of Python.
        """
        text = context.peer()
        try:
            peer, peer_json = self._peers[text]
        except KeyError:
            if len(self._peers) > 10_000:
                self._peers.clear()
            addr = parse_peer(text)
            peer, peer_json = self._peers[text] = (addr, encode_str(str(addr) if addr else text))
        if peer is None or not self.config.trusted_proxies:
            return peer, peer_json
        if not any(peer in net for net in self.config.trusted_proxies):
            return peer, peer_json
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        for header in ("x-real-ip", "x-forwarded-for"):
            value = md.get(header)
            if value:
                try:
                    addr = ipaddress.ip_address(value.split(",", 1)[0].strip())
                except ValueError:
                    continue
                if isinstance(addr, ipaddress.IPv6Address):
                    addr = addr.ipv4_mapped or addr
                return addr, encode_str(str(addr))
        return peer, peer_json

    async def _rate_limit(self, context: grpc.aio.ServicerContext, key: str) -> None:
        """Wait for a token of ``key``'s bucket (one bucket per client address)."""
        remaining = context.time_remaining()
        wait = self.limiter.reserve(key, remaining)
        if wait is None:
            self.metrics.rate_limited.inc()
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded: wait would exceed the call deadline"
            )
        if wait > 0:
            await asyncio.sleep(wait)

    async def _run(
        self,
        kind: str,
        call: _Call,
        req: Any,
        context: grpc.aio.ServicerContext,
        body: Callable[[], Any],
    ) -> Any:
        """Rate limit, run ``body`` (a plain function, or a coroutine function for streams),
        map errors to status codes, record metrics and the log line."""
        stats = self.metrics.rpcs.method(kind, call.method)
        stats.started += 1
        t0 = time.perf_counter()
        code = "OK"
        ip, peer_json = self._peer(context)
        try:
            if self.limiter.enabled:
                # The JSON form of the address is as unique as str(ip) and already computed;
                # peers without an IP address (unix sockets) share one bucket, as before.
                await self._rate_limit(context, peer_json if ip is not None else "None")
            if type(req) is _Malformed:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed {req.type_name}: cannot parse protobuf"
                )
            result = body()
            if kind != "unary":  # streams pass a coroutine function; unary bodies are plain
                result = await result
            return result
        except RegistryError as e:
            code = _STATUS[e.code].name
            await context.abort(_STATUS[e.code], str(e))
        except _Abort as e:
            code = e.code.name
            await context.abort(e.code, e.details)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:  # a bug: report Internal, keep serving
            if isinstance(e, grpc.aio.AbortError):
                raise
            code = "INTERNAL"
            log.exception("rpc failed", extra={"_fields": {"method": call.method}})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            dt = time.perf_counter() - t0
            stats.done(code, dt)
            if self.config.log_rpcs:
                rl = self._rpc_log
                aid = f',"affiliate_id":{encode_str(call.affiliate_id)}' if call.affiliate_id else ""
                extra = (
                    "".join(f',"{k}":{encode_str(v)}' for k, v in call.extra.items()) if call.extra else ""
                )
                rl.write_line(
                    f'{rl.head("rpc")},"method":"{call.method}","code":"{code}","duration_ms":{dt * 1000:.3f},'
                    f'"cluster_id":{encode_str(call.cluster_id)}{aid},"peer":{peer_json}'
                    f"{extra}}}\n"
                )

    # -- RPCs ---------------------------------------------------------------------------------------

    async def hello(self, req: pb.HelloRequest, context: grpc.aio.ServicerContext) -> pb.HelloResponse:
        call = _Call("Hello", req.cluster_id, extra={"client_version": req.client_version[:64]})

        def body() -> pb.HelloResponse:
            self.registry.validate_ids(req.cluster_id)
            self.metrics.hello.labels(normalize_version(req.client_version)).inc()
            resp = pb.HelloResponse()
            if self.config.redirect_endpoint:
                resp.redirect.endpoint = self.config.redirect_endpoint
            ip = self.client_ip(context)
            if ip is not None and self.config.client_ip_reporting:
                resp.client_ip = ip.packed
            return resp

        return await self._run("unary", call, req, context, body)

    async def affiliate_update(
        self, req: pb.AffiliateUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.AffiliateUpdateResponse:
        call = _Call("AffiliateUpdate", req.cluster_id, req.affiliate_id)

        def body() -> pb.AffiliateUpdateResponse:
            ttl = req.ttl.seconds + req.ttl.nanos / 1e9
            data = req.affiliate_data if req.HasField("affiliate_data") else None
            endpoints = list(req.affiliate_endpoints)
            self.registry.update(req.cluster_id, req.affiliate_id, data, endpoints, ttl)
            if self.store is not None:
                self.store.record_update(req.cluster_id, req.affiliate_id, data, endpoints, ttl)
            return _UPDATE_OK

        return await self._run("unary", call, req, context, body)

    async def affiliate_delete(
        self, req: pb.AffiliateDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.AffiliateDeleteResponse:
        call = _Call("AffiliateDelete", req.cluster_id, req.affiliate_id)

        def body() -> pb.AffiliateDeleteResponse:
            self.registry.validate_ids(req.cluster_id, req.affiliate_id)
            if self.registry.delete(req.cluster_id, req.affiliate_id) and self.store is not None:
                self.store.record_delete(req.cluster_id, req.affiliate_id)
            return pb.AffiliateDeleteResponse()

        return await self._run("unary", call, req, context, body)

    async def list(self, req: pb.ListRequest, context: grpc.aio.ServicerContext) -> pb.ListResponse:
        call = _Call("List", req.cluster_id)

        def body() -> pb.ListResponse:
            views = self.registry.list(req.cluster_id)
            return pb.ListResponse(
                affiliates=[pb.Affiliate(id=v.id, data=v.data, endpoints=v.endpoints) for v in views]
            )

        return await self._run("unary", call, req, context, body)

    async def watch(self, req: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        """Full snapshot first (split when large), then batched deltas until cancelled or shut down."""
        call = _Call("Watch", req.cluster_id)
        kind = "server_stream"
        queue: list[bytes] = []

        async def body() -> None:
            sub = self.registry.subscribe(req.cluster_id)
            wake = asyncio.Event()
            sub.waker = wake.set
            self._wakers.add(wake.set)
            try:
                queue.extend(snapshot_messages(sub.snapshot))
                await _flush(queue, context)
                while not self._closing.is_set():
                    await wake.wait()
                    wake.clear()
                    if sub.lost:
                        self.metrics.watch_aborted.inc()
                        raise _Abort(grpc.StatusCode.ABORTED, "subscription canceled: lost update")
                    queue.extend(change_messages(sub.drain()))
                    await _flush(queue, context)
            finally:
                sub.close()
                self._wakers.discard(wake.set)

        await self._run(kind, call, req, context, body)

    def flush_logs(self) -> None:
        """Write out per-RPC log lines still batched in memory."""
        self._rpc_log.flush()

    def close_watches(self) -> None:
        """End every watch stream with OK (server shutdown)."""
        self._closing.set()
        for w in list(self._wakers):
            w()


async def _flush(queue: list[bytes], context: grpc.aio.ServicerContext) -> None:
    while queue:
        await context.write(queue.pop(0))


def _affiliate_msg(c: Change) -> pb.Affiliate:
    a = c.affiliate
    assert a is not None
    return pb.Affiliate(id=a.id, data=a.data, endpoints=a.endpoints)


def snapshot_messages(views: Sequence[Any]) -> list[bytes]:
    """The snapshot as one or more WatchResponse messages, each under SNAPSHOT_CHUNK_BYTES."""
    out: list[bytes] = []
    msg = pb.WatchResponse()
    size = 0
    for v in views:
        item = pb.Affiliate(id=v.id, data=v.data, endpoints=v.endpoints)
        n = item.ByteSize() + 8
        if size and size + n > SNAPSHOT_CHUNK_BYTES:
            out.append(msg.SerializeToString())
            msg = pb.WatchResponse()
            size = 0
        msg.affiliates.append(item)
        size += n
    out.append(msg.SerializeToString())
    return out


def change_messages(changes: Sequence[Change]) -> list[bytes]:
    """Coalesced changes as WatchResponse messages: runs of updates batched, runs of deletes batched.

    A lone change is serialized once and cached on the shared Change object, so one
    notification fanned out to N watchers is encoded once.
    """
    if len(changes) == 1:
        c = changes[0]
        if c.wire is None:
            if c.affiliate is None:
                c.wire = pb.WatchResponse(
                    deleted=True, affiliates=[pb.Affiliate(id=c.id)]
                ).SerializeToString()
            else:
                c.wire = pb.WatchResponse(affiliates=[_affiliate_msg(c)]).SerializeToString()
        return [c.wire]
    out: list[bytes] = []
    run: list[Change] = []

    def emit() -> None:
        if not run:
            return
        if run[0].affiliate is None:
            out.append(
                pb.WatchResponse(
                    deleted=True, affiliates=[pb.Affiliate(id=c.id) for c in run]
                ).SerializeToString()
            )
        else:
            out.append(pb.WatchResponse(affiliates=[_affiliate_msg(c) for c in run]).SerializeToString())
        run.clear()

    for c in changes:
        if run and (run[0].affiliate is None) != (c.affiliate is None):
            emit()
        run.append(c)
    emit()
    return out
