"""Read back 1000 peers from wireguard-go: our UAPI client vs ``wg showconf`` (the C tool), same run.

The device holds 1000 peers (PSK, keepalive 25, 2-3 allowed IPs, an endpoint
each). Per round, alternating which side goes first:

* ours: ``UapiClient.get()`` -- the UAPI exchange and parsing the answer into an
  :class:`ObservedDevice` (keys, endpoints, prefixes, counters), in-process;
* C tool: ``wg showconf kubespan`` -- fork+exec, the same UAPI exchange, printing
  the configuration (what a status poll through the tool would cost).

Target: ratio ours/wg <= 1.2 (medians). Our client keeps the previous answer's
parsed peers and reuses those whose text did not change (a status poll every
second sees mostly unchanged peers), and the codec caches parsed keys,
endpoints and prefixes. So two cases are measured, each with its own RESULT
line: the steady status poll (the bench's peers carry no traffic, so every
peer is unchanged), and "every peer changed" (the client's peer cache is
emptied before each get, as if all counters had moved). The very first get,
with every cache empty, is reported too. Runs inside a lab node (needs root).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from _wglab import (
    IFNAME,
    bench_parser,
    fmt,
    main_in_node,
    make_config,
    median,
    run_tool,
    verdict,
)

from kubespan.wireguard import UserspaceBackend, sync, uapi
from kubespan.wireguard.diff import diff_device
from kubespan.wireguard.userspace import MAX_RESPONSE, UapiClient

NAME = "wg_readback"
TARGET = 1.2


async def raw_get(path: Path) -> bytes:
    """The bare UAPI exchange (no parsing), to split our time into transfer and parse."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_RESPONSE)
    try:
        writer.write(uapi.GET_REQUEST)
        return await reader.readuntil(b"\n\n")
    finally:
        writer.close()


async def timed_get(client: UapiClient, n: int, fresh_cache: bool) -> tuple[float, float]:
    """One ``client.get()``: (wall ms, our CPU ms). ``fresh_cache``: as if every peer had changed."""
    if fresh_cache:
        client.peer_cache = uapi.PeerCache()
    c0, t0 = time.process_time(), time.perf_counter()
    dev = await client.get()
    t1, c1 = time.perf_counter(), time.process_time()
    assert len(dev.peers) == n
    return (t1 - t0) * 1000, (c1 - c0) * 1000


async def bench(ns: argparse.Namespace, tmp: Path) -> int:
    cfg = make_config(ns.peers, seed=ns.seed)
    backend = UserspaceBackend(IFNAME, existing="replace", request_timeout=120, log_path=tmp / "wg-go.log")
    client = backend.client
    ours: dict[str, list[float]] = {"steady": [], "changed": []}
    cpu: dict[str, list[float]] = {"steady": [], "changed": []}
    tool: list[float] = []
    tool_cpu: list[float] = []
    try:
        await backend.ensure_device()
        await sync(backend, cfg)
        uapi.clear_caches()
        client.peer_cache = uapi.PeerCache()
        t0 = time.perf_counter()
        dev = await client.get()
        cold = (time.perf_counter() - t0) * 1000
        assert not diff_device(cfg, dev) and len(dev.peers) == ns.peers
        text = await raw_get(backend.socket_path)
        _, out, _ = run_tool("wg", "showconf", IFNAME)
        assert out.count(b"[Peer]") == ns.peers
        fast_before = uapi.parse_stats["fast"]
        for r in range(ns.rounds):
            for side in ("ours", "wg") if r % 2 == 0 else ("wg", "ours"):
                if side == "ours":
                    for case in ("steady", "changed"):
                        ms, c = await timed_get(client, ns.peers, fresh_cache=case == "changed")
                        ours[case].append(ms)
                        cpu[case].append(c)
                else:
                    ms, _, c = run_tool("wg", "showconf", IFNAME)
                    tool.append(ms)
                    tool_cpu.append(c)
        assert uapi.parse_stats["fast"] - fast_before == 2 * ns.rounds, "an answer missed the fast path"
        # where our time goes: the exchange alone, and parsing the captured answer
        exchange, parse_steady, parse_changed, parse_cold = [], [], [], []
        cache = uapi.PeerCache()
        uapi.parse_get(text, cache)
        for _ in range(ns.rounds):
            t0 = time.perf_counter()
            await raw_get(backend.socket_path)
            exchange.append((time.perf_counter() - t0) * 1000)
            for samples, prepare in (
                (parse_steady, lambda: cache),
                (parse_changed, uapi.PeerCache),
                (parse_cold, lambda: (uapi.clear_caches(), uapi.PeerCache())[1]),
            ):
                c = prepare()
                t0 = time.perf_counter()
                uapi.parse_get(text, c)
                samples.append((time.perf_counter() - t0) * 1000)
    finally:
        await backend.close(remove=True)

    w = median(tool)
    steady, changed = median(ours["steady"]), median(ours["changed"])
    print(f"{ns.peers} peers, UAPI answer {len(text) / 1024:.0f} KiB, {ns.rounds} rounds")
    print(
        f"wg showconf (C tool)                 : {w:7.1f} ms  (rounds: {fmt(tool)}); "
        f"its CPU {median(tool_cpu):.1f} ms"
    )
    print(
        f"ours UapiClient.get(), status poll   : {steady:7.1f} ms  (rounds: {fmt(ours['steady'])}); "
        f"our CPU {median(cpu['steady']):.1f} ms"
    )
    print(
        f"ours, every peer changed since poll  : {changed:7.1f} ms  (rounds: {fmt(ours['changed'])}); "
        f"our CPU {median(cpu['changed']):.1f} ms"
    )
    print(f"ours, first get (all caches empty)   : {cold:7.1f} ms")
    print(
        f"  breakdown (medians): UAPI exchange {median(exchange):.1f} ms; parse: unchanged peers "
        f"{median(parse_steady):.1f} ms, every peer changed {median(parse_changed):.1f} ms, "
        f"cold caches {median(parse_cold):.1f} ms"
    )
    for name, o in ((NAME, steady), (f"{NAME}_all_changed", changed)):
        ratio = o / w
        print(
            f"RESULT {name} ratio={ratio:.3f} ours={o:.1f}ms wg={w:.1f}ms target<={TARGET} {verdict(ratio <= TARGET)}"
        )
    return 0


def main() -> int:
    ap = bench_parser(__doc__, rounds=15)
    ap.add_argument("--seed", type=int, default=1)
    return main_in_node(NAME, __file__, ap, bench)


if __name__ == "__main__":
    sys.exit(main())
