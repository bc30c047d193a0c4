"""Join convergence: a node joining a running mesh of N = 20 and 50 nodes on one LAN.

For each N a fresh lab gets a discovery server and N agents; once they form a full mesh (and a few
seconds of quiet), a new node's agent is started. Measured from that start (t0, just before the agent
process is spawned: Python start-up, key generation and discovery publication included) until ALL of

* every one of the N peers reports the new node ``up`` in its status,
* the new node reports every one of the N peers ``up`` (its own view), and
* ICMPv6 echo over the mesh addresses succeeds both ways between the new node and every peer
  (10 Hz per direction from t0; the pair counts once its first reply arrives),

i.e. the latest of the three. "Reports up" is read from the agents' logs: an agent logs "peer state"
(millisecond times) in the pass that publishes the state in its /status, so the times are the same;
a pair that flaps counts at its last transition to up, and when the logs say the join is complete
one /status of every node confirms it. Sampling 50 agents' /status several times a second instead
(as this benchmark did before) took about a core of this 2-core machine: the measurement slowed the
join it measured. Each round uses a new node; it leaves again (SIGTERM) before the next
one. Each round also prints the new node's start from its log (process start to "mesh identity",
first Hello answered, first Watch snapshot, first peer up, every peer up) and the registry's CPU.
Target: <= 1 s at N = 20 and at N = 50 (the worst round counts). With ``--launch fork`` (the
default) the agents are forked from the lab's launcher, which imported their modules once, and each
join's figure adds one agent's start-up CPU (what the new node pays on its own core); ``--launch
exec`` starts ``python -m kubespan.cli`` as before 2026-12-08 (see bench/mesh_cold_start.py).

Stalls. Joins used to wait 5/10/15 s for WireGuard's handshake retry. Both sides' wireguard-go debug
logs of a stalled round (``--wg-debug``; a round slower than 3 s keeps them under ``--keep-dir``) show
the cause: the side that held the new peer without an endpoint (kubespan.firstcontact) had traffic
routed to it (the echo this benchmark sends, or any other), so WireGuard attempted an initiation it
could not send ("Failed to send handshake initiation: no known endpoint for peer") and counted it;
when the hold ended and the endpoint was set, WireGuard sent nothing for REKEY_TIMEOUT (5 s). The
other side's first initiation had come before this side knew the new node (dropped), so only a
retry could make the session. Now the waiting side re-creates the peer at the hold's end (a fresh
peer initiates at once), both sides look for the session every 0.1 s, and a first sight of a peer
we just added counts its traffic since the add: the first handshake no longer depends on which side
learned of the other first (kubespan/firstcontact.py).
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
    Pinger,
    UpWatch,
    add_launch_flag,
    add_log_flags,
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
    safe_peers,
    status,
    stop_agent,
    verdict,
    wait_for,
)
from _wglab import skip_unless_root

from netns.lab import Lab, LabError
from netns.mesh import MeshNode, stop_agents

NAME = "mesh_join"
TARGET = 1.0
TARGET_NS = (20, 50)
STALL = 3.0  # a join slower than this keeps both sides' logs (with --wg-debug: wireguard-go's debug log)


def join_once(
    mesh: LanMesh, existing: list[MeshNode], name: str, timeout: float, keep_dir: Path | None = None
) -> tuple[dict[str, float], str, MeshNode]:
    """One join; ``keep_dir``: where a stalled join's logs go (None: not kept)."""
    addrs = {mn.name: status(mn)["mesh_address"] for mn in existing}
    node = mesh.add_node(name)  # namespace and veth exist before t0: only the agent is timed
    with Pinger(interval=0.1, max_seconds=timeout + 10) as pinger:
        t0, t0_wall = time.monotonic(), time.time()
        new = mesh.start(node)
        for mn in existing:
            pinger.add(("out", mn.name), node, addrs[mn.name], until_first=True)
        # the peers' and the new node's "peer state" log lines (kubespan logs them in the pass that
        # publishes the state) give the times; /status is read only for the new node's mesh address
        # and once at the end to confirm (sampling 50 agents' /status often took ~a core: see UpWatch)
        watch = UpWatch([*existing, new], t0_wall)
        watch.skip_existing()
        names = [mn.name for mn in existing]
        up_at: dict[str, float] = {}
        new_addr: str | None = None
        sees_all_at = math.inf
        status_at = math.inf
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if new_addr is None:
                try:
                    new_addr = status(new)["mesh_address"]
                except (LabError, ValueError):
                    pass
                else:
                    status_at = time.monotonic() - t0
                    for mn in existing:
                        pinger.add(("in", mn.name), mn, new_addr, until_first=True)
            watch.read()
            up_at = {mn.name: t for mn in existing if not math.isinf(t := watch.all_up(mn.name, [name]))}
            sees_all_at = watch.all_up(name, names)
            pings_done = new_addr is not None and all(
                p.first_reply() is not None for p in pinger.pairs.values()
            )
            if len(up_at) == len(existing) and pings_done and not math.isinf(sees_all_at):
                # confirmed by /status: the new node lists every peer up, every peer lists it up
                ps = safe_peers(new)
                if (
                    ps is not None
                    and len(ps) == len(existing)
                    and all(p["state"] == "up" for p in ps.values())
                    and all(
                        (q := safe_peers(mn)) is not None and q.get(name, {}).get("state") == "up"
                        for mn in existing
                    )
                ):
                    break
            time.sleep(0.1)
        pairs = dict(pinger.pairs)
    missing_up = [mn.name for mn in existing if mn.name not in up_at]
    missing_ping = [f"{d}:{n}" for (d, n), p in pairs.items() if p.first_reply() is None]
    if new_addr is None:
        missing_ping.append("new node never answered /status")
    if math.isinf(sees_all_at):
        ps = safe_peers(new) or {}
        missing_up.append(f"(new node: not up {sorted(k for k, p in ps.items() if p['state'] != 'up')})")
    if missing_up or missing_ping:
        print(
            f"    {name}: not converged within {timeout:.0f} s; peers not reporting it up: {missing_up or '-'}; "
            f"ping directions without a reply: {missing_ping[:8] or '-'}"
        )
        print("    new node log tail:\n      " + new.log_tail(15).replace("\n", "\n      "))
    t_up = max(up_at.values()) if len(up_at) == len(existing) else math.inf
    firsts = [p.first_reply() for p in pairs.values()]
    t_ping = math.inf
    if new_addr is not None and firsts and all(f is not None for f in firsts):
        t_ping = max(f for f in firsts if f is not None) - t0
    res = {
        "join": max(t_up, t_ping, sees_all_at) + mesh.start_cpu,  # the figure: see add_launch_flag
        "join_lab": max(t_up, t_ping, sees_all_at),
        "up": t_up,
        "ping": t_ping,
        "first_up": min(up_at.values()) if up_at else math.inf,
        "new_sees_all": sees_all_at,
        "status": status_at,
    }
    slow_peer = max(up_at, key=up_at.__getitem__, default="-")
    done = {k: f - t0 for k, p in pairs.items() if (f := p.first_reply()) is not None}
    slow_ping = max(done, key=done.__getitem__, default=("-", "-"))
    ms = milestones(agent_events(new), t0_wall, expect=[mn.name for mn in existing])
    res.update({f"log_{k}": v for k, v in ms.items()})
    # the pair that came up last, seen from the new node's log and from the peers' (their "peer state" lines)
    new_up = {
        str(ev.get("peer")): ev["t"] - t0_wall
        for ev in reversed(agent_events(new))
        if ev.get("msg") == "peer state" and ev.get("state") == "up"
    }
    slow_new = max(new_up, key=new_up.__getitem__, default="-")
    detail = (
        f"last peer to report it up: {slow_peer}; last peer the new node saw up: {slow_new}; slowest echo: "
        f"{'new -> ' + slow_ping[1] if slow_ping[0] == 'out' else slow_ping[1] + ' -> new'}; new node's log: "
        + ", ".join(f"{k} {ms[k]:.2f}" for k, _ in MILESTONES)
    )
    if res["join"] > STALL and keep_dir is not None:
        slow = [mn for mn in existing if mn.name in (slow_peer, slow_new, slow_ping[1])]
        kept = keep_logs(keep_dir / f"{name}-{time.strftime('%H%M%S')}", [new, *slow])
        detail += f"; stalled: logs of {name} and {', '.join(mn.name for mn in slow) or '-'} kept in {kept}"
    return res, detail, new


