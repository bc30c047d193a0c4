"""Registry replicas on etcd (issue 15): update throughput against the embedded store, and etcd writes
per key in a steady mesh.

1. Throughput: ``--procs`` load processes, each with ``--concurrency`` callers, send AffiliateUpdates
   that always change the data (every one must be stored: 500 random bytes per caller whose first 8
   are a per-call counter, 2 endpoints) for ``--seconds``, against (a) one discovery-service on the
   embedded store (journal on disk), (b) one replica on a 3-member etcd cluster, (c) three replicas on
   it (every load process has ``--conns`` connections to each replica, its callers spread over them).
   Only updates answered with grpc-status 0 count; each setting first runs ``--warmup`` seconds
   unmeasured (the affiliates exist before a measured run, so it measures updates, not adds). Targets: (b)/(a) >= 0.5; (c)/(b) >= 1.2. All of it
   shares this machine's cores (etcd members, replicas and load), so (c) measures what a second and
   third replica add when they compete with etcd for the same cores, a harder setting than separate
   hosts. The load uses ``spanutil.h2unary`` (pre-built request bytes on raw HTTP/2), about a tenth of
   a grpc.aio client's CPU per call, so the cores go to the servers. Each run prints the CPU (from
   /proc/PID/stat) each role used per acknowledged update, and the cores they kept busy.
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
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discovery.client.client import DiscoveryClient
from discovery.etcd.client import EtcdClient, EventType
from discovery.testing import ServerProcess, etcd_store_flags
from spanapi.discovery.client import affiliate_pb2
from spanapi.discovery.server import cluster_pb2 as pb
from spanutil.etcdlab import EtcdLab
from spanutil.h2unary import CountingBody, H2UnaryConnection, closed_loop

NAME = "registry_ha"
ONE_TARGET = 0.5  # one etcd replica / embedded
SCALE_TARGET = 1.2  # three replicas / one replica
WRITES_TARGET = 2.0  # etcd writes per key per TTL period
PREFIX = "/discovery/"


# -- 1. throughput ------------------------------------------------------------------------------------

UPDATE = "/sidero.discovery.server.Cluster/AffiliateUpdate"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15: utime, stime


def machine_cpu() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine so far, all cores, from /proc/stat: what other
    programs on a shared machine took shows as busy beyond the roles' sum."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / TICK, f[4] / TICK


def _update_body(affiliate: str) -> CountingBody:
    """An AffiliateUpdate serialized once: 500 random bytes of data (the first 8 a per-call counter,
    so each update stores different bytes), 2 endpoints, TTL 10 min."""
    data = os.urandom(500)
    req = pb.AffiliateUpdateRequest(
        cluster_id="ha-bench",
        affiliate_id=affiliate,
        affiliate_data=data,
        affiliate_endpoints=[os.urandom(16), os.urandom(16)],
    )
    req.ttl.seconds = 600
    msg = req.SerializeToString()
    return CountingBody(msg, msg.index(data))


async def _load(
    targets: Sequence[str], tag: str, conns: int, concurrency: int, seconds: float, ready: mp.Queue, go: Any
) -> tuple[int, int, float, float]:
    """One load process: ``conns`` connections to each target, ``concurrency`` callers over them."""
    links = []
    for _ in range(conns):
        for t in targets:
            host, port = t.rsplit(":", 1)
            links.append(await H2UnaryConnection.connect(host, int(port)))
    bodies = [_update_body(f"{tag}-{i}") for i in range(concurrency)]
    ready.put(os.getpid())
    await asyncio.to_thread(go.wait)
    cpu0 = cpu_seconds(os.getpid())
    res = await closed_loop(links, UPDATE, bodies, seconds)
    cpu = cpu_seconds(os.getpid()) - cpu0
    for c in links:
        await c.close()
    return res.ok, res.failed, res.seconds, cpu


def _load_main(
    targets: Sequence[str],
    tag: str,
    conns: int,
    concurrency: int,
    seconds: float,
    ready: mp.Queue,
    go: Any,
    out: mp.Queue,
) -> None:
    out.put(asyncio.run(_load(targets, tag, conns, concurrency, seconds, ready, go)))


def _gather(q: mp.Queue, ps: Sequence[Any], timeout: float) -> list[Any]:
    """One item from ``q`` per process of ``ps``; a clear error as soon as one of them died."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < len(ps):
        try:
            got.append(q.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in ps if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in ps:
                    p.kill()
                raise RuntimeError(f"load processes failed (exit codes {dead}) or timed out") from None
    return got


@dataclass
class Run:
    """One throughput run: acknowledged and failed updates, wall seconds, CPU seconds per role."""

    ok: int
    failed: int
    seconds: float
    cpu: dict[str, float]
    machine: tuple[float, float]  # (busy, iowait) CPU seconds of the whole machine during the run

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


def throughput(
    targets: Sequence[str],
    roles: dict[str, list[int]],
    procs: int,
    conns: int,
    concurrency: int,
    seconds: float,
) -> Run:
    """Acknowledged updates per second with every load process driving all of ``targets``, and the CPU
    each role (``roles``: name -> pids; plus "load") used while the load ran."""
    ctx = mp.get_context("spawn")
    ready: mp.Queue = ctx.Queue()
    out: mp.Queue = ctx.Queue()
    go = ctx.Event()
    ps = [
        ctx.Process(
            target=_load_main,
            args=(targets, f"p{i}", conns, concurrency, seconds, ready, go, out),
        )
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    _gather(ready, ps, 60)  # connected, bodies built: the start-up CPU is not counted
    before = {r: sum(cpu_seconds(pid) for pid in pids) for r, pids in roles.items()}
    m0 = machine_cpu()
    go.set()
    results = _gather(out, ps, seconds + 60)
    m1 = machine_cpu()
    cpu = {r: sum(cpu_seconds(pid) for pid in pids) - before[r] for r, pids in roles.items()}
    for p in ps:
        p.join(10)
    cpu["load"] = sum(r[3] for r in results)
    return Run(
        ok=sum(r[0] for r in results),
        failed=sum(r[1] for r in results),
        seconds=max(r[2] for r in results),
        cpu=cpu,
        machine=(m1[0] - m0[0], m1[1] - m0[1]),
    )


def cpu_line(runs: Sequence[Run]) -> str:
    """CPU ms per acknowledged update per role over ``runs`` (roles that stayed idle left out), the
    cores the roles kept busy, and the whole machine's busy and iowait cores meanwhile."""
    ok = sum(r.ok for r in runs) or 1
    wall = sum(r.seconds for r in runs) or 1.0
    per = {role: sum(r.cpu[role] for r in runs) * 1000 / ok for role in runs[0].cpu}
    parts = " | ".join(f"{role} {v:.3f}" for role, v in per.items() if v >= 0.0005)
    ours = sum(sum(r.cpu.values()) for r in runs) / wall
    busy = sum(r.machine[0] for r in runs) / wall
    iowait = sum(r.machine[1] for r in runs) / wall
    return (
        f"CPU ms per update: {parts} | total {sum(per.values()):.3f}; cores busy: these {ours:.2f}, "
        f"whole machine {busy:.2f} of {os.cpu_count()} (+{iowait:.2f} iowait)"
    )


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
    ap.add_argument("--procs", type=int, default=1, help="load processes")
    ap.add_argument("--conns", type=int, default=1, help="connections per load process and target")
    ap.add_argument("--concurrency", type=int, default=128, help="callers per load process")
    ap.add_argument("--seconds", type=float, default=6.0, help="per throughput run")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per setting first")
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
        assert embedded.proc is not None and all(r.proc is not None for r in replicas)
        roles = {
            "embedded": [embedded.proc.pid],
            "replica1": [replicas[0].proc.pid],
            "replicas2-3": [r.proc.pid for r in replicas[1:] if r.proc is not None],
            "etcd(3)": [m.proc.pid for m in etcd.members if m.proc is not None],
        }
        settings = {
            "embedded": [embedded.target],
            "one": [replicas[0].target],
            "three": [r.target for r in replicas],
        }
        for targets in settings.values():  # warm-up: affiliates created, leases made, caches filled
            throughput(targets, roles, ns.procs, ns.conns, ns.concurrency, ns.warmup)
        runs: dict[str, list[Run]] = {k: [] for k in settings}
        for _ in range(ns.rounds):
            for k, targets in settings.items():
                runs[k].append(throughput(targets, roles, ns.procs, ns.conns, ns.concurrency, ns.seconds))
        med = {k: statistics.median(r.rate for r in v) for k, v in runs.items()}
        print(
            f"  load: {ns.procs} process(es) x {ns.concurrency} callers, {ns.conns} connection(s) per target, "
            f"{ns.seconds:g} s per run; every update stores different data"
        )
        for k, v in runs.items():
            failed = sum(r.failed for r in v)
            print(
                f"  {k}: {' '.join(f'{r.rate:.0f}' for r in v)} acknowledged updates/s (median {med[k]:.0f}"
                f"{f'; {failed} failed' if failed else ''})"
            )
            print(f"    {cpu_line(v)}")
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
