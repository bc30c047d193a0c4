"""Relayed throughput: TCP through the relay forwarder divided by a direct tunnel between the same hosts,
and the relay's CPU per Gbit/s.

One lab segment (veth MTU 1500) with three namespaces: a (10.70.0.11), b (10.70.0.12) and the relay r
(10.70.0.10) running ``python -m kubespan.relay`` (limits off). a and b run two wireguard-go devices
each, configured by hand with ``wg set`` (MTU 1420, keepalive 25):

* wg0, direct: a:51820 <-> b:51820, inner fd99::1 -> fd99::2;
* wg1, relayed: a:51821 -> r:port_a, b:51821 -> r:port_b, inner fd98::1 -> fd98::2.

Each round is one bounded TCP transfer per path (a Python sender writing 64 KiB chunks in a, a receiver
in b; ``--mib`` MiB or ``--seconds`` s, whichever ends first), the paths taking turns. Ratio =
median(relayed) / median(direct), target >= 0.8 (issue 14). The relay's CPU (user + system seconds of
its process over the relayed transfers' wall time) per Gbit/s of relayed throughput is printed for
information. Every process shares the same cores, so the relay competes with both wireguard-go
instances and the TCP endpoints; read the round lines for spread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from _meshlab import host_load, verdict, wait_for
from _throughput import Path, measure
from _wglab import skip_unless_root

from kubespan.identity import generate_private_key
from kubespan.wireguard.types import PrivateKey
from netns.lab import Lab, LabError, Node, sh

NAME = "relay_throughput"
TARGET = 0.8
MTU = 1420
A_IP, B_IP, R_IP = "10.70.0.11", "10.70.0.12", "10.70.0.10"


def start_relay(lab: Lab, r: Node, key_a: PrivateKey, key_b: PrivateKey) -> tuple[int, tuple[int, int]]:
    """The relay process in r with one allocation; returns its pid and (port_a, port_b)."""
    log = lab.dir / "relay.log"
    alloc = f"{key_a.public_key().b64},{key_b.public_key().b64}"
    proc = r.popen(
        sys.executable, "-m", "kubespan.relay", "--listen", R_IP, "--alloc", alloc,
        "--packet-rate", "0", "--byte-rate", "0", "--status-file", str(lab.dir / "relay-status.json"),
        log=log, private_run=False,
    )  # fmt: skip
    ports: list[tuple[int, int]] = []

    def ready() -> bool:
        docs = (
            [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")] if log.exists() else []
        )
        ports[:] = [tuple(d["ports"]) for d in docs if "ports" in d and "msg" not in d]  # type: ignore[misc]
        if proc.poll() is not None:
            raise LabError(f"relay exited: {log.read_text()[-2000:]}")
        return any(d.get("ready") for d in docs)

    wait_for("relay ready", ready, timeout=15)
    return proc.pid, ports[0]


def wg_device(lab: Lab, node: Node, ifname: str, key: PrivateKey, port: int, me: str, peer: PrivateKey,
              peer_inner: str, endpoint: str) -> None:  # fmt: skip
    """wireguard-go ``ifname`` in ``node`` with one peer, configured with ``wg set`` and ``ip``."""
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
    node.popen("wireguard-go", "-f", ifname, log=lab.dir / f"wireguard-go-{node.name}-{ifname}.log", env=env)
    sock = node.run_dir / "wireguard" / f"{ifname}.sock"
    wait_for(f"wireguard-go socket in {node.name}", sock.exists, timeout=10)
    keyfile = node.run_dir / f"{ifname}.key"
    keyfile.write_text(key.b64 + "\n")
    keyfile.chmod(0o600)
    sh(
        *node.argv(  # private /run/wireguard: wg finds the node's own socket
            "wg", "set", ifname, "listen-port", str(port), "private-key", str(keyfile),
            "peer", peer.public_key().b64, "allowed-ips", f"{peer_inner}/128",
            "endpoint", endpoint, "persistent-keepalive", "25",
        )
    )  # fmt: skip
    node.run("ip", "link", "set", ifname, "mtu", str(MTU), "up")
    node.run("ip", "-6", "addr", "add", f"{me}/64", "dev", ifname, "nodad")


def udp_errors(node: Node) -> dict[str, int]:
    """The non-zero UDP error counters of ``node``'s namespace (receive-buffer overflows show here)."""
    lines = [
        ln.split() for ln in node.run("cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Udp:")
    ]
    names, values = lines[0][1:], lines[1][1:]
    return {n: int(v) for n, v in zip(names, values, strict=True) if "Err" in n and int(v)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--mib", type=int, default=200, help="bytes per transfer, MiB (upper bound)")
    ap.add_argument("--seconds", type=float, default=4, help="time per transfer (upper bound)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of at most 100 MiB / 3 s")
    ns = ap.parse_args()
    if skip_unless_root(NAME):
        return 0
    rounds, mib, seconds = (3, 100, 3.0) if ns.quick else (ns.rounds, ns.mib, ns.seconds)
    print(f"{NAME}: {rounds} rounds of <= {mib} MiB / {seconds:g} s per path; {host_load()}", flush=True)
    with Lab() as lab:
        seg = lab.segment("net")
        a, b, r = lab.node("a"), lab.node("b"), lab.node("r")
        for node, ip in ((a, A_IP), (b, B_IP), (r, R_IP)):
            lab.attach(node, seg, [f"{ip}/24"])
        keys = {name: generate_private_key() for name in ("a0", "b0", "a1", "b1")}
        relay_pid, (port_a, port_b) = start_relay(lab, r, keys["a1"], keys["b1"])
        wg_device(lab, a, "wg0", keys["a0"], 51820, "fd99::1", keys["b0"], "fd99::2", f"{B_IP}:51820")
        wg_device(lab, b, "wg0", keys["b0"], 51820, "fd99::2", keys["a0"], "fd99::1", f"{A_IP}:51820")
        wg_device(lab, a, "wg1", keys["a1"], 51821, "fd98::1", keys["b1"], "fd98::2", f"{R_IP}:{port_a}")
        wg_device(lab, b, "wg1", keys["b1"], 51821, "fd98::2", keys["a1"], "fd98::1", f"{R_IP}:{port_b}")
        for addr in ("fd99::2", "fd98::2"):
            wait_for(
                f"tunnel to {addr} answers", lambda addr=addr: a.ping(addr, count=1), timeout=30, interval=0.2
            )
        paths = [Path("direct", a, b, "fd99::2"), Path("relayed", a, b, "fd98::2")]
        res = measure(paths, rounds, mib << 20, seconds, ratio=("relayed", "direct"), watch=[relay_pid])
        status = json.loads((lab.dir / "relay-status.json").read_text())["allocations"][0]
        udp = udp_errors(r)
    print(f"host after the run: {host_load()}")
    for kind in res.mbit:
        print(res.summary(kind))
    relayed_gbit = res.median("relayed") / 1000
    relay_cpu, relay_wall = res.cpu.get("relayed", 0.0), res.wall.get("relayed", 0.0)
    core_share = relay_cpu / relay_wall if relay_wall else float("nan")
    print(
        f"relay: {status['forwarded_packets']} packets / {status['forwarded_bytes'] / (1 << 20):.0f} MiB forwarded, "
        f"dropped {status['dropped'] or 'nothing'}; {100 * core_share:.0f} % of a core while relaying, "
        f"{100 * core_share / relayed_gbit:.0f} % of a core per Gbit/s; UDP errors in r's namespace: {udp}"
    )
    ratio = res.median("relayed") / res.median("direct")
    print(f"relayed / direct: {ratio:.3f} (target >= {TARGET})")
    print(f"RESULT {NAME} ratio={ratio:.3f} target>={TARGET} {verdict(ratio >= TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
