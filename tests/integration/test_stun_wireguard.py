"""STUN from the WireGuard port never disturbs the tunnel (root): two wireguard-go nodes, a ping through
the tunnel, and 1000 STUN probes sent from the WireGuard port meanwhile: 0 pings lost, every probe
answered with the WireGuard port's address, and the peers' endpoints untouched."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from ipaddress import ip_network

import pytest

from kubespan.identity import generate_private_key
from kubespan.wireguard import UserspaceBackend, sync
from kubespan.wireguard.types import AddrPort, DeviceConfig, PeerConfig, PresharedKey
from netns.lab import Lab, Node
from netns.mesh import discovery_argv

pytestmark = pytest.mark.root

PY = sys.executable
PORT = 51820
PROBES = 1000
PACE = 0.004  # 1000 probes over ~4 s, inside the ~6 s ping

# Runs in node a: PROBES sequential probes from the WireGuard port, one every PACE seconds (each its own
# raw socket, as the agent would open them), then what they saw and how long they took.
FLOOD = """
import asyncio, json, sys, time
from kubespan.nat.rawstun import StunProbeError, mapped_endpoint
port, server, count, pace = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
host, sport = server.rsplit(":", 1)
async def main():
    seen, errors = {}, []
    t0 = time.monotonic()
    for i in range(count):
        await asyncio.sleep(max(0.0, t0 + i * pace - time.monotonic()))  # spread over the ping
        try:
            m = str(await mapped_endpoint(port, (host, int(sport)), timeout=2))
            seen[m] = seen.get(m, 0) + 1
        except StunProbeError as e:
            errors.append(str(e))
    print(json.dumps({"seen": seen, "errors": errors[:5], "failed": len(errors), "seconds": time.monotonic() - t0}))
asyncio.run(main())
"""


def backend(node: Node) -> UserspaceBackend:
    return UserspaceBackend(
        "kubespan", socket_dir=node.run_dir / "wireguard", command_prefix=["ip", "netns", "exec", node.ns]
    )


async def wait_for_line(path, text: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not (path.exists() and text in path.read_text()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path}")
        await asyncio.sleep(0.1)


async def test_stun_probes_from_the_wireguard_port_lose_no_tunnel_packet():
    async with Lab() as lab:
        a, b = lab.node("a"), lab.node("b")
        lab.link(a, b, ["10.77.0.1/24"], ["10.77.0.2/24"])
        psk = PresharedKey(os.urandom(32))
        keys = {"a": generate_private_key(), "b": generate_private_key()}
        sides = {"a": ("10.77.0.1", "10.88.0.1"), "b": ("10.77.0.2", "10.88.0.2")}
        backends = {"a": backend(a), "b": backend(b)}
        try:
            for me, other in ((a, b), (b, a)):
                peer = PeerConfig(
                    keys[other.name].public_key(),
                    frozenset({ip_network(f"{sides[other.name][1]}/32")}),
                    AddrPort.parse(f"{sides[other.name][0]}:{PORT}"),
                    0,
                    psk,
                )
                await backends[me.name].ensure_device()
                await sync(backends[me.name], DeviceConfig.of(keys[me.name], PORT, 0x20, [peer]))
                me.run("ip", "addr", "replace", f"{sides[me.name][1]}/24", "dev", "kubespan")
                me.run("ip", "link", "set", "kubespan", "up")
            assert a.ping("10.88.0.2", count=3, timeout=2), "tunnel not up"

            log = lab.dir / "discovery-b.log"
            b.popen(
                *discovery_argv("10.77.0.2:3000", "--stun-addr", "10.77.0.2:3478", "--stun-rate-limit", "0"),
                log=log,
                private_run=False,
            )
            await wait_for_line(log, '"serving"')
            before = (await backends["b"].get()).peers[keys["a"].public_key()]  # type: ignore[union-attr]

            # 600 pings 10 ms apart through the tunnel, the probes while they run
            pinger = await a.spawn(
                "ping", "-n", "-c", "600", "-i", "0.01", "-W", "2", "10.88.0.2", name="ping"
            )
            await asyncio.sleep(0.3)
            r = await asyncio.to_thread(
                a.run, PY, "-c", FLOOD, str(PORT), "10.77.0.2:3478", str(PROBES), str(PACE), timeout=120
            )
            flood = json.loads(r.stdout)
            assert pinger.running, f"the probes ({flood['seconds']:.1f} s) outlasted the ping: no overlap"
            async with asyncio.timeout(30):
                await pinger.wait()
            out = pinger.log.read_text()
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            assert m, out
            sent, received = int(m[1]), int(m[2])
            print(f"\n{PROBES} probes in {flood['seconds']:.2f} s; ping {received}/{sent} through the tunnel")

            assert flood["failed"] == 0, flood
            assert flood["seen"] == {f"10.77.0.1:{PORT}": PROBES}, flood
            assert sent == 600 and received == sent, out.splitlines()[-3:]
            # the tunnel's state is untouched: same endpoint, no new handshake forced, traffic counted
            after = (await backends["b"].get()).peers[keys["a"].public_key()]  # type: ignore[union-attr]
            assert after.endpoint == AddrPort.parse(f"10.77.0.1:{PORT}")
            assert after.last_handshake == before.last_handshake
            assert after.rx_bytes > before.rx_bytes
            assert a.ping("10.88.0.2", count=2, timeout=2)
        finally:
            for be in backends.values():
                await be.close(remove=True)
