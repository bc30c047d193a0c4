"""The ``sidero.discovery.server.Cluster`` gRPC service on top of the pure registry.

Handlers are registered as generic handlers (not the generated servicer) so that
watch notifications are serialized once and the same bytes are written to every
watcher. Every RPC: rate limit by client IP, validate, journal, apply, then
acknowledge; one structured log line and Prometheus metrics per call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from discovery.server.backend import Backend, EmbeddedBackend, StoreUnavailable
from discovery.server.ratelimit import RateLimiter
from discovery.server.rpcmetrics import RpcMetrics
from discovery.server.state import AffiliateView, Change, Code, Registry, RegistryError, change_size
from discovery.server.storage import Store
from discovery.server.watchguard import (
    WATCH_CHUNK_BYTES,
    RefusalLog,
    WatchSender,
    WatchSlots,
    WriteStalled,
    client_key,
)
from spanapi.discovery.server import cluster_pb2 as pb
from spanutil.ipcodec import IPAddress, IPNetwork, ip_without_scope
from spanutil.logs import CLIP_CHARS, FastEventLog, clip, encode_str, log_event

SERVICE = "sidero.discovery.server.Cluster"
log = logging.getLogger("discovery.server")

# A Watch snapshot is split into messages of about this size, serialized one at a time as the
# client reads (see discovery.server.watchguard); far below gRPC's 4 MiB message limit.
SNAPSHOT_CHUNK_BYTES = WATCH_CHUNK_BYTES
# Watch bounds (flags of the same names in discovery.server.main; 0 disables each).
MAX_WATCHES = 20_000  # ~40 KiB of server memory per idle watch on its own connection: ~800 MiB
# Half of a cluster at upstream's limit (1,024 affiliates) behind one NAT egress address; a
# watcher that never reads costs ~100 KiB (its connection, its stream and one snapshot chunk in
# grpc-core's send buffer), so one address holds at most ~50 MiB this way. Raise it for a bigger
# site behind one address (the refusals are logged and counted).
MAX_WATCHES_PER_IP = 512
WATCH_STALL_TIMEOUT = 30.0  # seconds a Watch write may take before the stream is ABORTED
WATCH_INFLIGHT_BUDGET = 64 << 20  # bytes of watch messages being written, all streams together
# One client address's share of it: 128 snapshot chunks in flight at once (a whole cluster behind
# one NAT still gets its snapshots, 128 streams at a time), and one address that never reads holds
# at most this much of our memory, not the whole budget (which would starve every other watcher).
WATCH_INFLIGHT_PER_IP = 8 << 20
# Snapshots sent at once to one client address (the others wait): see WatchSender.snapshot_slot.
WATCH_SNAPSHOTS_PER_IP = 8

_STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Hello.client_version → metric label: major and minor of 1..3 digits, optional patch and pre-release.
_VERSION_RE = re.compile(r"v?([0-9]{1,3})\.([0-9]{1,3})(?![0-9])(?:\.[0-9]+)?(-[0-9A-Za-z.-]+)?")
VERSION_TEXT_MAX = 128  # longer client_version strings are "unknown" without looking further
HELLO_VERSIONS_MAX = 64  # distinct vX.Y[-pre] labels; later versions are counted as "other"
# Status details (and so the grpc-message trailer) never exceed this many characters (+ clip marker).
DETAILS_CHARS = 256
# Codes caused by what a client sent (and INTERNAL, which a client may be able to trigger): their
# log lines go through a token bucket (ServiceConfig.reject_log_rate / reject_log_burst).
_THROTTLED = frozenset(("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL"))


def normalize_version(v: str) -> str:
    """Talos client versions become ``vX.Y``, ``vX.Y-pre`` or ``unknown`` (metric label).

    ``v1.7.0`` → ``v1.7``, ``v1.8.0-alpha.1`` → ``v1.8-pre``. Major and minor have 1..3 digits
    (leading zeros dropped), so a label has at most 12 characters; strings longer than
    VERSION_TEXT_MAX or of another shape are ``unknown``. :meth:`Metrics.hello_version` also
    bounds how many distinct labels exist.
    """
    if len(v) > VERSION_TEXT_MAX:
        return "unknown"
    m = _VERSION_RE.match(v.strip())
    if not m:
        return "unknown"
    return f"v{int(m.group(1))}.{int(m.group(2))}" + ("-pre" if m.group(3) else "")


def parse_peer(peer: str) -> IPAddress | None:
    """``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5`` / ``unix:...`` → address or None."""
    kind, _, rest = peer.partition(":")
    try:
        if kind == "ipv4":
            return ipaddress.IPv4Address(rest.rsplit(":", 1)[0])
        if kind == "ipv6":
            host = rest.rsplit(":", 1)[0].strip("[]")
            addr = ip_without_scope(host)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                return addr.ipv4_mapped
            return addr
    except ValueError:
        return None
    return None


class Metrics:
    """Prometheus metrics with upstream's names, in their own registry."""

    def __init__(
        self, registry: CollectorRegistry | None = None, hello_versions_max: int = HELLO_VERSIONS_MAX
    ) -> None:
        r = self.registry = registry or CollectorRegistry()
        if registry is None:
            # process_resident_memory_bytes and friends: what an abusive client costs shows there
            ProcessCollector(registry=r)
        self.hello = Counter(
            "discovery_server_hello_requests_total",
            "Hello requests by client version (vX.Y, vX.Y-pre, other, unknown).",
            ["client_version"],
            registry=r,
        )
        # label -> child counter; at most hello_versions_max version labels plus "other" and "unknown".
        self.hello_versions_max = hello_versions_max
        self._hello: dict[str, Any] = {}
        self._hello_versions = 0
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
        self.watch_stalled = Counter(
            "discovery_server_watch_stalled",
            "Watches aborted because a write did not complete in time (the client stopped reading); "
            "reason=pressure when the in-flight budget was exhausted.",
            ["reason"],
            registry=r,
        )
        self.watch_refused = Counter(
            "discovery_server_watch_refused",
            "Watches refused with RESOURCE_EXHAUSTED: too many open watches (per client IP, or in total).",
            ["reason"],
            registry=r,
        )
        self.watch_inflight = Gauge(
            "discovery_server_watch_inflight_bytes",
            "Bytes of Watch messages being written (all streams); bounded by --watch-inflight-budget.",
            registry=r,
        )
        for reason in ("per_ip", "total"):
            self.watch_refused.labels(reason)
        for reason in ("timeout", "pressure"):
            self.watch_stalled.labels(reason)
        self.rejected_logs_suppressed = Counter(
            "discovery_server_rejected_request_logs_suppressed",
            "Log lines of rejected requests dropped by the log rate limit (see the periodic summary).",
            registry=r,
        )

    def hello_version(self, client_version: str) -> str:
        """Count one Hello under its bounded ``client_version`` label; return the label.

        The first ``hello_versions_max`` distinct ``vX.Y[-pre]`` labels get their own series,
        later ones are counted as ``other``: /metrics stays bounded whatever clients send.
        """
        label = normalize_version(client_version)
        child = self._hello.get(label)
        if child is None:
            if label != "unknown" and self._hello_versions >= self.hello_versions_max:
                label = "other"
                child = self._hello.get(label)
            elif label != "unknown":
                self._hello_versions += 1
            if child is None:
                child = self._hello[label] = self.hello.labels(label)
        child.inc()
        return label

    def refresh_state(self, reg: Registry | Backend) -> None:
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
    # A call waits at most this long for a rate-limit token (or its deadline, when sooner): calls
    # without a deadline (Watch) could otherwise queue without bound, each holding its memory.
    rate_max_wait: float = 10.0
    # Log lines of rejected requests (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, INTERNAL), all clients
    # together: a token bucket (rate 0: no limit); what it drops is summarised every interval.
    reject_log_rate: float = 10.0
    reject_log_burst: int = 50
    reject_log_summary_interval: float = 10.0
    client_ip_reporting: bool = True
    log_rpcs: bool = True
    # Watch bounds (0 disables each); see discovery.server.watchguard.
    max_watches: int = MAX_WATCHES
    max_watches_per_ip: int = MAX_WATCHES_PER_IP
    watch_stall_timeout: float = WATCH_STALL_TIMEOUT
    watch_inflight_budget: int = WATCH_INFLIGHT_BUDGET
    watch_inflight_per_ip: int = WATCH_INFLIGHT_PER_IP
    watch_snapshots_per_ip: int = WATCH_SNAPSHOTS_PER_IP
    watch_refusal_log_interval: float = 10.0


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
    # More client-supplied strings for the log line (clipped there, like the IDs).
    extra: dict[str, str] | None = None


