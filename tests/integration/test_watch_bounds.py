"""Watch streams against a real discovery-service: what clients that never read, open too many
streams, or vanish behind a dead link can make the server hold.

The hostile clients are in discovery/hostile.py (raw HTTP/2 Watch streams that are never read, a
cluster filled with maximum-size affiliates, a TCP proxy that stops forwarding).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import grpc
import pytest

from discovery import hostile
from discovery.testing import ServerProcess
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc

Start = Callable[..., ServerProcess]
CID = "bounds-cluster"
FULL = 1024  # affiliates in a full cluster; with maximum sizes a snapshot is ~4.3 MiB
MIB = 1 << 20
# Per stalled stream the server may hold one snapshot chunk twice (our copy and grpc-core's) plus
# the stream's own state: ~180 KiB measured. Before the bounds it held the whole snapshot and more
# (~3.2 MiB per stream with this client; 5.4 MiB reported with a larger receive buffer).
STREAM_BOUND = 512 << 10
FIXED_SLACK = 32 * MIB


def subscriptions(srv: ServerProcess) -> int:
    return int(json.loads(srv.http_get("landing", "/stats"))["subscriptions"])


def stalled(srv: ServerProcess) -> float:
    """Watches aborted because their writes stalled (the timeout) or shed for the in-flight budget."""
    return metric(srv, 'discovery_server_watch_stalled_total{reason="timeout"}') + metric(
        srv, 'discovery_server_watch_stalled_total{reason="pressure"}'
    )


def metric(srv: ServerProcess, series: str) -> float:
    for line in srv.http_get("metrics", "/metrics").decode().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {series} in /metrics")


async def full_server(discovery_server: Start, *flags: str) -> ServerProcess:
    """A server (no RPC log, state in memory) holding a full cluster of maximum-size affiliates."""
    srv = discovery_server("--no-rpc-log", *flags, state_dir=None)
    assert await hostile.fill_cluster(srv.target, CID, FULL) == FULL
    return srv


async def wait_for(cond: Callable[[], bool], limit: float, what: str, step: float = 0.1) -> float:
    """Poll ``cond`` (run in a thread: it may do blocking HTTP) until true, for at most ``limit``
    seconds; return the time taken."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(cond):
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic() - t0


async def read_snapshot(call: grpc.aio.UnaryStreamCall, n: int) -> set[str]:
    """Read messages until ``n`` affiliates arrived (a large snapshot comes in several messages)."""
    ids: set[str] = set()
    while len(ids) < n:
        msg = await call.read()
        assert msg is not grpc.aio.EOF
        ids.update(a.id for a in msg.affiliates)
    return ids


async def test_stalled_watches_hold_bounded_memory_and_are_aborted(discovery_server: Start) -> None:
    # Every stream sends its snapshot at once (no per-address snapshot slots): what one stalled
    # stream holds, and the stall timeout; the slots are tested below and in the abuse test.
    n = 200
    srv = await full_server(
        discovery_server,
        "--watch-stall-timeout",
        "3s",
        "--keepalive-timeout",
        "60s",
        "--watch-snapshots-per-ip",
        "0",
    )
    base = srv.rss_mib() * MIB
    socks = hostile.open_stalled_watches(srv.target, CID, n)
    try:
        # every stream subscribed: held now, or already shed (its writes stalled past the timeout, or
        # it waited for the address's in-flight budget); on a slow day the first streams are shed
        # before the last ones subscribe, so the active count alone need never reach n
        await wait_for(lambda: subscriptions(srv) + stalled(srv) >= n, 10, "the stalled watches to subscribe")
        peak = base
        for _ in range(15):  # the writes stall within ~1 s; sample while they are held
            peak = max(peak, srv.rss_mib() * MIB)
            await asyncio.sleep(0.1)
        growth = peak - base
        bound = n * STREAM_BOUND + FIXED_SLACK
        print(
            f"\n{n} stalled watches on a full cluster: RSS {base / MIB:.1f} -> {peak / MIB:.1f} MiB, "
            f"+{growth / n / 1024:.0f} KiB per stream (bound {bound / MIB:.0f} MiB, "
            f"in flight {metric(srv, 'discovery_server_watch_inflight_bytes') / MIB:.1f} MiB)"
        )
        assert growth <= bound

        # a normal watcher is served meanwhile, and after the stalled ones are gone
        async with (
            grpc.aio.insecure_channel(srv.target) as ch,
            grpc.aio.insecure_channel(srv.target) as writer_ch,
        ):
            watch = rpc.ClusterStub(ch).Watch(pb.WatchRequest(cluster_id=CID), timeout=60)
            assert len(await read_snapshot(watch, FULL)) == FULL
            # stalled past the timeout, or shed sooner while the address waited for its share of
            # the in-flight budget (--watch-inflight-per-ip: 8 MiB, ~128 chunks of the 200 streams)
            took = await wait_for(
                lambda: stalled(srv) >= n,
                15,
                "the stalled watches to be aborted",
            )
            print(f"stalled watches aborted within {took:.1f} s of the check (stall timeout 3 s)")
            assert subscriptions(srv) == 1
            req = pb.AffiliateUpdateRequest(cluster_id=CID, affiliate_id="fill-7", affiliate_data=b"new")
            req.ttl.seconds = 600
            await rpc.ClusterStub(writer_ch).AffiliateUpdate(req, timeout=5)
            msg = await asyncio.wait_for(watch.read(), 10)
            assert [(a.id, a.data) for a in msg.affiliates] == [("fill-7", b"new")]
            watch.cancel()
        assert metric(srv, "discovery_server_watch_inflight_bytes") == 0
    finally:
        hostile.close_all(socks)


