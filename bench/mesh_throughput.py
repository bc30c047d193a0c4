"""Throughput cost: TCP throughput over the mesh divided by a hand-configured wireguard-go tunnel.

One lab, two identical pairs of namespaces, each pair on its own LAN segment (veth MTU 1500):

* mesh pair m1, m2: the discovery server and two ``kubespan run`` agents (link MTU 1420, their
  nftables marking, policy routing and MSS clamp with ``--steering marks``, the default; a route per
  peer prefix and one ``not fwmark`` rule with ``--steering routes``; the agents polling once a
  second); traffic from m1 to m2's mesh address (IPv6);
* hand pair h1, h2: fresh namespaces with ``wireguard-go -f wg0`` started like the agent starts it
  (same binary, ``WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error``), configured by hand with ``wg set`` and
  ``ip`` (MTU 1420, a preshared key and keepalive 25 like the mesh, an IPv6 tunnel address so the
  inner packets are the same size); traffic from h1 to h2's tunnel address.

Each round is one bounded TCP transfer per pair (``--mib`` MiB or ``--seconds`` s, whichever ends
first; a Python sender writing 64 KiB chunks and a receiver, each in its node), the paths taking
turns (and which goes first rotating). Throughput is the bytes received over the receiver's time from
accept to EOF. Ratio = median(mesh) / median(hand); the median of the per-round ratios (each from two
transfers seconds apart, so slow drifts in other load cancel) is printed beside it. Target: >= 0.95.

For information (``--no-same-ns`` skips it) a third path: a second hand-configured wireguard-go (wg1,
port 51900, fwmark 0x20 so the agent's nftables leave its packets alone) between m1 and m2 themselves,
which tells a cost of the mesh's device and agent apart from one of the namespaces' rules and routes.
On a shared machine other processes' CPU use shows up as spread between rounds (read the round lines);
many short rounds (default 12 of <= 4 s) resist bursts of it better than a few long ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _meshlab import (
    LanMesh,
    add_steering_flag,
    agent_proc,
    cpu_seconds,
    full_mesh,
    host_load,
    median,
    status,
    verdict,
    wait_for,
)
from _throughput import Path, measure
from _wglab import skip_unless_root

from netns.lab import Lab, LabError, Node, sh
from netns.mesh import stop_agents

NAME = "mesh_throughput"
TARGET = 0.95
MTU = 1420


def configure_hand(
    lab: Lab, nodes: tuple[Node, Node], underlay: tuple[str, str], ifname: str, port: int, fwmark: int = 0
) -> str:
    """Start ``wireguard-go -f IFNAME`` in both nodes (as the agent starts it) and configure a tunnel by
    hand with ``wg set`` and ``ip`` (inner fd99::1 and fd99::2); returns the second node's inner address."""
    keys = {}
    for node in nodes:
        priv = sh("wg", "genkey").stdout.strip()
        pub = sh("wg", "pubkey", input=(priv + "\n").encode()).stdout
        path = node.run_dir / f"{ifname}.key"
        path.write_text(priv + "\n")
        path.chmod(0o600)
        keys[node.name] = (path, (pub.decode() if isinstance(pub, bytes) else pub).strip())
    psk = lab.dir / f"{ifname}.psk"
    psk.write_text(sh("wg", "genpsk").stdout.strip() + "\n")
    psk.chmod(0o600)
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
    for node in nodes:
        node.popen(
            "wireguard-go", "-f", ifname, log=lab.dir / f"wireguard-go-{node.name}-{ifname}.log", env=env
        )
    for node in nodes:
        sock = node.run_dir / "wireguard" / f"{ifname}.sock"
        wait_for(f"wireguard-go socket in {node.name}", sock.exists, timeout=10)
    for me, (node, peer) in enumerate((nodes, nodes[::-1]), start=1):
        other = 3 - me
        sh(
            *node.argv(
                "wg", "set", ifname,
                "listen-port", str(port),
                "fwmark", str(fwmark),
                "private-key", str(keys[node.name][0]),
                "peer", keys[peer.name][1],
                "preshared-key", str(psk),
                "allowed-ips", f"fd99::{other}/128",
                "endpoint", f"{underlay[other - 1]}:{port}",
                "persistent-keepalive", "25",
            )
        )  # fmt: skip
        node.run("ip", "link", "set", ifname, "mtu", str(MTU), "up")
        node.run("ip", "-6", "addr", "add", f"fd99::{me}/64", "dev", ifname, "nodad")
    wait_for(f"{ifname} tunnel answers", lambda: nodes[0].ping("fd99::2", count=1), timeout=20, interval=0.2)
    return "fd99::2"


