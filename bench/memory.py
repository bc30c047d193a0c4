"""Memory: 1000 clusters x 100 affiliates with realistic blob sizes; server RSS target <= 1 GiB.

Blob sizes follow what Talos publishes: affiliate data 300-700 bytes of
ciphertext, 2-4 endpoints (16 bytes for IPv4, 32 for IPv6). The load is sent
over gRPC from this process to a real server process; RSS is read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

from discovery.testing import ServerProcess
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc

TARGET_MIB = 1024


async def fill(target: str, clusters: int, per_cluster: int, concurrency: int) -> int:
    rnd = random.Random(1)
    sent = 0
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.ClusterStub(ch)
        queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue(maxsize=concurrency * 4)

        async def worker() -> None:
            nonlocal sent
            while (item := await queue.get()) is not None:
                c, a = item
                eps = [os.urandom(rnd.choice((16, 16, 32))) for _ in range(rnd.randint(2, 4))]
                req = pb.AffiliateUpdateRequest(
                    cluster_id=f"cluster-{c:05d}-{'k' * 32}",
                    affiliate_id=f"node-{a:04d}-{'n' * 38}",
                    affiliate_data=os.urandom(rnd.randint(300, 700)),
                    affiliate_endpoints=eps,
                )
                req.ttl.seconds = 1800
                await stub.AffiliateUpdate(req)
                sent += 1

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        for c in range(clusters):
            for a in range(per_cluster):
                await queue.put((c, a))
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    return sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--affiliates", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=128)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "state", "--no-rpc-log") as server:
        assert server.proc is not None
        before = server.rss_mib()
        t0 = time.monotonic()
        sent = asyncio.run(fill(server.target, ns.clusters, ns.affiliates, ns.concurrency))
        dt = time.monotonic() - t0
        time.sleep(1)
        after = server.rss_mib()
        stats = json.loads(server.http_get("landing", "/stats"))
    print(f"filled {sent} affiliates in {dt:.1f} s ({sent / dt:.0f}/s); server reports {stats}")
    print(f"server RSS: {before:.0f} MiB idle -> {after:.0f} MiB loaded")
    verdict = "PASS" if after <= TARGET_MIB and stats["affiliates"] == ns.clusters * ns.affiliates else "MISS"
    print(f"RESULT memory rss_mib={after:.0f} target<={TARGET_MIB} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