async def test_budget_pressure_sheds_stalled_streams_for_readers(discovery_server: Start) -> None:
    # 2 MiB for all watch writes: ~32 stalled streams exhaust it; the readers' writes must not starve
    # (the per-address limits, which would stop one address first, are off here)
    srv = await full_server(
        discovery_server,
        *("--watch-inflight-budget", "2MiB", "--keepalive-timeout", "60s"),
        *("--watch-snapshots-per-ip", "0", "--watch-inflight-per-ip", "0"),
    )
    socks = hostile.open_stalled_watches(srv.target, CID, 100, source="127.0.0.2")
    try:
        await wait_for(
            lambda: metric(srv, "discovery_server_watch_inflight_bytes") > 1.5 * MIB, 10, "the budget to fill"
        )
        async with grpc.aio.insecure_channel(srv.target) as ch:
            t0 = time.monotonic()
            calls = [rpc.ClusterStub(ch).Watch(pb.WatchRequest(cluster_id=CID), timeout=60) for _ in range(3)]
            for got in await asyncio.gather(*(read_snapshot(c, FULL) for c in calls)):
                assert len(got) == FULL
            took = time.monotonic() - t0
            print(
                f"\n3 readers got a full snapshot in {took:.1f} s next to 100 stalled streams (2 MiB budget)"
            )
            assert took < 20
            for c in calls:
                c.cancel()
        assert metric(srv, 'discovery_server_watch_stalled_total{reason="pressure"}') > 0
    finally:
        hostile.close_all(socks)


async def test_watch_caps_per_ip_and_total(discovery_server: Start) -> None:
    srv = discovery_server(
        "--max-watches-per-ip", "4", "--max-watches", "10", "--trusted-proxy", "127.0.0.0/8", state_dir=None
    )

    def md(ip: str) -> tuple[tuple[str, str], ...]:
        return (("x-real-ip", ip),)

    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)

        async def open_watch(ip: str) -> grpc.aio.UnaryStreamCall:
            call = stub.Watch(pb.WatchRequest(cluster_id=CID), metadata=md(ip), timeout=60)
            await call.read()  # the (empty) snapshot: the watch is open
            return call

        async def refused(ip: str) -> str:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await open_watch(ip)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return ei.value.details() or ""

        a = [await open_watch("198.51.100.1") for _ in range(4)]
        assert "from this client address (limit 4)" in await refused("198.51.100.1")
        # IPv6 clients count per /64
        v6 = [await open_watch(f"2001:db8:1:2::{i}") for i in range(1, 5)]
        assert "limit 4" in await refused("2001:db8:1:2::99")
        # raw streams that are never read count too (here by their source address: no header)
        socks = hostile.open_stalled_watches(srv.target, CID, 2, source="127.0.0.3")
        try:
            await wait_for(lambda: subscriptions(srv) == 10, 10, "10 watches")
            assert "on this server (limit 10)" in await refused("198.51.100.2")
            # a refusal storm writes a bounded number of lines
            for _ in range(100):
                await refused("198.51.100.3")
            assert metric(srv, 'discovery_server_watch_refused_total{reason="per_ip"}') == 2
            assert metric(srv, 'discovery_server_watch_refused_total{reason="total"}') == 101
            # a slot comes back when a watch ends
            a.pop().cancel()
            await wait_for(lambda: subscriptions(srv) == 9, 10, "the cancelled watch to go")
            a.append(await open_watch("198.51.100.1"))
        finally:
            hostile.close_all(socks)
        for c in a + v6:
            c.cancel()
    await asyncio.sleep(0.2)
    lines = [r for r in srv.lines() if r.get("msg") == "watch refused: too many watches"]
    assert 1 <= len(lines) <= 2, lines  # at most one per 10 s
    assert lines[0]["level"] == "warning" and lines[0]["limit"] == 4