def hand_tunnel(lab: Lab) -> tuple[Node, Node, str]:
    """Two fresh namespaces on their own segment with a hand-configured tunnel (wg0)."""
    seg = lab.segment("hand")
    nodes = []
    for i in (1, 2):
        node = lab.node(f"h{i}")
        lab.attach(node, seg, [f"10.70.0.1{i}/24"])
        nodes.append(node)
    h1, h2 = nodes
    return h1, h2, configure_hand(lab, (h1, h2), ("10.70.0.11", "10.70.0.12"), "wg0", 51820)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--mib", type=int, default=200, help="bytes per transfer, MiB (upper bound)")
    ap.add_argument("--seconds", type=float, default=4, help="time per transfer (upper bound)")
    ap.add_argument(
        "--no-same-ns",
        action="store_true",
        help="skip the informational hand tunnel inside the mesh namespaces",
    )
    ap.add_argument("--quick", action="store_true", help="3 rounds of at most 100 MiB / 3 s")
    add_steering_flag(ap)
    ns = ap.parse_args()
    if skip_unless_root(NAME):
        return 0
    rounds, mib, seconds = (3, 100, 3.0) if ns.quick else (ns.rounds, ns.mib, ns.seconds)
    size = mib << 20
    print(
        f"{NAME}: {rounds} rounds of <= {mib} MiB / {seconds:g} s per path, steering {ns.steering}; "
        f"{host_load()}",
        flush=True,
    )
    with Lab() as lab:
        try:
            mesh = LanMesh.create(lab)
            mesh.args = ("--steering", ns.steering)
            m1 = mesh.start(mesh.add_node("m1"))
            m2 = mesh.start(mesh.add_node("m2"))
            wait_for("2-node mesh", lambda: full_mesh([m1, m2]), timeout=90, interval=0.25)
            m2_addr = status(m2)["mesh_address"]
            h1, h2, h2_addr = hand_tunnel(lab)
            paths = [Path("mesh", m1.node, m2.node, m2_addr), Path("hand", h1, h2, h2_addr)]
            devs = [(m1.node, "kubespan"), (m2.node, "kubespan"), (h1, "wg0"), (h2, "wg0")]
            if not ns.no_same_ns:
                # fwmark 0x20: the agent's nftables leave WireGuard-marked packets alone, so wg1's UDP to
                # m2's node IP is not steered into the mesh
                underlay = ("10.60.0.11", "10.60.0.12")
                addr = configure_hand(lab, (m1.node, m2.node), underlay, "wg1", 51900, fwmark=0x20)
                paths.append(Path("hand-in-mesh-ns", m1.node, m2.node, addr))
                devs += [(m1.node, "wg1"), (m2.node, "wg1")]
            for node, dev in devs:
                mtu = node.run("cat", f"/sys/class/net/{dev}/mtu").stdout.strip()
                if mtu != str(MTU):
                    raise LabError(f"{node.name}/{dev} has MTU {mtu}, want {MTU}")
            agents = [p.pid for mn in (m1, m2) if (p := agent_proc(mn)) is not None]
            tx0 = status(m1)["peers"][0]["tx_bytes"]
            cpu0, t0 = cpu_seconds(agents), time.monotonic()
            res = measure(paths, rounds, size, seconds, ratio=("mesh", "hand"))
            agent_share = (cpu_seconds(agents) - cpu0) / (time.monotonic() - t0)
            tx = status(m1)["peers"][0]["tx_bytes"] - tx0
        finally:
            stop_agents(lab)
    print(f"host after the run: {host_load()}")
    labels = {
        "mesh": f"mesh (kubespan, MTU {MTU}), m1 -> m2",
        "hand": f"hand (wg0, MTU {MTU}), fresh h1 -> h2",
        "hand-in-mesh-ns": f"hand (wg1, MTU {MTU}), inside m1 -> m2",
    }
    for kind in res.mbit:
        print(res.summary(kind, labels[kind], 38))
    paired = [a / b for a, b in zip(res.mbit["mesh"], res.mbit["hand"], strict=True)]
    print(f"median of the per-round mesh/hand ratios: {median(paired):.3f}")
    if "hand-in-mesh-ns" in res.mbit:
        same = res.median("mesh") / res.median("hand-in-mesh-ns")
        print(f"for information, mesh / hand tunnel in the same namespaces: {same:.3f}")
    print(
        f"m1's WireGuard tx for m2 grew by {tx / (1 << 20):.0f} MiB over the run (the mesh transfers went through "
        f"the tunnel); the two agents used {100 * agent_share:.1f} % of one core meanwhile"
    )
    ratio = res.median("mesh") / res.median("hand")
    print(f"mesh / hand: {ratio:.3f} (target >= {TARGET})")
    print(
        f"RESULT {NAME} ratio={ratio:.3f} target>={TARGET} {verdict(ratio >= TARGET)} steering={ns.steering}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
