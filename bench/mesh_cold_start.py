"""Cold start: N = 20 and 50 agents started at once on one LAN until the full mesh is up (every pair ``up``).

The lab (namespaces, veths, the discovery server) is built first and is not timed; so is bringing the
product's ``.pyc`` files up to date (an installed agent has them; see _meshlab.compile_bytecode). t0 is taken just
before the first of the N agent processes is spawned (they are spawned back to back); the mesh counts
as up at the moment the last pair came up to stay: each agent logs "peer state" (millisecond times)
in the pass that publishes it, the benchmark reads the logs as they grow (a pair that flaps counts at
its last transition to up), and one /status sweep of every node confirms the full mesh at the end
(its time is printed beside). Sampling every node's /status several times a second, as this
benchmark did before, took about a core of this machine at N = 50 (each answer is a whole status
document of N - 1 peers): the measurement slowed what it measured. Where the time goes comes from
the agents' own logs too, median and worst node: Python start-up to "mesh identity" (imports,
wireguard-go, the engine's start), first Hello answered, first Watch snapshot, first peer up (its first
handshake), every peer up. Also printed: RSS per agent and per wireguard-go (from /proc), the agents',
wireguard-go's and the registry's CPU time (one registry serves every agent). For information,
afterwards (so it cannot change the figure) an ICMPv6 echo over the mesh addresses is sent for every
ordered pair (2 Hz until its first reply); a pair without a reply 10 s after the full mesh is printed
with both sides' /status view of each other and when it answered, and its logs are kept in
``--keep-dir`` (with ``--wg-debug``, wireguard-go's debug log: how the one-way first sessions of
nat-traversal.md were traced). Targets: <= 5 s at N = 20, <= 10 s at N = 50 (the worst
round counts).

How agents start (``--launch``). Real nodes each import their agent's modules on their own CPU; on
this 2-core machine N exec'd agents' start-ups (~0.25 s of CPU each) share two cores, and at N = 50
that, not the mesh, was most of the figure. By default the agents are forked from the lab's launcher
(netns.launcher), which imported those modules once before t0, and the figure is the lab's time plus
one agent's start-up CPU (what each node pays, in parallel, on its own core); both are printed.
``--launch exec`` measures as before 2026-12-08 (the agents' CPU then includes their imports; forked,
it does not).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from _meshlab import (
    MILESTONES,
    WG_DEBUG_ENV,
    LanMesh,
    Pair,
    Pinger,
    UpWatch,
    add_launch_flag,
    add_log_flags,
    add_steering_flag,
    agent_events,
    agent_proc,
    cpu_seconds,
    discovery_pid,
    full_mesh,
    host_load,
    keep_logs,
    launch_note,
    median,
    milestones,
    rss_mib,
    safe_peers,
    status,
    verdict,
    wg_pids,
)
from _wglab import skip_unless_root

from netns.lab import Lab
from netns.mesh import MeshNode, stop_agents

NAME = "mesh_cold_start"
TARGETS = {20: 5.0, 50: 10.0}  # N -> seconds


PEER_FIELDS = ("state", "endpoint", "path", "last_handshake", "rx_bytes", "tx_bytes", "allowed_ips")


def report_late(
    late: list[Pair], by_name: dict[str, MeshNode], pinger: Pinger, t1: float, keep_dir: Path | None
) -> None:
    """Pairs without an echo reply 10 s after the full mesh: both sides' view of each other (from
    /status, now), then how long each took to answer (the pinger goes on to its 30 s bound); with
    ``keep_dir``, both sides' agent and wireguard-go logs are kept there."""
    wall = time.time()
    print(f"    {len(late)} ordered pair(s) without an echo reply after 10 s; both sides now:", flush=True)
    shown_pairs: set[frozenset[str]] = set()
    described = late[:6]  # the first few: each costs two /status reads
    for pair in described:
        a, b = pair.key
        if frozenset(pair.key) in shown_pairs:
            print(f"      echo {a} -> {b}: {len(pair.sent)} sent, {pair.send_errors} send errors", flush=True)
            continue
        shown_pairs.add(frozenset(pair.key))
        for src, dst in ((a, b), (b, a)):
            view = (safe_peers(by_name[src]) or {}).get(dst) or {}
            shown = {k: view.get(k) for k in PEER_FIELDS}
            if shown["last_handshake"]:
                shown["last_handshake"] = f"{wall - shown['last_handshake']:.1f} s ago"
            print(f"      {src} -> {dst}: {shown}", flush=True)
        print(f"      echo {a} -> {b}: {len(pair.sent)} sent, {pair.send_errors} send errors", flush=True)
    end = t1 + 29
    while time.monotonic() < end and any(p.first_reply() is None for p in late):
        time.sleep(0.2)
    for pair in described:
        first = pair.first_reply()
        after = f"{first - t1:.1f} s" if first is not None else "none within 29 s"
        print(f"      echo {pair.key[0]} -> {pair.key[1]}: first reply {after}", flush=True)
    if keep_dir is not None:
        names = dict.fromkeys(name for pair in described for name in pair.key)
        kept = keep_logs(keep_dir / time.strftime("%H%M%S"), [by_name[x] for x in names])
        print(f"      their logs: {kept}", flush=True)


