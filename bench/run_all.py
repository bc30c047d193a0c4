"""Run every benchmark and print each figure beside its target."""

from __future__ import annotations

import shlex
import subprocess
import sys
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
]


def main() -> int:
    results = []
    for b in BENCHES:
        print(f"== {b}", flush=True)
        name, *args = shlex.split(b)
        proc = subprocess.run([sys.executable, str(HERE / name), *args], capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode:
            print(proc.stderr[-3000:], end="")
        results += [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    print("== summary")
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
