"""Watch fan-out: one update in a 1024-affiliate cluster reaching all 1024 watchers.

A separate process opens N Watch streams (spread over several channels) on a
cluster that already holds N affiliates; the parent then updates one affiliate
with new data carrying its send time (CLOCK_MONOTONIC is system-wide) and each
watcher records when the change arrived. Latency includes the watcher process's
own decode time, so the figure is pessimistic. Target: p99 <= 250 ms.

``--etcd N --replicas M`` (issue 15): the registry is M replicas (``--store etcd``) on an N-member etcd
cluster on loopback; the watchers are spread over the replicas (process ``i`` watches replica ``i mod
M``), the cluster is filled and the update sent through the first replica, so every other replica's
watchers get it through etcd's watch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import grpc

from discovery.testing import ServerProcess, etcd_store_flags
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc
from spanutil.etcdlab import EtcdLab

TARGET_P99_MS = 250.0
CLUSTER = "fanout-bench-cluster"


def _ttl(req: pb.AffiliateUpdateRequest) -> pb.AffiliateUpdateRequest:
    req.ttl.seconds = 1800
    return req


async def _watchers(target: str, n: int, channels: int, updates: int, ready: mp.Queue, out: mp.Queue) -> None:
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    latencies: list[float] = []
    seen = [0]
    done = asyncio.Event()
    started = [0]

    async def one(i: int) -> None:
        stub = rpc.ClusterStub(chans[i % channels])
        stream = stub.Watch(pb.WatchRequest(cluster_id=CLUSTER))
        first = True
        async for msg in stream:
            now = time.monotonic()
            if first:
                first = False
                started[0] += 1
                if started[0] == n:
                    ready.put("ready")
                continue
            for a in msg.affiliates:
                if a.id == "writer" and len(a.data) >= 8:
                    latencies.append(now - struct.unpack(">d", a.data[:8])[0])
                    seen[0] += 1
            if seen[0] >= n * updates:
                done.set()

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        await asyncio.wait_for(done.wait(), timeout=60 + updates * 5)
    finally:
        for t in tasks:
            t.cancel()
        out.put(latencies)
        for c in chans:
            await c.close()


def watcher_main(target: str, n: int, channels: int, updates: int, ready: mp.Queue, out: mp.Queue) -> None:
    asyncio.run(_watchers(target, n, channels, updates, ready, out))


async def fill(target: str, n: int) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.ClusterStub(ch)
        sem = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            async with sem:
                await stub.AffiliateUpdate(
                    _ttl(
                        pb.AffiliateUpdateRequest(
                            cluster_id=CLUSTER,
                            affiliate_id="writer" if i == 0 else f"node-{i:04d}",
                            affiliate_data=os.urandom(500),
                            affiliate_endpoints=[os.urandom(16), os.urandom(16)],
                        )
                    )
                )

        await asyncio.gather(*(put(i) for i in range(n)))


async def push(target: str, updates: int, gap: float) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.ClusterStub(ch)
        for _ in range(updates):
            await asyncio.sleep(gap)
            data = struct.pack(">d", time.monotonic()) + os.urandom(492)
            await stub.AffiliateUpdate(
                _ttl(
                    pb.AffiliateUpdateRequest(cluster_id=CLUSTER, affiliate_id="writer", affiliate_data=data)
                )
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watchers", type=int, default=1024)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between updates")
    ap.add_argument("--procs", type=int, default=1, help="watcher processes (the watchers are split evenly)")
    ap.add_argument("--etcd", type=int, default=0, help="etcd members (0: the embedded store)")
    ap.add_argument("--replicas", type=int, default=1, help="registry replicas on etcd (with --etcd)")
    ns = ap.parse_args()
    if ns.replicas > 1 and not ns.etcd:
        ap.error("--replicas needs --etcd (replicas share their state through etcd)")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        flags = ["--no-rpc-log", "--max-watches-per-ip", "0"]
        if ns.etcd:
            etcd = stack.enter_context(EtcdLab(Path(tmp) / "etcd", ns.etcd))
            flags += etcd_store_flags(etcd.endpoints)
            servers = [stack.enter_context(ServerProcess(None, *flags)) for _ in range(ns.replicas)]
        else:
            servers = [stack.enter_context(ServerProcess(Path(tmp) / "state", *flags))]
        server = servers[0]
        asyncio.run(fill(server.target, ns.watchers))
        ctx = mp.get_context("spawn")
        ready, out = ctx.Queue(), ctx.Queue()
        share = ns.watchers // ns.procs
        procs = [
            ctx.Process(
                target=watcher_main,
                args=(servers[i % len(servers)].target, share, ns.channels, ns.updates, ready, out),
            )
            for i in range(ns.procs)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        asyncio.run(push(server.target, ns.updates, ns.gap))
        lat = sorted(x for _ in procs for x in out.get(timeout=120 + ns.updates * 5))
        for p in procs:
            p.join(10)
    expected = share * ns.procs * ns.updates
    if not lat:
        print("RESULT watch_fanout p99_ms=nan target<=250 MISS (no notification received)")
        return 1
    q = statistics.quantiles(lat, n=100)
    p50, p99, mx = q[49] * 1000, q[98] * 1000, lat[-1] * 1000
    where = f"{ns.replicas} replica(s) on {ns.etcd} etcd member(s)" if ns.etcd else "embedded store"
    print(f"watchers={ns.watchers} over {where} updates={ns.updates} deliveries={len(lat)}/{expected}")
    print(f"latency ms: p50={p50:.1f} p99={p99:.1f} max={mx:.1f}")
    verdict = "PASS" if p99 <= TARGET_P99_MS and len(lat) == expected else "MISS"
    print(f"RESULT watch_fanout p99_ms={p99:.1f} target<={TARGET_P99_MS:.0f} {verdict}")
    print(json.dumps({"p50_ms": p50, "p99_ms": p99, "max_ms": mx, "deliveries": len(lat)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
