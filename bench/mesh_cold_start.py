"""Cold start: N = 20 agents started at once on one LAN until the full mesh is up (every pair ``up``).

The lab (namespaces, veths, the discovery server) is built first and is not timed. t0 is taken just
before the first of the N agent processes is spawned (they are spawned back to back); the mesh counts
as up at the first moment every node's status lists all N - 1 others as ``up`` (every node is sampled
in each sweep, a sweep about every 0.2 s). For information, afterwards (so it cannot change the figure) an
ICMPv6 echo over the mesh addresses is sent for every ordered pair (2 Hz until its first reply), and the
agents' and wireguard-go's CPU time is printed. Target: <= 15 s (the worst round counts).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from _meshlab import (
    LanMesh,
    Pinger,
    agent_proc,
    cpu_seconds,
    host_load,
    median,
    safe_peers,
    status,
    verdict,
    wg_pids,
)
from _wglab import skip_unless_root

from netns.lab import Lab
from netns.mesh import MeshNode, stop_agents

NAME = "mesh_cold_start"
TARGET = 15.0


def one_round(n: int, timeout: float) -> dict[str, float]:
    with Lab() as lab:
        try:
            mesh = LanMesh.create(lab)
            nodes = [mesh.add_node(f"n{i}") for i in range(1, n + 1)]
            t0 = time.monotonic()
            agents: list[MeshNode] = [mesh.start(node) for node in nodes]
            spawned = time.monotonic() - t0
            all_up_at: dict[str, float] = {}
            mesh_at = math.inf
            deadline = t0 + timeout
            while time.monotonic() < deadline:
                ups = {}
                for mn in agents:
                    ps = safe_peers(mn)
                    ups[mn.name] = (
                        ps is not None and len(ps) == n - 1 and all(p["state"] == "up" for p in ps.values())
                    )
                    if ups[mn.name]:
                        all_up_at.setdefault(mn.name, time.monotonic() - t0)
                if all(ups.values()):
                    mesh_at = time.monotonic() - t0
                    break
                time.sleep(0.05)
            # afterwards (so it cannot speed up or slow down the figure above): every ordered pair echoes
            ping_ok, ping_after = 0, math.inf
            if not math.isinf(mesh_at):
                addrs = {mn.name: status(mn)["mesh_address"] for mn in agents}
                with Pinger(interval=0.5, max_seconds=30) as pinger:
                    t1 = time.monotonic()
                    for a in agents:
                        for b in agents:
                            if a is not b:
                                pinger.add((a.name, b.name), a, addrs[b.name], until_first=True)
                    end = t1 + 10
                    while time.monotonic() < end and not all(
                        p.first_reply() is not None for p in pinger.pairs.values()
                    ):
                        time.sleep(0.1)
                    firsts = [p.first_reply() for p in pinger.pairs.values()]
                ping_ok = sum(f is not None for f in firsts)
                if ping_ok == len(firsts):
                    ping_after = max(f for f in firsts if f is not None) - t1
            agent_cpu = cpu_seconds(p.pid for mn in agents if (p := agent_proc(mn)) is not None)
            wg_cpu = cpu_seconds(wg_pids(agents))
            if math.isinf(mesh_at):
                not_up = {}
                for mn in agents:
                    ps = safe_peers(mn) or {}
                    not_up[mn.name] = sorted(k for k, p in ps.items() if p["state"] != "up") or len(ps)
                print(f"  not converged within {timeout:.0f} s: {not_up}")
        finally:
            stop_agents(lab)
    return {
        "mesh": mesh_at,
        "first_node": min(all_up_at.values()) if all_up_at else math.inf,
        "median_node": median(list(all_up_at.values())) if all_up_at else math.inf,
        "ping_ok": ping_ok,
        "ping_after": ping_after,
        "spawn": spawned,
        "agent_cpu": agent_cpu,
        "wg_cpu": wg_cpu,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--nodes", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--quick", action="store_true", help="one round")
    ns = ap.parse_args()
    if skip_unless_root(NAME):
        return 0
    rounds = 1 if ns.quick else ns.rounds
    print(f"{NAME}: N={ns.nodes}, {rounds} round(s); {host_load()}", flush=True)
    results = []
    for r in range(rounds):
        res = one_round(ns.nodes, ns.timeout)
        results.append(res)
        print(
            f"  round {r + 1}: full mesh {res['mesh']:.2f} s (first node seeing all up {res['first_node']:.2f} s, "
            f"median node {res['median_node']:.2f} s); then every ordered pair echoed: "
            f"{res['ping_ok']}/{ns.nodes * (ns.nodes - 1)} within {res['ping_after']:.2f} s; "
            f"spawning took {res['spawn']:.2f} s; CPU: agents {res['agent_cpu']:.1f} s, "
            f"wireguard-go {res['wg_cpu']:.1f} s",
            flush=True,
        )
    print(f"host after the run: {host_load()}")
    times = [r["mesh"] for r in results]
    worst = max(times)
    print(
        f"full mesh of {ns.nodes}: median {median(times):.2f} s, worst {worst:.2f} s (target <= {TARGET:g} s)"
    )
    print(
        f"RESULT {NAME} full_mesh_s_n{ns.nodes}_worst={worst:.2f} target<={TARGET:g} {verdict(worst <= TARGET)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
