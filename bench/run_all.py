"""Run every benchmark and print each figure beside its target.

Each benchmark prints ``RESULT <name> <figure>=<value> target... PASS|MISS|SKIP`` lines; the summary
gives one line per benchmark (its verdicts and wall time; ERROR when it failed or printed no RESULT)
and the total wall time (target: the whole run under 30 minutes on the 2-core machine).
``--only SUBSTR`` (repeatable) runs the matching benchmarks; ``--list`` prints them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = [
    "update_throughput.py",
    "watch_fanout.py",
    "memory.py",
    "mesh_join.py",
    "mesh_cold_start.py",
    "mesh_failover.py",
    "mesh_throughput.py",
    # issue 3: WireGuard and engine at 1000 peers beside the C tools (need root: they print SKIP otherwise)
    "wg_apply.py",
    "wg_readback.py",
    "reconcile_noop.py",
    # issue 5 and 6: the node agent and the gateway
    "resource_watch.py",
    "agent_footprint.py",
    "apid_latency.py",
    # issue 11: one hostile client address against the registry
    "registry_abuse.py",
    # issue 14: NAT traversal (need root)
    "relay_throughput.py",
    "nat_traversal.py",
    # issue 15: registry replicas on a 3-member etcd cluster
    "watch_fanout.py --etcd 3 --replicas 3 --procs 4",
    "registry_ha.py",
    # issue 17: the operator's web dashboard with 50 nodes (fake data) in headless chromium
    "dashboard.py",
]


WALL_TARGET = 30 * 60.0


def summarize(bench: str, lines: list[str], seconds: float, rc: int) -> str:
    """One line: the benchmark, each RESULT's figure and verdict, its wall time."""
    parts = []
    for line in lines:
        fields = line.split()
        figure = next((f for f in fields[2:] if "=" in f and not f.startswith("target")), "")
        parts.append(f"{figure} {fields[-1]}".strip())
    verdict = "; ".join(parts) if parts and rc == 0 else f"ERROR (exit {rc}, {len(parts)} results)"
    return f"{bench:<48} {verdict}  [{seconds:.0f} s]"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--only", action="append", default=[], help="run benchmarks whose line contains this")
    ap.add_argument("--list", action="store_true", help="print the benchmarks and exit")
    ns = ap.parse_args()
    benches = [b for b in BENCHES if not ns.only or any(o in b for o in ns.only)]
    if ns.list:
        print("\n".join(benches))
        return 0
    results: list[str] = []
    summary: list[str] = []
    start = time.monotonic()
    for b in benches:
        print(f"== {b}", flush=True)
        name, *args = shlex.split(b)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(HERE / name), *args], capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode:
            print(proc.stderr[-3000:], end="")
        mine = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
        results += mine
        summary.append(summarize(b, mine, time.monotonic() - t0, proc.returncode))
    wall = time.monotonic() - start
    print("== results")
    print("\n".join(results))
    print("== summary")
    print("\n".join(summary))
    ok = "PASS" if wall <= WALL_TARGET else "MISS"
    print(f"RESULT run_all wall_time={wall:.0f}s target<={WALL_TARGET:.0f}s {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
