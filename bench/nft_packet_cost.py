"""CPU a packet pays for the mesh's nftables table: sendto() of a small UDP datagram, with and without it.

In one lab namespace: a veth pair (``eth0``/``peer0``, the destination's neighbour entry pointing at
``peer0``, so every datagram also crosses prerouting on the way in and is dropped there, ip_forward
being off) and the mesh's policy rule and table-180 routes. Each variant installs a table, then a
connected UDP socket sends ``--packets`` 64-byte datagrams and the process's CPU time (user + system:
the output and prerouting hooks run in the sending task) is divided by their number. CPU time rather
than wall time, so other programs on the machine move it little; variants take turns, medians of
``--rounds``.

Variants: ``none`` (the baseline: no table, the policy rule in place); ``no policy rule`` (no table,
no rule either: what the rule alone costs, shown as a negative difference); ``hooks`` (the three base chains, no rules); ``ruleset, empty sets``; ``ruleset,
1000 peers`` (a /32 node address and a /128 mesh address per peer: 2000 interval-set elements), to a
destination that is not a target (traffic that is not ours) and to one that is (marked and re-routed
into table 180). What remains above ``hooks`` is rule evaluation and the target-set lookup
(docs/design/nft-ruleset.md, "What a packet costs").
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import time
from collections.abc import Callable

from _meshlab import host_load, median
from _wglab import skip_unless_root

from kubespan.dataplane import ruleset as R
from netns.lab import Lab, Node

NAME = "nft_packet_cost"
CLONE_NEWNET = 0x40000000
HOOKS = (
    "table inet kubespan {"
    " chain prerouting { type filter hook prerouting priority 0; policy accept; };"
    " chain output { type route hook output priority 0; policy accept; };"
    " chain forward { type filter hook forward priority -150; policy accept; }; }"
)
PEERS = 1000
NO_RULE = "no policy rule"


def targets_of(peers: int) -> list[str]:
    return [f"10.{64 + (i >> 8)}.{i & 255}.1/32" for i in range(peers)] + [
        f"fd7f::{i:x}/128" for i in range(1, peers + 1)
    ]


def setup(node: Node) -> None:
    """Links, neighbours, the policy rule and table 180 (as the link manager installs them)."""
    for argv in (
        ("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"),
        ("ip", "link", "add", "kubespan", "type", "veth", "peer", "name", "peer1"),
    ):
        node.run(*argv)
    for dev in ("eth0", "peer0", "kubespan", "peer1"):
        node.run("ip", "link", "set", dev, "up")
    node.run("ip", "addr", "add", "10.99.0.1/24", "dev", "eth0")
    node.run("ip", "-6", "addr", "add", "fd99::1/64", "dev", "eth0", "nodad")
    node.run("ip", "addr", "add", "10.98.0.1/24", "dev", "kubespan")
    mac0 = node.run("cat", "/sys/class/net/peer0/address").stdout.strip()
    mac1 = node.run("cat", "/sys/class/net/peer1/address").stdout.strip()
    node.run("ip", "neigh", "add", "10.99.0.2", "lladdr", mac0, "dev", "eth0")
    node.run("ip", "-6", "neigh", "add", "fd99::2", "lladdr", mac0, "dev", "eth0")
    node.run("ip", "neigh", "add", "10.98.0.2", "lladdr", mac1, "dev", "kubespan")
    node.run("ip", "route", "add", "10.64.0.0/10", "via", "10.99.0.2", "dev", "eth0")
    policy_rules(node, present=True)
    node.run(
        "ip", "route", "add", "default", "via", "10.98.0.2", "dev", "kubespan", "table", "180", "mtu", "1420"
    )
    node.run("ip", "-6", "route", "add", "default", "dev", "kubespan", "table", "180", "mtu", "1420")


def policy_rules(node: Node, present: bool) -> None:
    for fam in ("-4", "-6"):
        verb = "add" if present else "del"
        node.run("ip", fam, "rule", verb, "priority", "32500", "fwmark", "0x40/0x60", "lookup", "180")


def installer(node: Node, variant: str) -> Callable[[], None]:
    def install() -> None:
        node.run("nft", "delete", "table", "inet", "kubespan", check=False)
        if variant == NO_RULE:
            policy_rules(node, present=False)
            return
        if variant == "none":
            return
        if variant == "hooks":
            node.run("nft", "-f", "-", input=HOOKS.encode())
            return
        elements = {} if variant == "ruleset, empty sets" else R.targets(targets_of(PEERS))
        doc = json.dumps(R.render_replace(R.RulesetParams(), elements))
        node.run("nft", "-j", "-f", "-", input=doc.encode())

    return install


def cost_ns(dest: str, family: int, packets: int) -> float:
    """CPU time per datagram sent from this process (which must be inside the namespace)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((dest, 9))
        payload = b"x" * 64
        t0 = time.process_time()
        for _ in range(packets):
            s.send(payload)
        return (time.process_time() - t0) / packets * 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--packets", type=int, default=100_000)
    ns = ap.parse_args()
    if skip_unless_root(NAME):
        return 0
    print(f"{NAME}: {ns.rounds} rounds of {ns.packets} datagrams per variant; {host_load()}", flush=True)
    variants = ["none", NO_RULE, "hooks", "ruleset, empty sets", f"ruleset, {PEERS} peers"]
    dests = {
        "IPv4, not ours": ("10.99.0.2", socket.AF_INET),
        "IPv6, not ours": ("fd99::2", socket.AF_INET6),
        "IPv4, to a target": ("10.64.0.1", socket.AF_INET),
    }
    res: dict[tuple[str, str], list[float]] = {(v, d): [] for v in variants for d in dests}
    with Lab() as lab:
        node = lab.node("n")
        setup(node)
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        own = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{node.ns}", os.O_RDONLY)
        try:
            for r in range(ns.rounds):
                for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
                    installer(node, variant)()
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns into the lab node")
                    try:
                        for d, (dest, family) in dests.items():
                            if variant in ("none", NO_RULE) and d == "IPv4, to a target":
                                res[(variant, d)].append(cost_ns("10.99.0.2", family, ns.packets))
                                continue
                            res[(variant, d)].append(cost_ns(dest, family, ns.packets))
                    finally:
                        libc.setns(own, CLONE_NEWNET)
                    if variant == NO_RULE:
                        policy_rules(node, present=True)
        finally:
            os.close(fd)
            os.close(own)
    print(f"host after the run: {host_load()}")
    for d in dests:
        base = median(res[("none", d)])
        cells = ", ".join(f"{v} {median(res[(v, d)]) - base:+.0f}" for v in variants[1:])
        print(f"  {d:18s}: none {base:.0f} ns/datagram; {cells} ns")
    extra = median(res[(variants[-1], "IPv4, not ours")]) - median(res[("none", "IPv4, not ours")])
    print(f"RESULT {NAME} ns_per_packet_not_ours={extra:.0f} peers={PEERS} (information, no target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
