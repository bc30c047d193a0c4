"""Registry replicas on etcd (issue 15): update throughput against the embedded store, and etcd writes
per key in a steady mesh.

1. Throughput: ``--procs`` load processes, each with ``--concurrency`` callers, send AffiliateUpdates
   that always change the data (every one must be stored: 500 new random bytes, 2 endpoints) for
   ``--seconds``, against (a) one discovery-service on the embedded store (journal on disk), (b) one
   replica on a 3-member etcd cluster, (c) three replicas on it (the load processes spread over them).
   Targets: (b)/(a) >= 0.5; (c)/(b) >= 1.2. All of it shares this machine's cores (etcd members,
   replicas and load), so (c) measures what a second and third replica add when they compete with
   etcd for the same cores, a harder setting than separate hosts.
2. Writes: 50 real ``DiscoveryClient`` s (one per node, each also publishing the endpoints it observed
   for the other 49, as the mesh does) refresh every TTL/2 against one replica; after one TTL of
   warm-up, every PUT under the registry's etcd prefix is counted (an etcd watch) for ``--periods``
   TTLs. Target: <= 2 writes per key per TTL period. The TTL is shortened (``--ttl``, default 20 s, with
   a 1 s lease bucket: the same bucket/TTL order as 60 s against Talos's 30 min).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from discovery.client.client import DiscoveryClient
from discovery.etcd.client import EtcdClient, EventType
from discovery.testing import ServerProcess, etcd_store_flags
from spanapi.discovery.client import affiliate_pb2
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc
from spanutil.etcdlab import EtcdLab

NAME = "registry_ha"
ONE_TARGET = 0.5  # one etcd replica / embedded
SCALE_TARGET = 1.2  # three replicas / one replica
WRITES_TARGET = 2.0  # etcd writes per key per TTL period
PREFIX = "/discovery/"


# -- 1. throughput ------------------------------------------------------------------------------------


async def _load(target: str, tag: str, concurrency: int, seconds: float) -> int:
    ok = 0
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.ClusterStub(ch)
        deadline = time.monotonic() + seconds

        async def caller(i: int) -> None:
            nonlocal ok
            eps = [os.urandom(16), os.urandom(16)]
            while time.monotonic() < deadline:
                req = pb.AffiliateUpdateRequest(
                    cluster_id="ha-bench",
                    affiliate_id=f"{tag}-{i}",
                    affiliate_data=os.urandom(500),
                    affiliate_endpoints=eps,
                )
                req.ttl.seconds = 600
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.AffiliateUpdate(req, timeout=5)
                    ok += 1

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return ok


def _load_main(target: str, tag: str, concurrency: int, seconds: float, out: mp.Queue) -> None:
    out.put(asyncio.run(_load(target, tag, concurrency, seconds)))


def throughput(targets: Sequence[str], procs: int, concurrency: int, seconds: float) -> float:
    """Acknowledged updates per second, the load processes spread over ``targets``."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    ps = [
        ctx.Process(target=_load_main, args=(targets[i % len(targets)], f"p{i}", concurrency, seconds, out))
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in ps)
    for p in ps:
        p.join(10)
    return total / seconds


# -- 2. writes per key ----------------------------------------------------------------------------------


def _affiliate(i: int) -> affiliate_pb2.Affiliate:
    a = affiliate_pb2.Affiliate(node_id=f"node-{i:02d}", nodename=f"node-{i:02d}", hostname=f"node-{i:02d}")
    a.addresses.append(bytes([10, 9, 0, i + 1]))
    return a


def _endpoint(i: int) -> affiliate_pb2.Endpoint:
    return affiliate_pb2.Endpoint(ip=bytes([203, 0, 113, i + 1]), port=51820)