async def _half_open_client_is_dropped(srv: ServerProcess, bound: float) -> float:
    proxy = await hostile.FreezableProxy(srv.target).start()
    try:
        ch = grpc.aio.insecure_channel(proxy.addr)
        stub = rpc.ClusterStub(ch)
        calls = [stub.Watch(pb.WatchRequest(cluster_id=CID)) for _ in range(50)]
        for c in calls:
            await c.read()
        assert subscriptions(srv) == 50
        proxy.freeze()  # the link goes down: no FIN, no RST, nothing answers
        took = await wait_for(lambda: subscriptions(srv) == 0, bound + 30, "the half-open watches to go", 0.5)
        print(f"\n50 half-open watches dropped {took:.1f} s after the link froze (bound {bound:.0f} s)")
        assert took <= bound
        for c in calls:
            c.cancel()
        await ch.close(0)
        return took
    finally:
        await proxy.close()


async def test_keepalive_drops_half_open_clients(discovery_server: Start) -> None:
    srv = discovery_server("--keepalive-time", "1s", "--keepalive-timeout", "1s", state_dir=None)
    await _half_open_client_is_dropped(srv, 1 + 1 + 3)


async def test_idle_connections_are_closed(discovery_server: Start) -> None:
    # A connection whose only watch was refused (per-IP cap 1) has no call left: it is closed
    # after --max-connection-idle, so refused clients cannot hold connection memory forever.
    srv = discovery_server("--max-watches-per-ip", "1", "--max-connection-idle", "1s", state_dir=None)
    held = hostile.open_stalled_watches(srv.target, CID, 1, source="127.0.0.77")
    refused: list[socket.socket] = []
    try:
        # the second watch must be the refused one: open it only once the first holds the slot
        await wait_for(lambda: subscriptions(srv) == 1, 10, "the first watch to subscribe")
        refused = hostile.open_stalled_watches(srv.target, CID, 1, source="127.0.0.77")
        sock = refused[0]
        sock.settimeout(15)

        def drained() -> bool:
            while chunk := sock.recv(65536):  # the refusal, GOAWAY, then EOF
                del chunk
            return True

        t0 = time.monotonic()
        assert await asyncio.to_thread(drained)
        print(f"refused watch's connection closed after {time.monotonic() - t0:.1f} s (idle limit 1 s)")
        assert subscriptions(srv) == 1  # the held watch is a call: its connection is not idle
    finally:
        hostile.close_all(held + refused)


async def test_one_address_gets_a_few_snapshots_at_a_time(discovery_server: Start) -> None:
    # 50 stalled watches from one address on a full cluster: only --watch-snapshots-per-ip (4)
    # of them send their snapshot at once, so little is pinned and another address's watch is
    # served at once; the address's own reader waits its turn, then the stalled are shed.
    srv = await full_server(discovery_server, "--watch-snapshots-per-ip", "4")
    socks = hostile.open_stalled_watches(srv.target, CID, 50, source="127.0.0.3")
    try:
        await wait_for(lambda: subscriptions(srv) == 50, 10, "the stalled watches to subscribe")
        inflight = metric(srv, "discovery_server_watch_inflight_bytes")
        assert inflight <= 4 * 80 * 1024, inflight  # four chunks of ~64 KiB at most
        async with grpc.aio.insecure_channel(srv.target) as ch:
            other = rpc.ClusterStub(ch).Watch(pb.WatchRequest(cluster_id=CID), timeout=60)
            assert len(await asyncio.wait_for(read_snapshot(other, FULL), 10)) == FULL
            other.cancel()
        proxy = await hostile.FreezableProxy(srv.target, source="127.0.0.3").start()
        try:
            async with grpc.aio.insecure_channel(proxy.addr) as ch:
                same = rpc.ClusterStub(ch).Watch(pb.WatchRequest(cluster_id=CID), timeout=60)
                t0 = time.monotonic()
                assert len(await asyncio.wait_for(read_snapshot(same, FULL), 45)) == FULL
                print(
                    f"a reader behind 50 stalled watches of its address got its snapshot in {time.monotonic() - t0:.1f} s"
                )
                same.cancel()
        finally:
            await proxy.close()
        assert metric(srv, 'discovery_server_watch_stalled_total{reason="pressure"}') >= 4
    finally:
        hostile.close_all(socks)
