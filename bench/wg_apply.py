"""Apply 1000 peers to wireguard-go: our userspace backend vs ``wg setconf`` (the C tool), same run.

Both start from a freshly spawned wireguard-go (an empty device) each round and
end with the same configuration (private key, listen port, fwmark 0x20, 1000
peers with a PSK, keepalive 25, 2-3 allowed IPs and an endpoint each), which is
checked by reading the device back after every round.

* ours: ``sync(UserspaceBackend, desired)``, i.e. a UAPI ``get`` of the device,
  :func:`kubespan.wireguard.diff.diff_device`, encoding, and one UAPI ``set`` (what the
  engine does), timed end to end in-process;
* C tool: ``wg setconf kubespan FILE`` with the same configuration as a file,
  timed as the process run (fork+exec, parsing the file, the UAPI set).

Rounds alternate which side goes first; medians are compared. Target: ratio
ours/wg <= 1.0. Runs inside a lab node (needs root).
"""

from __future__ import annotations

import argparse
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
    task_cpu_ms,
    verdict,
    wg_conf,
)

from kubespan.wireguard import UserspaceBackend, sync, uapi
from kubespan.wireguard.diff import diff_device

NAME = "wg_apply"
TARGET = 1.0


async def bench(ns: argparse.Namespace, tmp: Path) -> int:
    if ns.whole:
        uapi._CHUNK_PEERS_FIRST = uapi._CHUNK_PEERS_MAX = 1 << 30
    cfg = make_config(ns.peers, seed=ns.seed)
    conf = tmp / "wg.conf"
    conf.write_text(wg_conf(cfg))
    backend = UserspaceBackend(IFNAME, existing="replace", request_timeout=120, log_path=tmp / "wg-go.log")

    async def fresh() -> None:
        await backend.close(remove=True)
        await backend.ensure_device()
        dev = await backend.get()
        assert dev is not None and not dev.peers, "device not empty after restart"

    async def check(who: str) -> None:
        dev = await backend.get()
        left = diff_device(cfg, dev)
        if left:
            raise SystemExit(f"{who}: device differs from the configuration after apply ({len(left)} ops)")

    ours: list[float] = []
    tool: list[float] = []
    cpu: dict[str, list[float]] = {"ours": [], "wg": [], "daemon ours": [], "daemon wg": []}
    parts: dict[str, list[float]] = {"get": [], "diff": [], "encode": [], "set": []}
    try:
        for r in range(ns.rounds + 1):  # round 0 warms up both sides and is not counted
            for side in ("ours", "wg") if r % 2 == 0 else ("wg", "ours"):
                await fresh()
                assert backend.pid is not None
                daemon0 = task_cpu_ms(backend.pid)
                if side == "ours":
                    c0, t0 = time.process_time(), time.perf_counter()
                    ops = await sync(backend, cfg)
                    t1, c1 = time.perf_counter(), time.process_time()
                    assert len(ops) == ns.peers + 1
                    ms, client_cpu = (t1 - t0) * 1000, (c1 - c0) * 1000
                else:
                    ms, _, client_cpu = run_tool("wg", "setconf", IFNAME, str(conf))
                daemon = task_cpu_ms(backend.pid) - daemon0
                await check(side)
                if r:
                    (ours if side == "ours" else tool).append(ms)
                    cpu[side].append(client_cpu)
                    cpu[f"daemon {side}"].append(daemon)
        # where our time goes (separate rounds, each step timed on its own)
        for _ in range(ns.rounds):
            await fresh()
            t0 = time.perf_counter()
            dev = await backend.get()
            t1 = time.perf_counter()
            ops = diff_device(cfg, dev)
            t2 = time.perf_counter()
            uapi.encode_set(ops)
            t3 = time.perf_counter()
            await backend.apply(ops)  # encodes again (in pieces, while sending)
            t4 = time.perf_counter()
            for k, v in (("get", t1 - t0), ("diff", t2 - t1), ("encode", t3 - t2), ("set", t4 - t3)):
                parts[k].append(v * 1000)
            await check("ours (breakdown)")
    finally:
        await backend.close(remove=True)

    o, w = median(ours), median(tool)
    ratio = o / w
    paired = median([a / b for a, b in zip(ours, tool, strict=True)])
    print(f"{ns.peers} peers, {ns.rounds} rounds (+1 warm-up), fresh wireguard-go each time")
    print(f"wg setconf (C tool)          : {w:8.1f} ms  (rounds: {fmt(tool)})")
    print(f"ours sync() get+diff+set     : {o:8.1f} ms  (rounds: {fmt(ours)})")
    print(
        f"  CPU (medians): our process {median(cpu['ours']):.1f} ms, wg process {median(cpu['wg']):.1f} ms; "
        f"wireguard-go {median(cpu['daemon ours']):.1f} ms (ours) / {median(cpu['daemon wg']):.1f} ms (wg)"
    )
    print(
        "  our steps timed separately (medians): "
        + ", ".join(f"{k} {median(v):.1f} ms" for k, v in parts.items())
        + " (set = encode in pieces + UAPI exchange)"
    )
    print(f"  median of the per-round ratios: {paired:.3f}")
    print(
        f"RESULT {NAME} ratio={ratio:.3f} ours={o:.1f}ms wg={w:.1f}ms target<={TARGET} "
        f"{verdict(ratio <= TARGET)}"
    )
    return 0


def main() -> int:
    ap = bench_parser(__doc__, rounds=15)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--whole", action="store_true", help="send each set as one piece (no streaming)")
    return main_in_node(NAME, __file__, ap, bench)


if __name__ == "__main__":
    sys.exit(main())