async def writes_per_key(
    endpoint: str, etcd: Sequence[str], nodes: int, ttl: float, periods: int
) -> tuple[float, int, int]:
    """(writes per key per TTL period, PUT events counted, keys)."""
    secret = os.urandom(32)
    clients = [
        DiscoveryClient(
            [endpoint], cluster_id="ha-writes", secret=secret, affiliate_id=f"node-{i:02d}", ttl=ttl
        )
        for i in range(nodes)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)
        for i, c in enumerate(clients):
            others = {f"node-{j:02d}": [_endpoint(j)] for j in range(nodes) if j != i}
            await c.set_local_data(_affiliate(i), [_endpoint(i)], others)
        await asyncio.sleep(ttl)  # warm-up: every key written once, refreshes under way
        etcd_client = EtcdClient(etcd)
        puts = 0
        keys: set[bytes] = set()

        async def count() -> None:
            nonlocal puts
            async for batch in etcd_client.watch(PREFIX, prefix=True):
                for ev in batch.events:
                    if ev.type == EventType.PUT and b"/c/" in ev.kv.key:
                        puts += 1
                        keys.add(ev.kv.key)

        counter = asyncio.create_task(count())
        await asyncio.sleep(ttl * periods)
        counter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counter
        stored = await etcd_client.range(PREFIX + "c/", prefix=True, count_only=True)
        await etcd_client.close()
    n_keys = stored.count
    return puts / max(n_keys, 1) / periods, puts, n_keys


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--procs", type=int, default=3, help="load processes")
    ap.add_argument("--concurrency", type=int, default=32, help="callers per load process")
    ap.add_argument("--seconds", type=float, default=6.0, help="per throughput run")
    ap.add_argument("--rounds", type=int, default=2, help="throughput runs per setting (the median counts)")
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--ttl", type=float, default=20.0)
    ap.add_argument("--periods", type=int, default=2)
    ap.add_argument("--skip-writes", action="store_true")
    ns = ap.parse_args()
    base = ["--no-rpc-log"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        embedded = stack.enter_context(ServerProcess(Path(tmp) / "state", *base))
        etcd = stack.enter_context(EtcdLab(Path(tmp) / "etcd", 3))
        flags = [
            *base,
            "--etcd-lease-bucket",
            "1",
            *etcd_store_flags(etcd.endpoints),
        ]
        replicas = [stack.enter_context(ServerProcess(None, *flags)) for _ in range(3)]
        runs: dict[str, list[float]] = {"embedded": [], "one": [], "three": []}
        for _ in range(ns.rounds):
            runs["embedded"].append(throughput([embedded.target], ns.procs, ns.concurrency, ns.seconds))
            runs["one"].append(throughput([replicas[0].target], ns.procs, ns.concurrency, ns.seconds))
            runs["three"].append(
                throughput([r.target for r in replicas], ns.procs, ns.concurrency, ns.seconds)
            )
        med = {k: statistics.median(v) for k, v in runs.items()}
        for k, v in runs.items():
            print(f"  {k}: {' '.join(f'{x:.0f}' for x in v)} updates/s (median {med[k]:.0f})")
        one, scale = med["one"] / med["embedded"], med["three"] / med["one"]
        print(f"{NAME}: one replica on 3-member etcd / embedded store: {one:.2f} (target >= {ONE_TARGET})")
        print(
            f"{NAME}: three replicas / one replica: {scale:.2f} (target >= {SCALE_TARGET}; 2 cores shared with etcd and the load)"
        )
        print(
            f"RESULT {NAME} one_replica_ratio={one:.2f} target>={ONE_TARGET} {'PASS' if one >= ONE_TARGET else 'MISS'}"
        )
        print(
            f"RESULT {NAME} three_replica_scale={scale:.2f} target>={SCALE_TARGET} {'PASS' if scale >= SCALE_TARGET else 'MISS'}"
        )
        if not ns.skip_writes:
            per, puts, keys = asyncio.run(
                writes_per_key(f"http://{replicas[0].target}", etcd.endpoints, ns.nodes, ns.ttl, ns.periods)
            )
            print(
                f"{NAME}: {ns.nodes} nodes refreshing every TTL/2 (TTL {ns.ttl:g} s, 1 s lease bucket): "
                f"{puts} etcd writes to {keys} keys in {ns.periods} TTL periods = {per:.2f} per key per period"
            )
            print(
                f"RESULT {NAME} writes_per_key_per_ttl={per:.2f} target<={WRITES_TARGET:g} {'PASS' if per <= WRITES_TARGET else 'MISS'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
