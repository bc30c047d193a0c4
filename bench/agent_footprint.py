"""Agent footprint with 100 peers: RSS <= 80 MB and idle CPU <= 1 % of a core over 30 s.

A child process runs the real :class:`machined.daemon.Agent` (config store, controller runtime with
every controller, resource state, supervisor with one mesh-gated service, the machine API on a unix
socket, the HTTP status endpoint, netlink network status) whose mesh engine runs on the in-memory
fakes of ``machined.daemon.testing`` (fake WireGuard device and data plane; no root needed) and
a fake discovery that reports 100 affiliates. Once every peer is up and published as a resource,
the peers behave like an idle mesh: each one exchanges a keepalive every 25 s (staggered, so 4
peers change per second), re-handshakes every 2 minutes and answers the path probes it was sent,
which moves their counters and makes the agent rewrite their KubeSpanPeerStatus as it would in
production. (Until 2026-12-07 every keepalive also counted as a probe answer, and each answer wakes
the engine for a full pass: 4 passes a second that an idle node does not make.)

The parent measures the child: CPU time (utime + stime from ``/proc/<pid>/stat``) over the idle
window, and RSS (``VmRSS``; the peak ``VmHWM`` is printed too) at its end. As root the child gets a
network namespace of its own (``unshare --net``), as an agent has on a node: the host's namespace of a
shared CI machine sees other jobs create and delete links all the time, and the agent would then
measure their netlink churn (``--host-netns`` measures exactly that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_TARGET_MB = 80.0
CPU_TARGET_PCT = 1.0
KEEPALIVE = 25.0
HANDSHAKE_EVERY = 5  # keepalives per handshake (~2 minutes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the child: one agent -------------------------------------------------------------------------------


async def child(peers: int, workdir: Path) -> None:
    from machined.config.testing import config_yaml
    from machined.daemon import Agent, AgentOptions
    from machined.daemon.testing import FakeMeshWorld, remote_affiliate

    cluster = "bench-footprint"
    text = config_yaml(
        cluster_id=cluster,
        agent={"nodename": "bench", "httpStatusAddr": f"127.0.0.1:{free_port()}"},
        services=[{"name": "app", "command": "sleep", "args": ["infinity"], "requiresMesh": {"quorum": 1}}],
    )
    cfg = workdir / "config.yaml"
    cfg.write_text(text)
    world = FakeMeshWorld(poll_interval=1.0)  # the engine's real pass interval
    keys = []
    for i in range(peers):
        key, d = remote_affiliate(cluster, i + 1, f"10.{(i >> 8) & 255}.{i & 255}.2")
        keys.append(key)
        world.discovery.put(d)
    agent = Agent(
        AgentOptions(state_dir=workdir / "state", config_path=cfg, socket_path=workdir / "machined.sock"),
        mesh_factory=world,
    )
    await agent.start()

    # bring every peer up, then idle
    from machined.state.catalog import KUBESPAN_PEER_STATUS, NS_KUBESPAN

    t0 = time.monotonic()
    while True:
        world.pulse()
        h = agent.meshhost.health()
        published = await agent.state.list(NS_KUBESPAN, KUBESPAN_PEER_STATUS)
        if (
            h is not None
            and h.up == peers
            and len(published) == peers
            and all(r.spec["state"] == "up" for r in published)
        ):
            break
        if time.monotonic() - t0 > 120:
            print(json.dumps({"error": f"peers up: {h.up if h else 0}/{peers}"}), flush=True)
            return
        await asyncio.sleep(0.5)

    async def keepalives() -> None:
        n = 0
        step = KEEPALIVE / len(keys)
        while True:
            for k in keys:
                n += 1
                wg = world.wg
                if wg is not None and wg.device is not None and k in wg.device.peers:
                    wg.traffic(
                        k, rx=32, tx=32, handshake=(n % (HANDSHAKE_EVERY * len(keys)) < len(keys)) or None
                    )
                    if world.prober is not None:
                        # a real peer answers the probes it was sent, not every keepalive (an answer
                        # wakes the engine for a full pass)
                        world.prober.answer_sent(k)
                await asyncio.sleep(step)

    task = asyncio.create_task(keepalives())
    print(json.dumps({"ready": True, "startup_s": round(time.monotonic() - t0, 1)}), flush=True)
    # the parent writes a line when the idle window starts and closes our stdin when it ends
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes] = asyncio.Queue()
    fd = sys.stdin.fileno()
    loop.add_reader(fd, lambda: lines.put_nowait(os.read(fd, 4096)))
    mark = {n: st.runs for n, st in agent.runtime.stats().items()}
    passes = world.mesh.passes if world.mesh else 0
    while True:
        data = await lines.get()
        if not data:
            break
        mark = {n: st.runs for n, st in agent.runtime.stats().items()}
        passes = world.mesh.passes if world.mesh else 0
    loop.remove_reader(fd)
    h = agent.meshhost.health()
    stats = agent.runtime.stats()
    resources = 0
    for ns, t in agent.state.collections():
        resources += len(await agent.state.list(ns, t))
    summary = {
        "peers_up": h.up if h else 0,
        "resources": resources,
        "engine_passes": (world.mesh.passes if world.mesh else 0) - passes,
        "controller_runs": {
            n: st.runs - mark.get(n, 0) for n, st in stats.items() if st.runs - mark.get(n, 0)
        },
        "controller_failures": sum(st.failures for st in stats.values()),
    }
    task.cancel()
    print(json.dumps(summary), flush=True)
    await agent.stop()


# --- the parent: measure it ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=100)
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after all peers are up")
    p.add_argument("--host-netns", action="store_true", help="run the agent in this network namespace")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.child is not None:
        from spanutil.logs import setup

        setup()
        asyncio.run(child(ns.peers, ns.child))
        return 0

    with tempfile.TemporaryDirectory(prefix="agent-footprint-") as tmp:
        log = Path(tmp) / "agent.log"
        with log.open("wb") as err:
            argv = [sys.executable, __file__, "--peers", str(ns.peers), "--child", tmp]
            isolated = os.geteuid() == 0 and not ns.host_netns
            if isolated:  # exec keeps the pid: /proc/<pid> is the agent's
                argv = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert proc.stdout is not None and proc.stdin is not None
        first = json.loads(proc.stdout.readline() or '{"error": "agent exited"}')
        if not first.get("ready"):
            proc.kill()
            print(f"agent did not become ready: {first}\n{log.read_text()[-2000:]}")
            print(
                f"RESULT agent_footprint rss_mb=nan cpu_pct=nan target<={RSS_TARGET_MB:g}/<={CPU_TARGET_PCT:g} MISS"
            )
            return 1
        where = "its own network namespace" if isolated else "this network namespace"
        print(
            f"agent up with {ns.peers} peers after {first['startup_s']} s in {where}; "
            f"warming up {ns.warmup:g} s"
        )
        time.sleep(ns.warmup)
        proc.stdin.write("start\n")
        proc.stdin.flush()
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(ns.idle)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        rss = status_kb(proc.pid, "VmRSS") / 1024
        hwm = status_kb(proc.pid, "VmHWM") / 1024
        proc.stdin.close()
        summary = json.loads(proc.stdout.readline() or "{}")
        proc.wait(30)
    cpu_pct = 100 * (c1 - c0) / (t1 - t0)
    ok = rss <= RSS_TARGET_MB and cpu_pct <= CPU_TARGET_PCT and summary.get("peers_up") == ns.peers
    print(f"idle window      {t1 - t0:.1f} s, CPU {c1 - c0:.3f} s")
    print(f"RSS              {rss:6.1f} MB   (peak {hwm:.1f} MB)   target <= {RSS_TARGET_MB:g} MB")
    print(f"idle CPU         {cpu_pct:6.2f} %    of one core            target <= {CPU_TARGET_PCT:g} %")
    print(
        f"peers up at end  {summary.get('peers_up')}/{ns.peers}; resources {summary.get('resources')}; "
        f"engine passes {summary.get('engine_passes')}; controller failures {summary.get('controller_failures')}"
    )
    runs = summary.get("controller_runs") or {}
    print("controller runs  " + ", ".join(f"{n.split('.')[-1]} {r}" for n, r in sorted(runs.items())))
    verdict = "PASS" if ok else "MISS"
    print(
        f"RESULT agent_footprint rss_mb={rss:.1f} cpu_pct={cpu_pct:.2f} "
        f"target<={RSS_TARGET_MB:g}/<={CPU_TARGET_PCT:g} {verdict}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