class _RejectionLog:
    """A token bucket for the log lines of rejected requests, and a summary of what it dropped.

    The summary (level warning, ``"suppressed":N`` and counts by code) is written
    ``interval`` seconds after the first dropped line, and by :meth:`summarize` at shutdown.
    """

    def __init__(self, config: ServiceConfig, metrics: Metrics, out: FastEventLog) -> None:
        self.bucket = RateLimiter(config.reject_log_rate, config.reject_log_burst)
        self.interval = config.reject_log_summary_interval
        self._metric = metrics.rejected_logs_suppressed
        self._out = out
        self.suppressed: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def allow(self, code: str) -> bool:
        """Take a token for one line; False (the line is counted as suppressed) when there is none."""
        if self.bucket.reserve("", 0.0) is not None:
            return True
        self.suppressed[code] = self.suppressed.get(code, 0) + 1
        self._metric.inc()
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.interval, self.summarize)
            except RuntimeError:  # no event loop (direct calls in tests): summarize() writes it
                pass
        return False

    def summarize(self) -> None:
        """Write the summary line of the lines dropped since the last one, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.suppressed:
            return
        counts, self.suppressed = self.suppressed, {}
        n = sum(counts.values())
        by_code = ",".join(f'"{k}":{v}' for k, v in sorted(counts.items()))
        out = self._out
        out.write_line(
            f'{out.head("rejected-request log lines suppressed", "warning")},"suppressed":{n},'
            f'"by_code":{{{by_code}}},"limit_per_s":{self.bucket.rate:g}}}\n'
        )


def _failure_text(e: BaseException) -> str:
    """A traceback for the log whose exception message is clipped (it may quote a request)."""
    frames = "".join(traceback.format_tb(e.__traceback__, limit=-20))
    return f"Traceback (most recent call last):\n{frames}{type(e).__name__}: {clip(str(e), DETAILS_CHARS)}"


class ClusterService:
    """Implements the five RPCs; owns no sockets (the daemon does)."""

    def __init__(
        self,
        registry: Registry | Backend,
        store: Store | None = None,
        config: ServiceConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``registry``: a :class:`Registry` (with ``store``: the embedded backend) or any backend."""
        if isinstance(registry, Registry):
            registry = EmbeddedBackend(registry, store)
        self.backend: Backend = registry
        # The embedded backend's calls are synchronous: the handlers skip a coroutine for them.
        self._embedded = registry if isinstance(registry, EmbeddedBackend) else None
        self.registry = registry.registry if isinstance(registry, EmbeddedBackend) else None
        self.store = registry.store if isinstance(registry, EmbeddedBackend) else None
        self.config = config or ServiceConfig()
        self.metrics = metrics or Metrics()
        self.limiter = RateLimiter(self.config.rate_limit, self.config.rate_burst)
        self._closing = asyncio.Event()
        self._rpc_log = FastEventLog("discovery.server")
        self._rejections = _RejectionLog(self.config, self.metrics, self._rpc_log)
        # peer text -> (address, the address as a JSON string for the log line); see _peer().
        self._peers: dict[str, tuple[IPAddress | None, str]] = {}
        self._wakers: set[Callable[[], None]] = set()
        cfg = self.config
        self.watch_slots = WatchSlots(cfg.max_watches, cfg.max_watches_per_ip)
        self.watch_sender = WatchSender(
            cfg.watch_inflight_budget,
            cfg.watch_stall_timeout,
            per_client=cfg.watch_inflight_per_ip,
            snapshots_per_client=cfg.watch_snapshots_per_ip,
        )
        self._refusals = RefusalLog(cfg.watch_refusal_log_interval)
        self.metrics.watch_inflight.set_function(lambda: self.watch_sender.in_flight)

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
        cap = self.config.rate_max_wait
        wait = self.limiter.reserve(key, cap if remaining is None else min(remaining, cap))
        if wait is None:
            self.metrics.rate_limited.inc()
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit exceeded: the wait would exceed the call deadline or {cap:g} s",
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
        details = ""  # the status message of a failed call (bounded: never quotes the request)
        failure: Exception | None = None
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
            # streams pass a coroutine function; unary bodies are plain, or return a coroutine when
            # the backend is not the embedded one
            if kind != "unary" or asyncio.iscoroutine(result):
                result = await result
            return result
        except RegistryError as e:
            code = _STATUS[e.code].name
            details = clip(str(e), DETAILS_CHARS)
            await context.abort(_STATUS[e.code], details)
        except _Abort as e:
            code = e.code.name
            details = clip(e.details, DETAILS_CHARS)
            await context.abort(e.code, details)
        except StoreUnavailable as e:  # nothing changed (or the outcome is unknown): retryable
            code = grpc.StatusCode.UNAVAILABLE.name
            details = clip(e.reason, DETAILS_CHARS)
            await context.abort(grpc.StatusCode.UNAVAILABLE, details)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:  # a bug: report Internal, keep serving
            if isinstance(e, grpc.aio.AbortError):
                raise
            code = "INTERNAL"
            details = "internal error"
            failure = e
            await context.abort(grpc.StatusCode.INTERNAL, details)
        finally:
            dt = time.perf_counter() - t0
            stats.done(code, dt)
            # Lines of rejected calls are rate limited (all clients together); what a client sent is
            # clipped to CLIP_CHARS characters, so one call writes a bounded line.
            quiet = (
                code in _THROTTLED
                and (self.config.log_rpcs or failure is not None)
                and not self._rejections.allow(code)
            )
            if failure is not None and not quiet:
                log_event(log, "rpc failed", logging.ERROR, method=call.method, error=_failure_text(failure))
            if self.config.log_rpcs and not quiet:
                rl = self._rpc_log
                cid = call.cluster_id
                if len(cid) > CLIP_CHARS:
                    cid = clip(cid)
                aid = call.affiliate_id
                if aid:
                    aid = f',"affiliate_id":{encode_str(aid if len(aid) <= CLIP_CHARS else clip(aid))}'
                extra = ""
                if call.extra:
                    extra = "".join(f',"{k}":{encode_str(clip(v))}' for k, v in call.extra.items())
                if details:
                    extra += f',"error":{encode_str(details)}'
                rl.write_line(
                    f'{rl.head("rpc")},"method":"{call.method}","code":"{code}","duration_ms":{dt * 1000:.3f},'
                    f'"cluster_id":{encode_str(cid)}{aid},"peer":{peer_json}'
                    f"{extra}}}\n"
                )

    # -- RPCs ---------------------------------------------------------------------------------------

    async def hello(self, req: pb.HelloRequest, context: grpc.aio.ServicerContext) -> pb.HelloResponse:
        call = _Call("Hello", req.cluster_id, extra={"client_version": req.client_version})

        def body() -> pb.HelloResponse:
            self.backend.validate_ids(req.cluster_id)
            self.metrics.hello_version(req.client_version)
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

        def body() -> pb.AffiliateUpdateResponse | Awaitable[pb.AffiliateUpdateResponse]:
            ttl = req.ttl.seconds + req.ttl.nanos / 1e9
            data = req.affiliate_data if req.HasField("affiliate_data") else None
            endpoints = list(req.affiliate_endpoints)
            # validate → journal (or commit to etcd) → apply (and notify): a failed write changes nothing.
            if self._embedded is not None:
                self._embedded.update_now(req.cluster_id, req.affiliate_id, data, endpoints, ttl)
                return _UPDATE_OK
            return self._update_async(req.cluster_id, req.affiliate_id, data, endpoints, ttl)

        return await self._run("unary", call, req, context, body)

    async def affiliate_delete(
        self, req: pb.AffiliateDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.AffiliateDeleteResponse:
        call = _Call("AffiliateDelete", req.cluster_id, req.affiliate_id)

        async def body() -> pb.AffiliateDeleteResponse:
            await self.backend.delete(req.cluster_id, req.affiliate_id)
            return pb.AffiliateDeleteResponse()

        return await self._run("unary", call, req, context, body)

    async def list(self, req: pb.ListRequest, context: grpc.aio.ServicerContext) -> pb.ListResponse:
        call = _Call("List", req.cluster_id)

        async def body() -> pb.ListResponse:
            views = await self.backend.list(req.cluster_id)
            return pb.ListResponse(
                affiliates=[pb.Affiliate(id=v.id, data=v.data, endpoints=v.endpoints) for v in views]
            )

        return await self._run("unary", call, req, context, body)

    async def watch(self, req: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        """Full snapshot first (split when large), then batched deltas until cancelled or shut down.

        Bounded (discovery.server.watchguard): open watches per client address and in total; one
        message in flight per stream, serialized only when the global in-flight budget grants its
        bytes; a write that stalls ends the stream with ABORTED, like a watcher that fell behind.
        """
        call = _Call("Watch", req.cluster_id)
        kind = "server_stream"

        async def body() -> None:
            key = client_key(self.client_ip(context))
            refused = self.watch_slots.acquire(key)
            if refused is not None:
                raise self._refuse_watch(refused, key)
            sender = self.watch_sender
            sub = None
            wake = asyncio.Event()
            try:
                sub = await self.backend.subscribe(req.cluster_id)
                sub.waker = wake.set
                self._wakers.add(wake.set)
                async with sender.snapshot_slot(key):
                    for size, message in snapshot_chunks(sub.snapshot):
                        if sub.lost:
                            break  # fell behind while the snapshot was being sent: aborted below
                        await sender.write(context, size, message, key)
                sub.snapshot = []
                while not self._closing.is_set():
                    await wake.wait()
                    wake.clear()
                    if sub.lost:
                        self.metrics.watch_aborted.inc()
                        raise _Abort(grpc.StatusCode.ABORTED, "subscription canceled: lost update")
                    for size, message in change_chunks(sub.drain()):
                        await sender.write(context, size, message, key)
            except WriteStalled as e:
                self.metrics.watch_stalled.labels("pressure" if e.shed else "timeout").inc()
                raise _Abort(
                    grpc.StatusCode.ABORTED, f"subscription canceled: client not reading ({e})"
                ) from None
            finally:
                if sub is not None:
                    sub.close()
                self._wakers.discard(wake.set)
                self.watch_slots.release(key)

        await self._run(kind, call, req, context, body)

    async def _update_async(
        self, cluster_id: str, affiliate_id: str, data: bytes | None, endpoints: Sequence[bytes], ttl: float
    ) -> pb.AffiliateUpdateResponse:
        await self.backend.update(cluster_id, affiliate_id, data, endpoints, ttl)
        return _UPDATE_OK

    def _refuse_watch(self, reason: str, key: str) -> _Abort:
        """Count and (rate-bounded) log a refused watch; the error to end the call with."""
        self.metrics.watch_refused.labels(reason).inc()
        slots = self.watch_slots
        if reason == "total":
            limit, what = slots.max_total, "open watches on this server"
        else:
            limit, what = slots.max_per_client, "open watches from this client address"
        self._refusals.refused(reason, key, limit, open_total=slots.total)
        return _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many {what} (limit {limit}); retry later")

    def flush_logs(self) -> None:
        """Write out per-RPC log lines still batched in memory (and the suppressed-lines summary)."""
        self._rejections.summarize()
        self._rpc_log.flush()

    def close_watches(self) -> None:
        """End every watch stream with OK (server shutdown)."""
        self._closing.set()
        for w in list(self._wakers):
            w()


def _affiliate_msg(c: Change) -> pb.Affiliate:
    a = c.affiliate
    assert a is not None
    return pb.Affiliate(id=a.id, data=a.data, endpoints=a.endpoints)


def _view_size(v: AffiliateView) -> int:
    """An upper bound of the bytes one affiliate adds to a WatchResponse (ids are <= 256 bytes)."""
    return 4 * len(v.id) + len(v.data) + 3 * len(v.endpoints) + sum(map(len, v.endpoints)) + 16


def _serializer(views: Sequence[AffiliateView]) -> Callable[[], bytes]:
    def serialize() -> bytes:
        return pb.WatchResponse(
            affiliates=[pb.Affiliate(id=v.id, data=v.data, endpoints=v.endpoints) for v in views]
        ).SerializeToString()

    return serialize


def snapshot_chunks(
    views: Sequence[AffiliateView], limit: int = SNAPSHOT_CHUNK_BYTES
) -> Iterator[tuple[int, Callable[[], bytes]]]:
    """The snapshot as WatchResponse messages of about ``limit`` bytes, produced lazily.

    Yields ``(size bound, serialize)``: the caller serializes a chunk only when it is about to
    write it, so a stream holds one chunk's bytes, not the whole snapshot. An empty snapshot is
    one empty message (clients take the first message as the snapshot).
    """
    start = size = 0
    for i, v in enumerate(views):
        n = _view_size(v)
        if size and size + n > limit:
            yield size, _serializer(views[start:i])
            start, size = i, 0
        size += n
    yield size, _serializer(views[start:])


def snapshot_messages(views: Sequence[AffiliateView], limit: int = SNAPSHOT_CHUNK_BYTES) -> list[bytes]:
    """All of :func:`snapshot_chunks`, serialized (tests and tools)."""
    return [serialize() for _, serialize in snapshot_chunks(views, limit)]


def _lone_wire(c: Change) -> bytes:
    """The message of a single change, serialized once and cached on the shared Change."""
    if c.wire is None:
        if c.affiliate is None:
            c.wire = pb.WatchResponse(deleted=True, affiliates=[pb.Affiliate(id=c.id)]).SerializeToString()
        else:
            c.wire = pb.WatchResponse(affiliates=[_affiliate_msg(c)]).SerializeToString()
    return c.wire


def _run_serializer(run: Sequence[Change]) -> Callable[[], bytes]:
    def serialize() -> bytes:
        if run[0].affiliate is None:
            return pb.WatchResponse(
                deleted=True, affiliates=[pb.Affiliate(id=c.id) for c in run]
            ).SerializeToString()
        return pb.WatchResponse(affiliates=[_affiliate_msg(c) for c in run]).SerializeToString()

    return serialize


def change_chunks(
    changes: Sequence[Change], limit: int = SNAPSHOT_CHUNK_BYTES
) -> list[tuple[int, bytes | Callable[[], bytes]]]:
    """Coalesced changes as WatchResponse messages: runs of updates batched, runs of deletes batched
    (a run is cut at about ``limit`` bytes).

    Each item is ``(size bound, message)``; a batch's message is a function that serializes it
    (called when the write is granted its bytes). A lone change is serialized once and cached on
    the shared Change object, so one notification fanned out to N watchers is encoded once.
    """
    if len(changes) == 1:
        wire = _lone_wire(changes[0])
        return [(len(wire), wire)]
    out: list[tuple[int, bytes | Callable[[], bytes]]] = []
    run: list[Change] = []
    size = 0
    for c in changes:
        n = change_size(c)
        if run and ((run[0].affiliate is None) != (c.affiliate is None) or size + n > limit):
            out.append((size, _run_serializer(run)))
            run, size = [], 0
        run.append(c)
        size += n
    if run:
        out.append((size, _run_serializer(run)))
    return out


def change_messages(changes: Sequence[Change], limit: int = SNAPSHOT_CHUNK_BYTES) -> list[bytes]:
    """All of :func:`change_chunks`, serialized (tests and tools)."""
    return [m if isinstance(m, bytes) else m() for _, m in change_chunks(changes, limit)]
