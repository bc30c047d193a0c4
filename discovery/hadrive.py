"""A load of writers and watchers against registry replicas, recording what was acknowledged and seen
(issue 15's HA test and benchmark). Test support: nothing in the product imports it.

Each client ``c<i>`` writes its own affiliate every ``--interval`` seconds with data ``c<i>:<seq>``
(opaque to the registry, as ciphertext is) to one replica, moving to the next replica of the list when
a call fails; and watches the cluster on replica ``i mod n``, moving on when its stream breaks. At the
end (``--seconds``) every replica still answering is Listed. Everything goes to ``--out`` as one JSON
document: acknowledgements (time, seq, replica), failovers (time of the first failure, time of the next
success, from, to), each watch stream's events in order, and each replica's final List.

Run inside a lab node: ``python -m discovery.hadrive --replica IP:PORT ... --clients 20 --out FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc

CALL_TIMEOUT = 1.0  # an update not answered within this counts as failed (and is not acknowledged)
TTL = 300


@dataclass
class Failover:
    client: str
    failed_at: float
    resumed_at: float
    frm: str
    to: str
    error: str


@dataclass
class Stream:
    """One watch stream: the replica, when it opened and ended, and its events in order
    (``[t, affiliate id, data or None for a delete, snapshot?]``)."""

    client: str
    replica: str
    opened: float
    ended: float | None = None
    end: str = ""
    events: list[tuple[float, str, str | None, bool]] = field(default_factory=list)


@dataclass
class Result:
    cluster: str
    replicas: list[str]
    acks: dict[str, list[tuple[float, int, str]]] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    lists: dict[str, dict[str, str] | None] = field(default_factory=dict)
    started: float = 0.0
    stopped: float = 0.0


class Channels:
    def __init__(self, replicas: Sequence[str]) -> None:
        self.channels = {r: grpc.aio.insecure_channel(r, options=_OPTIONS) for r in replicas}
        self.stubs = {r: rpc.ClusterStub(ch) for r, ch in self.channels.items()}

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


_OPTIONS = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


async def writer(
    ch: Channels, res: Result, name: str, start: int, interval: float, stop: asyncio.Event
) -> None:
    replicas = res.replicas
    at, seq = start % len(replicas), 0
    acks = res.acks.setdefault(name, [])
    failed: tuple[float, str, str] | None = None
    while not stop.is_set():
        seq += 1
        replica = replicas[at]
        req = pb.AffiliateUpdateRequest(
            cluster_id=res.cluster,
            affiliate_id=name,
            affiliate_data=f"{name}:{seq}".encode(),
            ttl=duration_pb2.Duration(seconds=TTL),
        )
        try:
            await ch.stubs[replica].AffiliateUpdate(req, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            if failed is None:
                failed = (time.time(), replica, f"{e.code().name}: {e.details()}")
            at = (at + 1) % len(replicas)
            await asyncio.sleep(0.02)
            continue
        now = time.time()
        acks.append((now, seq, replica))
        if failed is not None:
            res.failovers.append(Failover(name, failed[0], now, failed[1], replica, failed[2]))
            failed = None
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


async def watcher(ch: Channels, res: Result, name: str, start: int, stop: asyncio.Event) -> None:
    replicas = res.replicas
    at = start % len(replicas)
    while not stop.is_set():
        replica = replicas[at]
        st = Stream(name, replica, time.time())
        res.streams.append(st)
        call = ch.stubs[replica].Watch(pb.WatchRequest(cluster_id=res.cluster))
        stopper = asyncio.create_task(stop.wait())
        try:
            first = True
            it = call.__aiter__()
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    call.cancel()
                    st.end = "stopped"
                    break
                msg = nxt.result()
                t = time.time()
                for a in msg.affiliates:
                    st.events.append(
                        (t, a.id, None if msg.deleted else a.data.decode(errors="replace"), first)
                    )
                first = False
        except StopAsyncIteration:
            st.end = "ended by the server"
        except grpc.aio.AioRpcError as e:
            st.end = f"{e.code().name}: {e.details()}"
        finally:
            stopper.cancel()
            st.ended = time.time()
        if not stop.is_set():
            at = (at + 1) % len(replicas)
            await asyncio.sleep(0.05)


async def list_all(ch: Channels, res: Result) -> None:
    for r, stub in ch.stubs.items():
        try:
            resp = await stub.List(pb.ListRequest(cluster_id=res.cluster), timeout=3)
        except grpc.aio.AioRpcError:
            res.lists[r] = None
            continue
        res.lists[r] = {a.id: a.data.decode(errors="replace") for a in resp.affiliates}


async def run(ns: argparse.Namespace) -> Result:
    res = Result(ns.cluster, list(ns.replica))
    ch = Channels(res.replicas)
    stop = asyncio.Event()
    res.started = time.time()
    tasks = []
    for i in range(ns.clients):
        name = f"c{i:02d}"
        tasks.append(asyncio.create_task(watcher(ch, res, name, i, stop)))
    await asyncio.sleep(0.5)  # the watches are open before the first write
    for i in range(ns.clients):
        tasks.append(asyncio.create_task(writer(ch, res, f"c{i:02d}", i, ns.interval, stop)))
    await asyncio.sleep(ns.seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    res.stopped = time.time()
    await asyncio.sleep(ns.settle)
    await list_all(ch, res)
    await ch.close()
    return res


@dataclass
class Report:
    """What :func:`analyse` found: problems (empty: every claim holds) and figures."""

    problems: list[str]
    acks: int
    events: int
    streams_checked: int
    failover_max: float | None
    failovers: int


def _seq(data: str | None) -> int | None:
    if data is None or ":" not in data:
        return None
    try:
        return int(data.rsplit(":", 1)[1])
    except ValueError:
        return None


def analyse(res: dict, survivors: Sequence[str], *, grace: float = 0.5) -> Report:
    """Check a run (the JSON of :class:`Result`) against the HA claims, for the replicas in
    ``survivors`` (those never killed):

    - every acknowledged update is readable from every survivor (its List holds that seq or a later one);
    - every watch stream on a survivor saw, per affiliate, strictly increasing seqs (no duplicate, no
      reorder) and every seq acknowledged after its snapshot and more than ``grace`` seconds before the
      stream ended (or the run stopped);
    - and how long clients took to move to another replica (first failure to next acknowledgement).
    """
    problems: list[str] = []
    last_ack = {c: max((a[1] for a in acks), default=0) for c, acks in res["acks"].items()}
    for r in survivors:
        listed = res["lists"].get(r)
        if listed is None:
            problems.append(f"replica {r}: List failed at the end")
            continue
        for c, seq in last_ack.items():
            got = _seq(listed.get(c))
            if seq and (got is None or got < seq):
                problems.append(f"replica {r}: {c} acknowledged seq {seq}, List has {listed.get(c)!r}")
    checked = events = 0
    for st in res["streams"]:
        if st["replica"] not in survivors:
            continue
        checked += 1
        end = st["ended"] if st["ended"] is not None else res["stopped"]
        seen: dict[str, list[int]] = {}
        base: dict[str, int] = {}
        for _t, aid, data, snap in st["events"]:
            events += 1
            q = _seq(data)
            if q is None:
                continue
            if snap:
                base[aid] = max(base.get(aid, 0), q)
                continue
            prev = seen.setdefault(aid, [])
            last = prev[-1] if prev else base.get(aid, 0)
            if q <= last:
                problems.append(f"{st['client']} on {st['replica']}: {aid} seq {q} after {last}")
            prev.append(q)
        first_t = st["events"][0][0] if st["events"] else end
        for c, acks in res["acks"].items():
            got = set(seen.get(c, ()))
            missing = [
                q for t, q, _r in acks if first_t < t < end - grace and q > base.get(c, 0) and q not in got
            ]
            if missing:
                problems.append(
                    f"{st['client']} on {st['replica']}: {len(missing)} acknowledged updates of {c} never "
                    f"seen (first seq {missing[0]})"
                )
    fo = [f["resumed_at"] - f["failed_at"] for f in res["failovers"]]
    return Report(
        problems,
        sum(len(a) for a in res["acks"].values()),
        events,
        checked,
        max(fo) if fo else None,
        len(fo),
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--replica", action="append", required=True, help="IP:PORT of a replica (repeat)")
    ap.add_argument("--cluster", default="ha-cluster")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between a client's updates")
    ap.add_argument("--seconds", type=float, default=20, help="how long the clients write")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between the last write and the Lists")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args(argv)
    res = asyncio.run(run(ns))
    tmp = ns.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(res)))
    tmp.replace(ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
