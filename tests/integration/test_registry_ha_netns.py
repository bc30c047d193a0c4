"""Registry replicas on a 3-member etcd cluster, each member and replica its own network namespace
(issue 15): kill -9 of a replica, then of the etcd leader, under a steady stream of updates and
watches (discovery.hadrive), and a 5-node mesh that keeps its peers and its traffic through both."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator

import pytest

from discovery.hadrive import analyse
from netns.lab import Lab
from netns.mesh import MeshLab, mesh_lab
from netns.probe import Ping, longest_gap
from netns.registryha import ETCD, build

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason=f"{ETCD} missing (Debian package etcd-server)"),
]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with mesh_lab() as lab:
        yield lab


def test_replica_and_etcd_leader_killed_under_load_lose_nothing(lab: Lab) -> None:
    ha = build(lab)
    clients = ha.attach("clients", 50)
    out = lab.dir / "hadrive.json"
    drive = clients.popen(
        sys.executable, "-m", "discovery.hadrive",
        *(a for r in ha.replica_addrs() for a in ("--replica", r)),
        "--clients", "20", "--interval", "0.1", "--seconds", "14", "--out", str(out),
        log=lab.dir / "hadrive.log", private_run=False,
    )  # fmt: skip
    time.sleep(4)
    victim = ha.replicas["reg1"]
    t_replica = time.time()
    ha.kill_replica(victim)
    time.sleep(4)
    leader = ha.leader()
    assert leader is not None
    t_leader = time.time()
    ha.kill_member(leader)
    assert drive.wait(60) == 0, (lab.dir / "hadrive.log").read_text()[-3000:]
    res = json.loads(out.read_text())

    survivors = [r.addr for r in ha.replicas.values() if r is not victim]
    rep = analyse(res, survivors)
    print(
        f"HA run: {rep.acks} acknowledged updates, {rep.events} watch events on {rep.streams_checked} "
        f"streams of surviving replicas, {rep.failovers} client failovers (longest {rep.failover_max} s); "
        f"killed {victim.name} at +{t_replica - res['started']:.1f} s, etcd leader {leader.name} at "
        f"+{t_leader - res['started']:.1f} s"
    )
    assert rep.acks > 1000
    assert not rep.problems, "\n".join(rep.problems[:20])
    # the clients that wrote to the killed replica moved to another within 2 s of the kill
    moved = [f for f in res["failovers"] if f["frm"] == victim.addr and f["failed_at"] >= t_replica - 0.1]
    assert moved, "no client was on the killed replica"
    worst = max(f["resumed_at"] - t_replica for f in moved)
    print(f"clients of the killed replica: {len(moved)}, all writing again {worst:.2f} s after the kill")
    assert worst < 2.0
    # and every watcher that was on it reconnected to a survivor within 2 s
    broken = [s for s in res["streams"] if s["replica"] == victim.addr and s["ended"] is not None]
    for s in broken:
        again = [x for x in res["streams"] if x["client"] == s["client"] and x["opened"] >= s["ended"]]
        assert again and again[0]["replica"] in survivors
        assert again[0]["opened"] - t_replica < 2.0


def test_mesh_keeps_peers_and_traffic_through_replica_and_leader_kills(lab: Lab) -> None:
    ha = build(lab)
    ml = MeshLab(lab, cluster_id="ha-mesh")
    nodes = [ha.attach(f"m{i}", 30 + i) for i in range(1, 6)]
    agents = [ml.start_node(n, discovery=[ha.discovery_url()]) for n in nodes]
    ml.wait("every mesh peer up", lambda: ml.all_up(expected_peers=4), timeout=90)
    target = agents[1].status()["mesh_address"]
    ping = Ping.start(agents[0].node, target, interval=0.1, count=250, name="ha-mesh")  # <= 25 s
    try:
        ml.wait("baseline pings", lambda: len(ping.replies()) >= 10, timeout=10, interval=0.2)
        t0 = time.time()
        peers_seen: list[int] = []
        ha.kill_replica(ha.replicas["reg1"])
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            peers_seen.append(min(len(a.status()["peers"]) for a in agents))
            time.sleep(0.5)
        leader = ha.leader()
        assert leader is not None
        ha.kill_member(leader)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            peers_seen.append(min(len(a.status()["peers"]) for a in agents))
            time.sleep(0.5)
    finally:
        ping.stop()
    gap = longest_gap(ping.replies(), t0)
    print(f"mesh through both kills: fewest peers seen {min(peers_seen)} of 4, longest ping gap {gap:.2f} s")
    assert min(peers_seen) == 4, "a peer was removed"
    assert gap <= 1.0
    # the agents published to a surviving replica after the kill
    assert ml.all_up(expected_peers=4)