def one_round(
    n: int,
    timeout: float,
    wg_debug: bool = False,
    keep_dir: Path | None = None,
    steering: str = "marks",
    launch: str = "fork",
) -> dict[str, float]:
    with Lab() as lab:
        try:
            mesh = LanMesh.create(lab, launch)
            print(f"  {launch_note(mesh)}", flush=True)
            mesh.env = dict(WG_DEBUG_ENV) if wg_debug else None
            mesh.args = ("--steering", steering)
            nodes = [mesh.add_node(f"n{i}") for i in range(1, n + 1)]
            disc = discovery_pid(mesh)
            reg0 = cpu_seconds([disc] if disc else [])
            t0, t0_wall = time.monotonic(), time.time()
            agents: list[MeshNode] = mesh.start_all(nodes)
            spawned = time.monotonic() - t0
            names = [mn.name for mn in agents]
            others = {name: [x for x in names if x != name] for name in names}
            watch = UpWatch(agents, t0_wall)
            all_up_at: dict[str, float] = {}
            mesh_at = math.inf
            confirmed_at = math.inf
            deadline = t0 + timeout
            while time.monotonic() < deadline:
                watch.read()
                for name in names:
                    if name not in all_up_at and not math.isinf(t := watch.all_up(name, others[name])):
                        all_up_at[name] = t
                if len(all_up_at) == n and full_mesh(agents):
                    # every pair has been up (the logs) and is up now (one /status sweep)
                    confirmed_at = time.monotonic() - t0
                    mesh_at = max(all_up_at.values())
                    break
                time.sleep(0.25)
            if math.isinf(mesh_at) and len(all_up_at) == n:
                print("  every pair was up once, but some were not up at the end (a flap)")
            reg_cpu = cpu_seconds([disc] if disc else []) - reg0
            marks = [
                milestones(agent_events(mn), t0_wall, [x for x in names if x != mn.name]) for mn in agents
            ]
            procs = [p for mn in agents if (p := agent_proc(mn)) is not None]
            rss = [rss_mib(p.pid) for p in procs]
            wg_rss = [rss_mib(pid) for pid in wg_pids(agents)]
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
                    late = [p for p in pinger.pairs.values() if p.first_reply() is None]
                    if late:
                        report_late(late, {mn.name: mn for mn in agents}, pinger, t1, keep_dir)
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
    out = {
        "mesh": mesh_at + mesh.start_cpu,  # the figure: see add_launch_flag
        "mesh_lab": mesh_at,
        "confirmed": confirmed_at,
        "first_node": min(all_up_at.values()) if all_up_at else math.inf,
        "median_node": median(list(all_up_at.values())) if all_up_at else math.inf,
        "ping_ok": ping_ok,
        "ping_after": ping_after,
        "spawn": spawned,
        "agent_cpu": agent_cpu,
        "wg_cpu": wg_cpu,
        "registry_cpu": reg_cpu,
        "rss_median": median(rss),
        "rss_max": max(rss, default=math.nan),
        "wg_rss_median": median(wg_rss),
    }
    # each milestone's median and worst over the nodes (seconds from t0)
    for k, _ in MILESTONES:
        vals = [m[k] for m in marks]
        out[f"{k}_median"], out[f"{k}_worst"] = median(vals), max(vals, default=math.inf)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--nodes", default="20,50", help="comma-separated mesh sizes N")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--quick", action="store_true", help="one round")
    add_log_flags(ap, "/tmp/mesh_cold_start-late", "for pairs that do not echo within 10 s of the full mesh")
    add_steering_flag(ap)
    add_launch_flag(ap)
    ns = ap.parse_args()
    if skip_unless_root(NAME):
        return 0
    rounds = 1 if ns.quick else ns.rounds
    sizes = [int(x) for x in ns.nodes.split(",") if x.strip()]
    print(
        f"{NAME}: N={sizes}, {rounds} round(s) each, steering {ns.steering}, launch {ns.launch}; {host_load()}",
        flush=True,
    )
    results: dict[int, list[dict[str, float]]] = {}
    for n in sizes:
        results[n] = []
        for r in range(rounds):
            res = one_round(n, ns.timeout, ns.wg_debug, ns.keep_dir, ns.steering, ns.launch)
            results[n].append(res)
            print(
                f"  N={n} round {r + 1}: full mesh {res['mesh']:.2f} s (in the lab {res['mesh_lab']:.2f} s; "
                f"confirmed by /status at {res['confirmed']:.2f} s; "
                f"first node seeing all up {res['first_node']:.2f} s, "
                f"median node {res['median_node']:.2f} s); then every ordered pair echoed: "
                f"{res['ping_ok']}/{n * (n - 1)} within {res['ping_after']:.2f} s; "
                f"spawning took {res['spawn']:.2f} s; CPU: agents {res['agent_cpu']:.1f} s, "
                f"wireguard-go {res['wg_cpu']:.1f} s, registry {res['registry_cpu']:.2f} s "
                f"({100 * res['registry_cpu'] / res['mesh']:.1f} % of a core until the full mesh); RSS per agent "
                f"median {res['rss_median']:.0f} MiB (max {res['rss_max']:.0f}), per wireguard-go "
                f"{res['wg_rss_median']:.0f} MiB; {host_load()}",
                flush=True,
            )
            print(
                "    where the time goes (s from t0, median / worst node, from the agents' logs): "
                + "; ".join(
                    f"{what} {res[k + '_median']:.2f} / {res[k + '_worst']:.2f}" for k, what in MILESTONES
                ),
                flush=True,
            )
    print(f"host after the run: {host_load()}")
    for n, rs in results.items():
        times = [r["mesh"] for r in rs]
        worst = max(times)
        target = TARGETS.get(n)
        aim = f"target <= {target:g} s" if target else "no target at this N"
        print(f"full mesh of {n}: median {median(times):.2f} s, worst {worst:.2f} s ({aim})")
        if target:
            print(
                f"RESULT {NAME} full_mesh_s_n{n}_worst={worst:.2f} target<={target:g} {verdict(worst <= target)}"
            )
        else:
            print(f"RESULT {NAME} full_mesh_s_n{n}_worst={worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
