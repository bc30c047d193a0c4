"""Hostile-client drivers for the registry's abuse test and benchmark (test support only).

Every attack here comes from one client address: gRPC's Python client cannot bind a
source address, so calls go through a :class:`~discovery.hostile.FreezableProxy` whose
upstream sockets are bound to the attacker's address (``127.0.0.66``), and raw sockets
(:func:`~discovery.hostile.open_stalled_watches`) bind it themselves; the server's per-IP
limits see one hostile client. Nothing here is imported by product
code; traffic goes to loopback only and every loop ends at a deadline.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from discovery.hostile import FreezableProxy, close_all, open_stalled_watches
from discovery.limits import RATE_LIMIT_BURST
from discovery.testing import ServerProcess
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc

ATTACKER_IP = "127.0.0.66"
EVIL_CLUSTER = "evil"


def fill_sources(n: int, burst: int = RATE_LIMIT_BURST) -> list[str]:
    """Enough loopback addresses (127.0.0.10, ...) to send ``n`` updates within their bursts."""
    return [f"127.0.0.{10 + i}" for i in range(-(-n // burst))]


@dataclass
class Tally:
    """What one attack or client loop saw: status codes by name, and latencies of OK calls
    (all together, and by operation)."""

    codes: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    by_op: dict[str, list[float]] = field(default_factory=dict)

    def add(self, code: str, seconds: float | None = None, op: str = "") -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if seconds is not None and code == "OK":
            self.latencies.append(seconds)
            if op:
                self.by_op.setdefault(op, []).append(seconds)

    @property
    def failures(self) -> int:
        return sum(n for c, n in self.codes.items() if c != "OK")

    def p99_ms(self, op: str = "") -> float:
        """Nearest-rank p99 of the OK calls' latencies (of ``op`` only, when given)."""
        values = self.by_op.get(op, []) if op else self.latencies
        if not values:
            return float("nan")
        s = sorted(values)
        return s[min(len(s) - 1, int(0.99 * len(s)))] * 1000


async def _timed(tally: Tally, call: Callable[[], Awaitable[object]], op: str = "") -> None:
    t0 = time.perf_counter()
    try:
        await call()
        tally.add("OK", time.perf_counter() - t0, op)
    except grpc.aio.AioRpcError as e:
        tally.add(e.code().name)
    except (TimeoutError, EOFError) as e:
        tally.add(type(e).__name__)


async def flood(until: float, make: Callable[[int], Awaitable[object]], width: int = 32) -> Tally:
    """Run ``make(i)`` calls ``width`` at a time until the monotonic deadline ``until``."""
    tally = Tally()
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.monotonic() < until:
            await _timed(tally, lambda: make(next(counter)))

    await asyncio.gather(*(worker() for _ in range(width)))
    return tally