def leave(mesh: LanMesh, existing: list[MeshNode], new: MeshNode) -> None:
    stop_agent(new)
    mesh.forget(new)
    wait_for(
        f"peers dropped {new.name}",
        lambda: all((ps := safe_peers(mn)) is not None and new.name not in ps for mn in existing),
        timeout=30,
        interval=0.2,
    )


def run_size(
    n: int, rounds: int, timeout: float, settle: float, wg_debug: bool, keep_dir: Path, launch: str = "fork"
) -> list[dict[str, float]]:
    out: list[dict[str, float]] = []
    with Lab() as lab:
        try:
            mesh = LanMesh.create(lab, launch)
            print(f"  N={n}: {launch_note(mesh)}", flush=True)
            mesh.env = dict(WG_DEBUG_ENV) if wg_debug else None
            mesh.start_all([mesh.add_node(f"n{i}") for i in range(1, n + 1)])
            took = wait_for(f"{n}-node mesh", lambda: full_mesh(mesh.nodes), timeout=180, interval=0.25)
            existing = list(mesh.nodes)
            print(f"  N={n}: base mesh up after {took:.1f} s; settling {settle:.0f} s", flush=True)
            pids = [p.pid for mn in existing if (p := agent_proc(mn)) is not None]
            c0, w0 = cpu_seconds(pids), time.monotonic()
            time.sleep(settle)
            idle = (cpu_seconds(pids) - c0) / (time.monotonic() - w0)
            print(
                f"  N={n}: idle agents use {100 * idle:.0f} % of one core together ({host_load()})",
                flush=True,
            )
            disc = discovery_pid(mesh)
            for r in range(rounds):
                c0, w0 = cpu_seconds([disc] if disc else []), time.monotonic()
                res, detail, new = join_once(mesh, existing, f"j{r + 1}", timeout, keep_dir)
                reg = (cpu_seconds([disc] if disc else []) - c0) / (time.monotonic() - w0)
                print(
                    f"  N={n} round {r + 1}: join {res['join']:.2f} s (in the lab {res['join_lab']:.2f} s; "
                    f"every peer reports up {res['up']:.2f} s, "
                    f"first peer {res['first_up']:.2f} s; pings both ways {res['ping']:.2f} s; "
                    f"new node sees all up {res['new_sees_all']:.2f} s; its agent answered /status at {res['status']:.2f} s); "
                    f"{detail}; registry CPU {100 * reg:.0f} % of a core; {host_load()}",
                    flush=True,
                )
                out.append(res)
                leave(mesh, existing, new)
                time.sleep(settle)
        finally:
            stop_agents(lab)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20,50", help="comma-separated mesh sizes N")
    ap.add_argument("--rounds", type=int, default=3, help="joins per N (each a new node)")
    ap.add_argument("--timeout", type=float, default=60, help="give up on one join after this many seconds")
    ap.add_argument("--settle", type=float, default=5, help="quiet seconds before each join")
    ap.add_argument("--quick", action="store_true", help="one join per N")
    add_log_flags(ap, "/tmp/mesh_join-stalls", f"for a join slower than {STALL:g} s")
    add_launch_flag(ap)
    ns = ap.parse_args()
    if skip_unless_root(NAME):
        return 0
    rounds = 1 if ns.quick else ns.rounds
    sizes = [int(x) for x in ns.sizes.split(",") if x.strip()]
    print(f"{NAME}: sizes {sizes}, {rounds} join(s) each, launch {ns.launch}; {host_load()}", flush=True)
    results: dict[int, list[dict[str, float]]] = {}
    for n in sizes:
        results[n] = run_size(n, rounds, ns.timeout, ns.settle, ns.wg_debug, ns.keep_dir, ns.launch)
    print(f"host after the run: {host_load()}")
    print(
        f"{'N':>4}  {'joins':>5}  {'median s':>8}  {'worst s':>8}  {'up (worst)':>10}  {'ping (worst)':>12}  "
        f"{'new sees all (worst)':>20}  target"
    )
    for n, rs in results.items():
        joins = [r["join"] for r in rs]
        print(
            f"{n:>4}  {len(rs):>5}  {median(joins):>8.2f}  {max(joins):>8.2f}  {max(r['up'] for r in rs):>10.2f}  "
            f"{max(r['ping'] for r in rs):>12.2f}  {max(r['new_sees_all'] for r in rs):>20.2f}  "
            f"{f'<= {TARGET:g} s' if n in TARGET_NS else '-'}"
        )
    print("new node's start, median of the rounds (s from the spawn, from its log):")
    for n, rs in results.items():
        print(
            f"  N={n}: "
            + "; ".join(f"{what} {median([r[f'log_{k}'] for r in rs]):.2f}" for k, what in MILESTONES)
        )
    for key in [n for n in results if n in TARGET_NS] or [max(results)]:
        worst = max(r["join"] for r in results[key])
        print(f"RESULT {NAME} join_s_n{key}_worst={worst:.2f} target<={TARGET:g} {verdict(worst <= TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
