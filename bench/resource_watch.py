"""Resource watch throughput: one writer updating resources, one local watcher; target >= 20,000 events/s.

The writer updates KubeSpanPeerStatus-shaped resources (a realistic spec:
label, endpoint, state, counters, timestamps) round-robin in a tight loop
through ``State.update`` (copy, no-op check, version bump, event fan-out),
yielding to the event loop every ``--yield-every`` writes, as a controller
does between runs. The watcher iterates ``State.watch`` (bootstrap first) and
counts UPDATED events. The figure is events delivered to the watcher per
second of wall time, from the first write to the last event received. The
run fails (MISS) if the watcher is dropped (ERRORED) or misses an event.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from machined.state import EventType, Resource, State
from machined.state.catalog import KUBESPAN_PEER_STATUS, NS_KUBESPAN

TARGET = 20_000


def peer_status(i: int) -> Resource:
    return Resource.new(
        NS_KUBESPAN,
        KUBESPAN_PEER_STATUS,
        f"peer-{i:04d}-{'k' * 34}=",
        {
            "endpoint": f"198.51.100.{i % 250}:51820",
            "label": f"node-{i:04d}",
            "state": "up",
            "receiveBytes": 0,
            "transmitBytes": 0,
            "lastHandshakeTime": "2026-01-01T00:00:00Z",
            "lastUsedEndpoint": f"198.51.100.{i % 250}:51820",
            "lastEndpointChange": "2026-01-01T00:00:00Z",
        },
        labels={"bench": "resource-watch"},
    )


async def run_once(
    resources: int, events: int, yield_every: int, queue_size: int
) -> tuple[float, float, str]:
    """Returns (events/s delivered, writes/s, problem or "")."""
    state = State(watch_queue_size=queue_size)
    mine = [peer_status(i) for i in range(resources)]
    for r in mine:
        await state.create(r, owner="bench")
    watch = state.watch(NS_KUBESPAN, KUBESPAN_PEER_STATUS)
    done = asyncio.get_running_loop().create_future()

    async def watcher() -> None:
        got = 0
        problem = ""
        async for ev in watch:
            if ev.type is EventType.UPDATED:
                got += 1
                if got == events:
                    break
            elif ev.type is EventType.ERRORED:
                problem = f"watcher dropped after {got} events: {ev.error}"
                break
        else:
            problem = f"watch ended after {got} events"
        done.set_result((time.perf_counter(), got, problem))

    async for ev in watch:  # the bootstrap (one CREATED per resource, BOOTSTRAPPED) is not timed
        if ev.type is EventType.BOOTSTRAPPED:
            break
    reader = asyncio.create_task(watcher())
    t0 = time.perf_counter()
    for i in range(events):
        r = mine[i % resources]
        r.spec["receiveBytes"] += 148
        r.spec["transmitBytes"] += 92
        await state.update(r, owner="bench")
        if (i + 1) % yield_every == 0:
            await asyncio.sleep(0)
    t_written = time.perf_counter()
    t1, got, problem = await asyncio.wait_for(done, 60)
    await reader
    watch.close()
    if not problem and got != events:
        problem = f"watcher saw {got} of {events} events"
    return got / (t1 - t0), events / (t_written - t0), problem


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resources", type=int, default=100, help="resources updated round-robin")
    ap.add_argument("--events", type=int, default=200_000, help="updates (= events) per round")
    ap.add_argument("--yield-every", type=int, default=1, help="writer yields to the loop every N writes")
    ap.add_argument("--queue-size", type=int, default=1024, help="per-watcher queue bound")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    ns = ap.parse_args()
    rates, write_rates, problems = [], [], []
    for n in range(ns.rounds):
        rate, wrate, problem = asyncio.run(run_once(ns.resources, ns.events, ns.yield_every, ns.queue_size))
        rates.append(rate)
        write_rates.append(wrate)
        if problem:
            problems.append(problem)
        print(
            f"round {n + 1}: {ns.events} updates of {ns.resources} resources, yield every {ns.yield_every}: "
            f"{rate:,.0f} events/s delivered, writer {wrate:,.0f} writes/s"
            + (f"  ({problem})" if problem else "")
        )
    rate = statistics.median(rates)
    print(f"resource watch: {rate:,.0f} events/s delivered to one local watcher (target >= {TARGET:,})")
    verdict = "PASS" if rate >= TARGET and not problems else "MISS"
    print(f"RESULT resource_watch events_per_s={rate:.0f} target>={TARGET} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
