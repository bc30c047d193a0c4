"""``discovery-service``: the self-hosted, server-blind discovery registry daemon.

Flags follow the upstream service (``-addr`` and ``--addr`` are both accepted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from discovery import limits
from discovery.etcd.client import Endpoint, TLSFiles
from discovery.server import migrate, stun
from discovery.server.backend import Backend, EmbeddedBackend
from discovery.server.etcdstore import DEFAULT_BUCKET, DEFAULT_PREFIX, EtcdBackend
from discovery.server.landing import Landing
from discovery.server.obsmetrics import CertificateExpiry, JournalFailures
from discovery.server.service import (
    MAX_WATCHES,
    MAX_WATCHES_PER_IP,
    SERVICE,
    WATCH_INFLIGHT_BUDGET,
    WATCH_INFLIGHT_PER_IP,
    WATCH_SNAPSHOTS_PER_IP,
    WATCH_STALL_TIMEOUT,
    ClusterService,
    Metrics,
    ServiceConfig,
)
from discovery.server.state import Registry
from discovery.server.storage import LoadReport, Store
from discovery.version import version_string
from spanutil.durations import parse_duration
from spanutil.hostport import split_listen
from spanutil.ipcodec import IPNetwork
from spanutil.logs import log_event, setup
from spanutil.sizes import parse_size

log = logging.getLogger("discovery.server")

DEFAULT_SNAPSHOT_PATH = "/var/discovery-service/state.binpb"

# Server keepalive: a connection is pinged after KEEPALIVE_TIME without traffic and closed when the
# ping is not answered within KEEPALIVE_TIMEOUT, so a client behind a downed link (half-open: no
# FIN, no RST) loses its watches within ~50 s. grpc-core also sets TCP_USER_TIMEOUT to the keepalive
# timeout, so a connection whose sent data stays unacknowledged, or whose peer keeps a zero window
# (never reads), is closed by the kernel after that long.
KEEPALIVE_TIME = 30.0
KEEPALIVE_TIMEOUT = 20.0
# The largest valid request (an AffiliateUpdate at every field's limit) is under 5 KiB; grpc-core
# refuses anything longer than this with RESOURCE_EXHAUSTED before it is buffered whole or parsed
# (the default, 4 MiB, let one client make the server hold and decode megabytes per call).
MAX_REQUEST_SIZE = 64 << 10
MAX_CONNECTION_IDLE = 120.0


def grpc_options(
    keepalive_time: float = KEEPALIVE_TIME,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    max_request_size: int = MAX_REQUEST_SIZE,
    max_connection_idle: float = MAX_CONNECTION_IDLE,
) -> list[tuple[str, Any]]:
    """The gRPC server's channel arguments."""
    return [
        ("grpc.max_receive_message_length", max_request_size),
        # grpc-core's defaults drop clients that ping more often than every 5 min; Talos pings every
        # max(10 s, TTL/10) = 3 min, idle or not.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
        # Our own pings: on idle connections too (permit_without_calls above), and without a cap on
        # pings sent while no data flows (an idle Watch may carry nothing for hours).
        ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
        # grpc-core (1.85) times every ping out after grpc.http2.ping_timeout_ms (default 1 min),
        # keepalive pings included: keep it equal to the keepalive timeout.
        ("grpc.http2.ping_timeout_ms", int(keepalive_timeout * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        # A connection with no call for this long is closed (GOAWAY): a client's refused or
        # finished calls cannot keep its connection's memory (~25 KiB each) forever. Nodes keep
        # a Watch open, so their connections are never idle.
        ("grpc.max_connection_idle_ms", int(max_connection_idle * 1000)),
    ]


GRPC_OPTIONS: list[tuple[str, Any]] = grpc_options()


def server_options(ns: argparse.Namespace) -> list[tuple[str, Any]]:
    """The channel arguments for the parsed flags (the defaults give :data:`GRPC_OPTIONS`)."""
    return grpc_options(ns.keepalive_time, ns.keepalive_timeout, ns.max_request_size, ns.max_connection_idle)


def listen_target(addr: str) -> str:
    """``:3000`` → ``[::]:3000``; ``127.0.0.1:3000`` unchanged (HostPortError names a bad one)."""
    host, port = split_listen(addr)
    return f"[::]:{port}" if host is None else addr.strip()


def bind_host_port(addr: str) -> tuple[str, int]:
    """A checked listen address as the (host, port) to bind; every address is ``::``."""
    host, port = split_listen(addr)
    return host or "::", port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="discovery-service",
        description="Self-hosted, server-blind node discovery registry, wire-compatible with Talos Linux.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=version_string("discovery-service"))
    p.add_argument(
        "--addr", default=":3000", help="gRPC listen address (h2c, or TLS with --certificate-path)"
    )
    p.add_argument(
        "--landing-addr", default=":3001", help="landing page (/, /stats, /healthz); empty disables"
    )
    p.add_argument("--metrics-addr", default=":2122", help="Prometheus /metrics; empty disables")
    p.add_argument(
        "--certificate-path", default="", help="TLS certificate (PEM); reloaded when the file changes"
    )
    p.add_argument("--key-path", default="", help="TLS private key (PEM)")
    p.add_argument(
        "--gc-interval", type=parse_duration, default="1m", help="expired-entry collection interval"
    )
    p.add_argument(
        "--stun-addr",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="answer STUN Binding requests on this UDP address (repeatable; e.g. :3478, or one per public "
        "IP so nodes can classify their NAT); stateless; off when not given",
    )
    p.add_argument(
        "--stun-rate-limit",
        type=float,
        default=stun.RATE,
        help="STUN replies/s per source address (IPv6: per /64); 0 disables",
    )
    p.add_argument("--stun-rate-burst", type=float, default=stun.BURST, help="STUN rate-limit burst")
    p.add_argument("--redirect-endpoint", default="", help="redirect every client to this HOST:PORT")
    p.add_argument(
        "--snapshot-path", default=DEFAULT_SNAPSHOT_PATH, help="state snapshot; empty disables persistence"
    )
    p.add_argument(
        "--snapshot-interval",
        type=parse_duration,
        default="10m",
        help="snapshot (journal compaction) interval",
    )
    p.add_argument(
        "--journal-fsync-interval", type=parse_duration, default="1s", help="group-commit fsync interval"
    )
    p.add_argument(
        "--store",
        choices=("embedded", "etcd"),
        default="embedded",
        help="where the registry lives: embedded (memory + journal + snapshots at --snapshot-path; one "
        "process) or etcd (any number of stateless replicas sharing an etcd v3 cluster; the --snapshot-* "
        "and --journal-* flags are then unused)",
    )
    p.add_argument(
        "--etcd-endpoint",
        action="append",
        default=[],
        metavar="URL",
        help="etcd client URL, http://host:port or https://host:port (repeatable; required with --store etcd)",
    )
    p.add_argument(
        "--etcd-ca", default="", help="CA bundle (PEM) for https etcd endpoints (default: system roots)"
    )
    p.add_argument("--etcd-cert", default="", help="client certificate (PEM) for etcd; with --etcd-key")
    p.add_argument("--etcd-key", default="", help="client private key (PEM) for etcd; with --etcd-cert")
    p.add_argument(
        "--etcd-prefix",
        default=DEFAULT_PREFIX,
        help="key prefix in etcd (several registries can share one etcd under different prefixes)",
    )
    p.add_argument(
        "--etcd-lease-bucket",
        type=parse_duration,
        default=f"{DEFAULT_BUCKET:g}s",
        help="TTLs share one etcd lease per bucket of this length: expiry is never early and at most one "
        "bucket late",
    )
    p.add_argument(
        "--import-snapshot",
        default="",
        metavar="FILE",
        help="with --store etcd: before serving, import an embedded-store snapshot (the file --snapshot-path "
        "writes; the journal segments beside it are replayed too) into etcd: every unexpired affiliate with "
        "its data, endpoints and remaining TTLs, under etcd's limits; idempotent (a second import changes "
        "nothing); a damaged snapshot or journal is refused (exit 2, nothing imported); the counts are logged",
    )
    p.add_argument(
        "--import-only",
        action="store_true",
        help="with --import-snapshot: exit after the import instead of serving (0: done; 1: etcd failed, "
        "or etcd's limits refused some affiliates; 2: the snapshot was refused)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="honour X-Real-IP / X-Forwarded-For only from these peers (repeatable; default: none)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=limits.RATE_LIMIT_PER_SECOND,
        help="requests/s per client IP (0 disables)",
    )
    p.add_argument(
        "--rate-burst", type=int, default=limits.RATE_LIMIT_BURST, help="rate-limit burst per client IP"
    )
    p.add_argument(
        "--rate-limit-max-wait",
        type=parse_duration,
        default="10s",
        help="longest a call waits for a rate-limit token (or its deadline, when sooner); calls that "
        "would wait longer get RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--disable-client-ip-reporting", action="store_true", help="leave client_ip empty in Hello"
    )
    p.add_argument(
        "--max-watches",
        type=int,
        default=MAX_WATCHES,
        help="open Watch streams in total (~20 KiB each when idle); more are refused (0: no limit)",
    )
    p.add_argument(
        "--max-watches-per-ip",
        type=int,
        default=MAX_WATCHES_PER_IP,
        help="open Watch streams per client IP (IPv6: per /64); a full cluster may share one NAT "
        "address (0: no limit)",
    )
    p.add_argument(
        "--watch-stall-timeout",
        type=parse_duration,
        default=f"{WATCH_STALL_TIMEOUT:g}s",
        help="a Watch stream whose write makes no progress for this long is ABORTED (0 disables)",
    )
    p.add_argument(
        "--watch-inflight-budget",
        type=parse_size,
        default=f"{WATCH_INFLIGHT_BUDGET >> 20}MiB",
        help="bytes of Watch messages being written, all streams together; past it writes wait and "
        "streams that stopped reading are shed (0: no budget)",
    )
    p.add_argument(
        "--watch-inflight-per-ip",
        type=parse_size,
        default=f"{WATCH_INFLIGHT_PER_IP >> 20}MiB",
        help="one client address's share of --watch-inflight-budget (IPv6: per /64), so streams that "
        "never read cannot starve other clients' watches (0: no share limit)",
    )
    p.add_argument(
        "--watch-snapshots-per-ip",
        type=int,
        default=WATCH_SNAPSHOTS_PER_IP,
        help="Watch snapshots sent at once to one client address (IPv6: per /64); its other new "
        "watches wait their turn (0: no limit)",
    )
    p.add_argument(
        "--keepalive-time",
        type=parse_duration,
        default=f"{KEEPALIVE_TIME:g}s",
        help="ping a connection after this long without traffic",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=parse_duration,
        default=f"{KEEPALIVE_TIMEOUT:g}s",
        help="close a connection whose ping is not answered (or whose sent data stays unacknowledged) "
        "for this long",
    )
    p.add_argument(
        "--max-request-size",
        type=parse_size,
        default=f"{MAX_REQUEST_SIZE >> 10}KiB",
        help="longest request message accepted; longer ones get RESOURCE_EXHAUSTED before they are "
        "parsed (valid requests are under 5 KiB)",
    )
    p.add_argument(
        "--max-connection-idle",
        type=parse_duration,
        default=f"{MAX_CONNECTION_IDLE:g}s",
        help="close a client connection that has had no call for this long",
    )
    p.add_argument("--no-rpc-log", action="store_true", help="do not log one line per RPC")
    p.add_argument(
        "--debug", action="store_true", default=os.environ.get("MODE") == "dev", help="debug logging"
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = list(sys.argv[1:] if argv is None else argv)
    # Accept Go-style single-dash long flags (-addr=:3000) as upstream documents them.
    args = [
        ("-" + a) if a.startswith("-") and not a.startswith("--") and len(a.split("=")[0]) > 2 else a
        for a in args
    ]
    ns = build_parser().parse_args(args)
    try:
        ns.trusted_proxy = [ipaddress.ip_network(c, strict=False) for c in ns.trusted_proxy]
    except ValueError as e:
        build_parser().error(f"--trusted-proxy: {e}")
    if bool(ns.certificate_path) != bool(ns.key_path):
        build_parser().error("--certificate-path and --key-path must be given together")
    for name in ("addr", "landing_addr", "metrics_addr"):
        value = getattr(ns, name)
        if value:
            try:
                listen_target(value)
            except argparse.ArgumentTypeError as e:
                build_parser().error(f"--{name.replace('_', '-')}: {e}")
    ns.stun_addr = [a for a in ns.stun_addr if a]  # an empty value (a config default) means off
    for value in ns.stun_addr:
        try:
            listen_target(value)
        except argparse.ArgumentTypeError as e:
            build_parser().error(f"--stun-addr: {e}")
    if ns.stun_rate_limit < 0 or ns.stun_rate_burst < 1:
        build_parser().error("--stun-rate-limit must not be negative and --stun-rate-burst at least 1")
    for name in (
        "max_watches",
        "max_watches_per_ip",
        "watch_stall_timeout",
        "watch_inflight_budget",
        "watch_inflight_per_ip",
        "watch_snapshots_per_ip",
    ):
        if getattr(ns, name) < 0:
            build_parser().error(f"--{name.replace('_', '-')} must not be negative")
    if not 8 << 10 <= ns.max_request_size <= 4 << 20:
        build_parser().error(f"--max-request-size: {ns.max_request_size} bytes, allowed 8KiB to 4MiB")
    if ns.max_connection_idle < 1:
        build_parser().error("--max-connection-idle must be at least 1s")
    if ns.keepalive_time < 1 or ns.keepalive_timeout < 1:
        build_parser().error("--keepalive-time and --keepalive-timeout must be at least 1s")
    if ns.gc_interval <= 0 or ns.snapshot_interval <= 0:
        build_parser().error("--gc-interval and --snapshot-interval must be positive")
    check_etcd_flags(ns)
    return ns


def check_etcd_flags(ns: argparse.Namespace) -> None:
    """``--store etcd`` needs endpoints; etcd flags need ``--store etcd``; TLS files need https."""
    err = build_parser().error
    etcd_flags = [
        f"--{n.replace('_', '-')}"
        for n in ("etcd_endpoint", "etcd_ca", "etcd_cert", "etcd_key", "import_snapshot")
        if getattr(ns, n, None)
    ]
    if getattr(ns, "import_only", False) and not ns.import_snapshot:
        err("--import-only needs --import-snapshot FILE")
    if ns.store != "etcd":
        if etcd_flags:
            err(f"{', '.join(etcd_flags)} given without --store etcd")
        return
    if not ns.etcd_endpoint:
        err("--store etcd needs at least one --etcd-endpoint URL")
    try:
        endpoints = [Endpoint.parse(u) for u in ns.etcd_endpoint]
    except ValueError as e:
        err(f"--etcd-endpoint: {e}")
    if bool(ns.etcd_cert) != bool(ns.etcd_key):
        err("--etcd-cert and --etcd-key must be given together")
    if (ns.etcd_ca or ns.etcd_cert) and not any(e.secure for e in endpoints):
        err("--etcd-ca/--etcd-cert/--etcd-key need https:// etcd endpoints")
    for name in ("etcd_ca", "etcd_cert", "etcd_key"):
        path = getattr(ns, name)
        if path and not os.access(path, os.R_OK):
            err(f"--{name.replace('_', '-')}: cannot read {path}")
    if not ns.etcd_prefix:
        err("--etcd-prefix must not be empty")
    if ns.etcd_lease_bucket < 1:
        err("--etcd-lease-bucket must be at least 1s")


class ReloadingCertificate:
    """Serves the current certificate; re-reads the files when their mtime changes."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._stamp = self._mtimes()
        self.reloads = 0

    def _mtimes(self) -> tuple[int, int]:
        return self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns

    def config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            cfg = self.config()
        except OSError as e:
            log_event(
                log, "certificate reload failed; keeping the previous one", logging.WARNING, error=str(e)
            )
            return None
        self._stamp = stamp
        self.reloads += 1
        log_event(log, "certificate reloaded", path=str(self.cert))
        return cfg

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.config(), self.fetch, require_client_authentication=False
        )


SNAPSHOT_LOAD_RESULTS = ("absent", "verified", "unverified", "damaged", "missing")


class StorageMetrics:
    """Persistence health: what the last load found, and whether writes can be journalled now."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.degraded = Gauge(
            "discovery_storage_degraded",
            "1 while the journal cannot be written or synced: updates and deletes are refused with "
            "UNAVAILABLE and health is NOT_SERVING (/healthz says why).",
            registry=r,
        )
        self.load_problems = Counter(
            "discovery_storage_load_problems",
            "Problems found in the state files at start-up (damaged snapshot, damaged journal records, ...).",
            ["file"],
            registry=r,
        )
        self.load_snapshot = Gauge(
            "discovery_storage_load_snapshot",
            "The snapshot's verification at start-up: 1 for the outcome (verified against the journal's "
            "checkpoint, unverified, damaged or missing and rebuilt from the journal, absent).",
            ["result"],
            registry=r,
        )
        for result in SNAPSHOT_LOAD_RESULTS:
            self.load_snapshot.labels(result).set(0)
        self.load_problems.labels("snapshot")
        self.load_problems.labels("journal")


@dataclass
class Daemon:
    ns: argparse.Namespace

    def __post_init__(self) -> None:
        self.metrics = Metrics()
        self.storage_metrics = StorageMetrics(self.metrics)
        self.stun_metrics = stun.StunMetrics(self.metrics.registry)
        self._stun: list[stun.Listener] = []
        self.backend: Backend
        self.store: Store | None = None
        if getattr(self.ns, "store", "embedded") == "etcd":
            ns = self.ns
            etcd = EtcdBackend(
                ns.etcd_endpoint,
                prefix=ns.etcd_prefix,
                tls=_etcd_tls(ns),
                bucket=ns.etcd_lease_bucket,
                metrics=self.metrics.registry,
            )
            etcd.on_health_change = self._storage_health_changed
            self.backend = etcd
            self.registry = etcd.mirror  # what this replica's watchers see (stats, metrics)
        else:
            self.registry = Registry()
            self.store = (
                Store(Path(self.ns.snapshot_path), on_health_change=self._storage_health_changed)
                if self.ns.snapshot_path
                else None
            )
            self.backend = EmbeddedBackend(self.registry, self.store)
        self.storage_problem: str | None = None  # why the journal cannot be written (last applied)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        self._background: set[asyncio.Task[Any]] = set()
        config = ServiceConfig(
            redirect_endpoint=self.ns.redirect_endpoint,
            trusted_proxies=tuple[IPNetwork, ...](self.ns.trusted_proxy),
            rate_limit=self.ns.rate_limit,
            rate_burst=self.ns.rate_burst,
            rate_max_wait=self.ns.rate_limit_max_wait,
            client_ip_reporting=not self.ns.disable_client_ip_reporting,
            log_rpcs=not self.ns.no_rpc_log,
            max_watches=self.ns.max_watches,
            max_watches_per_ip=self.ns.max_watches_per_ip,
            watch_stall_timeout=self.ns.watch_stall_timeout,
            watch_inflight_budget=self.ns.watch_inflight_budget,
            watch_inflight_per_ip=self.ns.watch_inflight_per_ip,
            watch_snapshots_per_ip=self.ns.watch_snapshots_per_ip,
        )
        self.service = ClusterService(self.backend, None, config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.stopping = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}
        if getattr(self.ns, "store", "embedded") == "etcd":
            store_kind = "etcd"
        else:
            store_kind = "file" if self.store is not None else "memory"
        self.landing = Landing(self.registry, self.metrics.rpcs, store_kind, lambda: self.storage_problem)
        if self.store is not None:
            JournalFailures(self.store, self.metrics.registry)
        if getattr(self.ns, "certificate_path", ""):
            CertificateExpiry(Path(self.ns.certificate_path), self.metrics.registry)

    def load(self) -> LoadReport | None:
        if self.store is None:
            return None
        t0 = time.perf_counter()
        report = self.store.load(self.registry)
        damage = report.damage
        sm = self.storage_metrics
        for problem in report.problems:
            sm.load_problems.labels("snapshot" if problem.startswith("snapshot") else "journal").inc()
            if damage is not None and problem == damage.message:
                continue  # logged below, at ERROR
            log_event(log, "state file problem (skipped)", logging.WARNING, problem=problem)
        sm.load_snapshot.labels(report.snapshot).set(1)
        if damage is not None:
            log_event(
                log,
                "snapshot damaged: not loaded, state rebuilt from the journal",
                logging.ERROR,
                path=str(self.store.snapshot_path),
                problem=damage.message,
                found=damage.found,
                length=damage.length,
                crc32=f"{damage.crc:#010x}" if damage.crc is not None else None,
                expected_length=damage.expected_length,
                expected_crc32=f"{damage.expected_crc:#010x}",
                checkpoint=damage.checkpoint,
                kept_as=damage.kept_as,
                journal_segments=list(damage.segments) if damage.segments else None,
                clusters_recovered=damage.clusters,
                affiliates_recovered=damage.affiliates,
                affiliates_readable=damage.readable,
                affiliates_lost_readable=damage.lost_readable,
            )
        elif report.note:
            log_event(
                log, f"snapshot {report.snapshot}", note=report.note, path=str(self.store.snapshot_path)
            )
        status = "error" if report.problems else "ok"
        self.metrics.storage_ops.labels("load", status).inc()
        self._record_storage(
            "load", report.clusters, report.affiliates, report.endpoints, time.perf_counter() - t0
        )
        log_event(
            log,
            "state restored",
            path=self.ns.snapshot_path,
            snapshot=report.snapshot,
            clusters=report.clusters,
            affiliates=report.affiliates,
            endpoints=report.endpoints,
            journal_records=report.records,
        )
        return report

    # -- storage health ---------------------------------------------------------------------------

    def _storage_health_changed(self, _reason: str | None) -> None:
        """Store callback (any thread): apply the new state on the event loop."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            self._apply_storage_health()
        else:
            loop.call_soon_threadsafe(self._apply_storage_health)

    def _apply_storage_health(self) -> None:
        """Gauge, one log line per transition, gRPC health; a recovery from an fsync failure compacts."""
        reason = self.backend.health()
        before, self.storage_problem = self.storage_problem, reason
        if reason == before:
            return
        if self.store is None:  # etcd (or no persistence): the backend logs and counts its own state
            self._spawn(self._push_health())
            return
        self.storage_metrics.degraded.set(1 if reason else 0)
        if reason:
            log_event(
                log,
                "storage degraded: updates and deletes are refused (UNAVAILABLE) until the journal "
                "can be written again",
                logging.ERROR,
                reason=reason,
                path=str(self.store.snapshot_path),
            )
        else:
            log_event(log, "storage recovered: the journal can be written again", previously=before)
        self._spawn(self._push_health())
        if reason is None and before and "fsync" in before and self._serving:
            # Records of a segment whose fsync failed may not be on disk: write them all again.
            self._spawn(self.compact())

    def _spawn(self, coro: Any) -> None:
        if self._loop is None:
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _push_health(self) -> None:
        if not self._serving:
            return  # run() sets the initial status
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if self.storage_problem
            else health_pb2.HealthCheckResponse.SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    def _record_storage(
        self, op: str, clusters: int, affiliates: int, endpoints: int, duration: float
    ) -> None:
        m = self.metrics.storage_last
        m["clusters"].labels(op).set(clusters)
        m["affiliates"].labels(op).set(affiliates)
        m["endpoints"].labels(op).set(endpoints)
        m["duration_seconds"].labels(op).set(duration)

    async def compact(self, in_thread: bool = True) -> None:
        """Snapshot at a consistent point (on the loop), write it in a worker thread."""
        if self.store is None:
            return
        try:
            pending = self.store.begin_compact(self.registry)
            r = await asyncio.to_thread(pending.finish) if in_thread else pending.finish()
        except Exception as e:
            # The previous snapshot and the journal that continues it are still in place.
            self.metrics.storage_ops.labels("save", "error").inc()
            log_event(
                log,
                "snapshot failed; the previous snapshot and the journal stay in use",
                logging.ERROR,
                error=str(e),
            )
            return
        self.metrics.storage_ops.labels("save", "ok").inc()
        self.metrics.storage_size.set(r.size)
        self._record_storage("save", r.clusters, r.affiliates, r.endpoints, r.duration)
        log_event(
            log,
            "snapshot saved",
            size=r.size,
            clusters=r.clusters,
            affiliates=r.affiliates,
            duration_s=round(r.duration, 3),
        )

    async def _every(self, interval: float, fn: Any) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)
            if self.stopping.is_set():
                return
            res = fn()
            if asyncio.iscoroutine(res):
                await res

    def gc(self) -> None:
        st = self.backend.gc()
        self.service.limiter.gc()
        m = self.metrics
        m.gc_runs.inc()
        m.gc_clusters.inc(st.clusters)
        m.gc_affiliates.inc(st.affiliates)
        m.refresh_state(self.registry)

    async def sync(self) -> None:
        """Group commit; while degraded, first probe whether the journal can be written again."""
        store = self.store
        if store is None:
            return
        if store.degraded:
            store.probe()
        try:
            await asyncio.to_thread(store.sync)
        except OSError:
            pass  # the store is degraded now: reported once, by _apply_storage_health
        except Exception as e:
            log_event(log, "journal sync failed", logging.ERROR, error=str(e))

    # -- HTTP pages -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What /stats serves: counts and cumulative counters only (see discovery.server.landing)."""
        return self.landing.stats()

    async def _healthz(self, _: web.Request) -> web.Response:
        if self.stopping.is_set():
            return web.Response(status=503, text="stopping\n")
        if self.storage_problem:
            what = "store (etcd)" if self.store is None else "storage"
            return web.Response(
                status=503, text=f"degraded: registry {what} unavailable: {self.storage_problem}\n"
            )
        return web.Response(text="ok\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        self.metrics.refresh_state(self.registry)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve_http(self, name: str, addr: str, routes: list[web.RouteDef]) -> None:
        app = web.Application()
        app.add_routes(routes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = bind_host_port(addr)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.ports[name] = sockets[0].getsockname()[1] if sockets else port

    async def _serve_stun(self) -> bool:
        """Bind every ``--stun-addr`` (one rate table shared by all); False (logged) if one cannot."""
        limiter = stun.RateTable(self.ns.stun_rate_limit, self.ns.stun_rate_burst)
        for i, addr in enumerate(self.ns.stun_addr):
            responder = stun.StunResponder(limiter)
            host, port = bind_host_port(addr)
            try:
                listener, bound = await stun.serve(host, port, responder)
            except OSError as e:
                log_event(log, "cannot listen", logging.ERROR, stun_addr=addr, error=str(e))
                self._close_stun()
                return False
            self._stun.append(listener)
            self.stun_metrics.responders.append(responder)
            self.ports["stun" if i == 0 else f"stun{i}"] = bound
        return True

    def _close_stun(self) -> None:
        for listener in self._stun:
            listener.close()
        self._stun.clear()

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        report = self.load()
        if report is not None and report.damage is not None:
            # Write a verified snapshot of what was recovered now, rather than at the first interval.
            await self.compact(in_thread=False)
        await self.backend.start()
        if isinstance(self.backend, EtcdBackend) and not await self.backend.wait_ready(10.0):
            # Serve anyway: calls fail with UNAVAILABLE until etcd answers; /healthz says why.
            log_event(log, "etcd not ready; serving UNAVAILABLE until it is", logging.WARNING)
        server = grpc.aio.server(options=server_options(self.ns))
        server.add_generic_rpc_handlers((self.service.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        target = listen_target(self.ns.addr)
        try:
            if self.ns.certificate_path:
                cert = ReloadingCertificate(Path(self.ns.certificate_path), Path(self.ns.key_path))
                port = server.add_secure_port(target, cert.credentials())
            else:
                port = server.add_insecure_port(target)
        except (OSError, RuntimeError) as e:
            log_event(log, "cannot listen", logging.ERROR, addr=self.ns.addr, error=str(e))
            return 1
        self.ports["grpc"] = port
        if not await self._serve_stun():
            return 1
        await server.start()
        if self.ns.landing_addr:
            await self._serve_http(
                "landing",
                self.ns.landing_addr,
                [
                    *self.landing.routes(),
                    web.get("/healthz", self._healthz),
                ],
            )
        if self.ns.metrics_addr:
            await self._serve_http("metrics", self.ns.metrics_addr, [web.get("/metrics", self._metrics)])
        self._serving = True
        self._apply_storage_health()
        initial = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if self.storage_problem
            else health_pb2.HealthCheckResponse.SERVING
        )
        await self.health.set("", initial)
        await self.health.set(SERVICE, initial)
        log_event(
            log,
            "serving",
            grpc=f"{target.rsplit(':', 1)[0]}:{port}",
            tls=bool(self.ns.certificate_path),
            landing=self.ns.landing_addr or None,
            metrics=self.ns.metrics_addr or None,
            stun=self.ns.stun_addr or None,
            ports=self.ports,
            persistence=self.ns.snapshot_path or None
            if self.store is not None
            else (
                f"etcd {','.join(self.ns.etcd_endpoint)} prefix {self.ns.etcd_prefix}"
                if getattr(self.ns, "store", "embedded") == "etcd"
                else None
            ),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        tasks = [
            asyncio.create_task(self._every(self.ns.gc_interval, self.gc)),
            asyncio.create_task(self._every(self.ns.snapshot_interval, self.compact)),
            asyncio.create_task(self._every(self.ns.journal_fsync_interval, self.sync)),
        ]
        await self.stopping.wait()
        log_event(log, "shutting down")
        await self.health.enter_graceful_shutdown()
        self.service.close_watches()
        await server.stop(5)
        self.service.flush_logs()
        for t in tasks:
            t.cancel()
        for runner in self._runners:
            await runner.cleanup()
        self._close_stun()
        await self.backend.stop()
        if self.store is not None:
            await self.compact(in_thread=False)
            try:
                self.store.close()
            except OSError as e:
                log_event(log, "journal close failed", logging.ERROR, error=str(e))
        log_event(log, "stopped")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    setup(debug=ns.debug)
    if ns.snapshot_path and ns.store == "embedded":
        d = Path(ns.snapshot_path).parent
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log_event(log, "cannot create the snapshot directory", logging.ERROR, path=str(d), error=str(e))
            return 1
    if getattr(ns, "import_snapshot", ""):
        rc = asyncio.run(import_into_etcd(ns))
        if rc or ns.import_only:
            return rc
    return asyncio.run(Daemon(ns).run())


def _etcd_tls(ns: argparse.Namespace) -> TLSFiles:
    return TLSFiles(
        Path(ns.etcd_ca) if ns.etcd_ca else None,
        Path(ns.etcd_cert) if ns.etcd_cert else None,
        Path(ns.etcd_key) if ns.etcd_key else None,
    )


async def import_into_etcd(ns: argparse.Namespace) -> int:
    """``--import-snapshot``: 0 imported, 1 etcd failed (safe to run again), 2 snapshot refused."""
    try:
        report = await migrate.run_import(
            ns.import_snapshot,
            ns.etcd_endpoint,
            prefix=ns.etcd_prefix,
            tls=_etcd_tls(ns),
            bucket=ns.etcd_lease_bucket,
        )
    except migrate.ImportRefused as e:
        log_event(log, "snapshot import refused", logging.ERROR, path=ns.import_snapshot, problem=str(e))
        print(f"discovery-service: import refused: {e}", file=sys.stderr)
        return 2
    except migrate.ImportFailed as e:
        log_event(log, "snapshot import failed", logging.ERROR, path=ns.import_snapshot, problem=str(e))
        print(f"discovery-service: import failed: {e}", file=sys.stderr)
        return 1
    log_event(log, "snapshot imported into etcd", path=ns.import_snapshot, **report.summary())
    if ns.import_only:
        s = report.summary()
        print(
            f"imported {s['clusters']} clusters, {s['affiliates']} affiliates, {s['endpoints']} endpoints "
            f"({s['written']} written, {s['unchanged']} already in etcd); skipped as expired: "
            f"{s['expired_affiliates']} affiliates, {s['expired_endpoints']} endpoints; "
            f"refused by limits: {s['rejected']}"
        )
    # Entries refused by etcd's limits are logged (by position); --import-only says so with exit 1.
    return 1 if report.rejected and ns.import_only else 0


if __name__ == "__main__":
    sys.exit(main())