async def hello_versions(target: str, server: str, until: float) -> Tally:
    """Hellos whose client_version is a new, long, version-shaped string every call (metric labels)."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.ClusterStub(ch)

        def make(i: int) -> Awaitable[object]:
            version = f"v{i}{'9' * 200}.{i}{'8' * 200}-attack{i}"
            return stub.Hello(pb.HelloRequest(cluster_id="evil", client_version=version), timeout=5)

        return await flood(until, make)


async def long_ids(target: str, server: str, until: float, size: int = 30_000) -> Tally:
    """AffiliateUpdates whose ids are far over their limit but fit in a request (log and error
    amplification: every one is parsed, refused, and logged)."""
    return await oversized_ids(target, server, until, size)


async def oversized_ids(target: str, server: str, until: float, size: int = 1 << 20) -> Tally:
    """AffiliateUpdates with 1 MiB ids (memory: what the server buffers and decodes per call)."""
    big = "x" * size
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        stub = rpc.ClusterStub(ch)

        def make(i: int) -> Awaitable[object]:
            req = pb.AffiliateUpdateRequest(cluster_id=big, affiliate_id=f"{i}{big}")
            return stub.AffiliateUpdate(req, timeout=5)

        return await flood(until, make, width=8)


async def legit_client(target: str, until: float, cid: str = "legit-cluster") -> Tally:
    """A well-behaved node: Hello, AffiliateUpdate, List, and a Watch that sees its own updates.

    Three unary calls every 0.4 s (7.5/s) stay under the default rate limit (15/s per address), as
    a real node does (it updates every few minutes): the limiter's waits are not what is measured.
    """
    tally = Tally()
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.ClusterStub(ch)
        watch = stub.Watch(pb.WatchRequest(cluster_id=cid))
        await _timed(tally, lambda: watch.read())
        i = 0
        while time.monotonic() < until:
            i += 1
            hello = pb.HelloRequest(cluster_id=cid, client_version="v1.9.0")
            await _timed(tally, lambda h=hello: stub.Hello(h, timeout=5), "Hello")
            req = pb.AffiliateUpdateRequest(cluster_id=cid, affiliate_id="node-1", affiliate_data=b"%d" % i)
            req.ttl.seconds = 1800
            await _timed(tally, lambda r=req: stub.AffiliateUpdate(r, timeout=5), "AffiliateUpdate")

            async def seen(want: bytes = b"%d" % i) -> None:
                while True:
                    msg = await watch.read()
                    if msg is grpc.aio.EOF:
                        raise EOFError("watch ended")
                    if any(a.data == want for a in msg.affiliates):
                        return

            await _timed(tally, lambda: asyncio.wait_for(seen(), 5), "Watch")
            await _timed(tally, lambda: stub.List(pb.ListRequest(cluster_id=cid), timeout=5), "List")
            await asyncio.sleep(0.4)
        watch.cancel()
    return tally


Attack = Callable[[str, str, float], Awaitable[Tally]]
"""``attack(relay, server, deadline)``: gRPC calls through ``relay`` (the attacker's address), or
raw sockets bound to :data:`ATTACKER_IP` to ``server``, until the monotonic ``deadline``."""


@dataclass
class Report:
    """One abuse run: the server's RSS before and at its peak, what the normal client and
    each attack saw, and how much the log and /metrics grew."""

    rss_before_mib: float
    rss_peak_mib: float
    legit: Tally
    attacks: dict[str, Tally]
    log_growth_bytes: int
    metrics_bytes: int

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_peak_mib - self.rss_before_mib

    def describe(self) -> str:
        attacks = "; ".join(f"{k}: {v.codes}" for k, v in self.attacks.items())
        ops = ", ".join(f"{op} {self.legit.p99_ms(op):.1f}" for op in sorted(self.legit.by_op))
        return (
            f"server RSS {self.rss_before_mib:.1f} -> peak {self.rss_peak_mib:.1f} MiB "
            f"(+{self.rss_growth_mib:.1f}); normal client {self.legit.codes} p99 {self.legit.p99_ms():.1f} ms ({ops}); "
            f"log +{self.log_growth_bytes} bytes; /metrics {self.metrics_bytes} bytes; attacks: {attacks}"
        )


async def run(srv: ServerProcess, attacks: Sequence[str], seconds: float) -> Report:
    """Run the named :data:`ATTACKS` from :data:`ATTACKER_IP` (in a process of their own, as a
    remote attacker would be: its threads must not slow the normal client's event loop) and a
    normal client from 127.0.0.1 for ``seconds``, sampling the server's RSS every 0.2 s."""
    assert srv.proc is not None and srv.log_path is not None
    before = srv.rss_mib()
    log_before = srv.log_path.stat().st_size
    peak = before
    until = time.monotonic() + seconds  # CLOCK_MONOTONIC is system-wide: the child uses it too

    async def sample() -> None:
        nonlocal peak
        while time.monotonic() < until + 1:
            peak = max(peak, srv.rss_mib())
            await asyncio.sleep(0.2)

    attacker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "discovery.abuse",
        srv.target,
        repr(until),
        *attacks,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        sampler = asyncio.create_task(sample())
        legit = await legit_client(srv.target, until)
        await sampler
        out, _ = await asyncio.wait_for(attacker.communicate(), 60)
    finally:
        if attacker.returncode is None:
            attacker.kill()
            await attacker.wait()
    if attacker.returncode:
        raise RuntimeError(f"the attacker process failed (exit {attacker.returncode})")
    tallies = {k: Tally(codes=v) for k, v in json.loads(out).items()}
    metrics = await asyncio.to_thread(srv.http_get, "metrics", "/metrics")
    return Report(
        rss_before_mib=before,
        rss_peak_mib=peak,
        legit=legit,
        attacks=tallies,
        log_growth_bytes=srv.log_path.stat().st_size - log_before,
        metrics_bytes=len(metrics),
    )


async def stalled_watches(target: str, server: str, until: float, batch: int = 50, most: int = 2000) -> Tally:
    """Watch streams on the full cluster that are never read, opened ``batch`` at a time (one TCP
    connection each) until the deadline or ``most``, and held until the deadline."""
    tally = Tally()
    socks: list[socket.socket] = []
    try:
        while time.monotonic() < until and len(socks) < most:
            try:
                socks += await asyncio.to_thread(
                    open_stalled_watches, server, EVIL_CLUSTER, batch, source=ATTACKER_IP
                )
                tally.add("OPENED", None)
            except OSError as e:
                tally.add(type(e).__name__)
                await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, until - time.monotonic()))
    finally:
        close_all(socks)
    return tally


ATTACKS: dict[str, Attack] = {
    "stalled_watches": stalled_watches,
    "hello_versions": hello_versions,
    "oversized_ids": oversized_ids,
    "long_ids": long_ids,
}
"""Every registry attack, by name (the abuse test runs them together, the benchmark one by one)."""


async def _attack(server: str, until: float, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Every named attack at once, through one relay bound to ATTACKER_IP; their status counts."""
    relay = await FreezableProxy(server, source=ATTACKER_IP).start()
    try:
        tallies = await asyncio.gather(*(ATTACKS[n](relay.addr, server, until) for n in names))
    finally:
        await relay.close()
    return {n: t.codes for n, t in zip(names, tallies, strict=True)}


if __name__ == "__main__":  # the attacker process of run(): SERVER DEADLINE ATTACK...
    print(json.dumps(asyncio.run(_attack(sys.argv[1], float(sys.argv[2]), sys.argv[3:]))))
