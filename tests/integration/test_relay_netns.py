"""The relay forwarder between two wireguard-go peers that are both behind symmetric NATs (root, netns).

Layout: A (192.168.1.10) behind router ra and B (192.168.2.10) behind rb, both ``masquerade
fully-random`` with the CPE firewall, so no direct path exists (nat.md §2); on the internet R
(203.0.113.10) runs ``python -m kubespan.relay`` and F (203.0.113.66) plays the attacker. A's peer B has
endpoint R:port_a, B's peer A has R:port_b. A capture on R (AF_PACKET with a BPF filter for outgoing
packets) checks what the relay sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kubespan.identity import generate_private_key
from kubespan.relay import wgmsg
from kubespan.relay.testing import handshake, transport
from kubespan.wireguard import UserspaceBackend, sync
from kubespan.wireguard.types import AddrPort, DeviceConfig, PeerConfig, PrivateKey, PublicKey
from netns import Lab, Node, ping

pytestmark = pytest.mark.root

R_IP, F_IP = "203.0.113.10", "203.0.113.66"
WG_PORT = 51820
TUN_A, TUN_B = "10.88.0.1", "10.88.0.2"
PACKET_RATE, PACKET_BURST = 2000, 500  # per allocation, for the flood check

T = TypeVar("T")


def in_netns(node: Node, make: Callable[[], T]) -> T:
    """``make()`` run in a thread that entered ``node``'s network namespace: a socket made there keeps
    the namespace, and the test process uses it without a subprocess."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{node.ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), f"setns {node.ns}")
            finally:
                os.close(fd)
            result["value"] = make()
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def udp_socket(node: Node, addr: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, 0))
        s.settimeout(0.5)
        return s

    return in_netns(node, make)


class Capture:
    """Outgoing UDP/IPv4 payloads leaving ``node``'s ``ifname``, read by a thread until ``stop()``."""

    # classic BPF: accept a packet only when its pkttype is PACKET_OUTGOING (4)
    _FILTER = ((0x20, 0, 0, 0xFFFFF000 + 4), (0x15, 0, 1, 4), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0))

    def __init__(self, node: Node, ifname: str = "eth0") -> None:
        def make() -> socket.socket:
            s = socket.socket(
                socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)
            )  # ETH_P_ALL: only those taps see outgoing frames
            prog = b"".join(struct.pack("HBBI", *ins) for ins in self._FILTER)
            buf = ctypes.create_string_buffer(prog)
            fprog = struct.pack("HL", len(self._FILTER), ctypes.addressof(buf))
            s.setsockopt(socket.SOL_SOCKET, 26, fprog)  # SO_ATTACH_FILTER (the kernel copies it)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind((ifname, 0))
            s.settimeout(0.2)
            return s

        self.sock = in_netns(node, make)
        self.packets: list[tuple[int, bytes]] = []  # (UDP source port, payload)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.packets) < 200_000:
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            ip = frame[14:]
            if frame[12:14] != b"\x08\x00" or len(ip) < 28 or ip[9] != 17:  # UDP over IPv4 only
                continue
            ihl = (ip[0] & 0x0F) * 4
            sport = struct.unpack("!H", ip[ihl : ihl + 2])[0]
            self.packets.append((sport, ip[ihl + 8 :]))

    def stop(self) -> list[tuple[int, bytes]]:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return self.packets


@dataclass
class Peer:
    node: Node
    key: PrivateKey
    tunnel: str
    backend: UserspaceBackend


async def wg_peer(
    node: Node, key: PrivateKey, tunnel: str, other: PrivateKey, other_tunnel: str, via: str
) -> Peer:
    """wireguard-go on ``node`` with one peer (``other``) whose endpoint is the relay port ``via``."""
    backend = UserspaceBackend(
        "kubespan", socket_dir=node.run_dir / "wireguard", command_prefix=["ip", "netns", "exec", node.ns]
    )
    await backend.ensure_device()
    peer = PeerConfig(
        other.public_key(), frozenset({ip_network(f"{other_tunnel}/32")}), AddrPort.parse(via), 25
    )
    await sync(backend, DeviceConfig.of(key, WG_PORT, 0, [peer]))
    node.run("ip", "addr", "replace", f"{tunnel}/24", "dev", "kubespan")
    node.run("ip", "link", "set", "kubespan", "up")
    return Peer(node, key, tunnel, backend)


@contextlib.asynccontextmanager
async def relay_lab() -> AsyncIterator[tuple[Lab, Node, Node, Node, Node]]:
    async with Lab() as lab:
        net, lan_a, lan_b = lab.internet(), lab.segment("lana"), lab.segment("lanb")
        r, f, a, b = lab.node("r"), lab.node("f"), lab.node("a"), lab.node("b")
        lab.attach(r, net, [f"{R_IP}/24"])
        lab.attach(f, net, [f"{F_IP}/24"])
        lab.attach(a, lan_a, ["192.168.1.10/24"])
        lab.attach(b, lan_b, ["192.168.2.10/24"])
        lab.router("ra", lan_a, net, "192.168.1.1/24", "203.0.113.1/24", nat="symmetric")
        lab.router("rb", lan_b, net, "192.168.2.1/24", "203.0.113.2/24", nat="symmetric")
        yield lab, r, f, a, b


async def start_relay(lab: Lab, r: Node, *pairs: tuple[bytes, bytes]) -> tuple[Path, list[tuple[int, int]]]:
    """``python -m kubespan.relay`` in R; returns its status file and the port pairs, in order."""
    status = lab.dir / "relay-status.json"
    args = [f"{PublicKey(ka).b64},{PublicKey(kb).b64}" for ka, kb in pairs]
    proc = await r.spawn(
        *(sys.executable, "-m", "kubespan.relay", "--listen", R_IP),
        *(x for a in args for x in ("--alloc", a)),
        *("--packet-rate", str(PACKET_RATE), "--packet-burst", str(PACKET_BURST), "--byte-rate", "0"),
        *("--status-file", str(status), "--status-interval", "0.1"),
        name="relay",
        private_run=False,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = [ln for ln in proc.log.read_text().splitlines() if ln.startswith("{")]
        docs = [json.loads(ln) for ln in lines]
        if any(d.get("ready") for d in docs):
            return status, [tuple(d["ports"]) for d in docs if "ports" in d and "msg" not in d]  # type: ignore[misc]
        assert proc.running, proc.tail()
        await asyncio.sleep(0.05)
    raise AssertionError(f"relay did not start: {proc.tail()}")


def relay_status(path: Path, after: float) -> dict[str, dict[str, Any]]:
    """The relay's status file, once written after ``after`` (wall clock), by the leg-A port."""
    deadline = time.monotonic() + 5
    while path.stat().st_mtime < after and time.monotonic() < deadline:
        time.sleep(0.05)
    doc = json.loads(path.read_text())
    return {str(a["ports"][0]): a for a in doc["allocations"]}


def wait_ping(node: Node, target: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if node.ping(target, timeout=1):
            return True
    return False


def flood(sock: socket.socket, port: int, seconds: float) -> int:
    """Valid-looking transport packets to R:port at about 20 000 a second; returns how many were sent."""
    sent, end, pkt = 0, time.monotonic() + seconds, transport(64)
    while time.monotonic() < end:
        for _ in range(200):
            sock.sendto(pkt, (R_IP, port))
        sent += 200
        time.sleep(0.01)
    return sent


def count_arrivals(sock: socket.socket, seconds: float) -> int:
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            sock.recv(2048)
            n += 1
    return n


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    keys = set(after["dropped"]) | set(before["dropped"])
    out = {k: after["dropped"].get(k, 0) - before["dropped"].get(k, 0) for k in keys}
    return {k: v for k, v in out.items() if v}


async def test_symmetric_nat_peers_talk_through_the_relay_and_nothing_else_passes() -> None:
    ka, kb = generate_private_key(), generate_private_key()
    kx, ky = os.urandom(32), os.urandom(32)  # a second allocation, latched by the attacker F
    async with relay_lab() as (lab, r, f, a, b):
        capture = Capture(r)
        status, ports = await start_relay(lab, r, (ka.public_key().raw, kb.public_key().raw), (kx, ky))
        (pa, pb), (px, py) = ports
        wg: list[Peer] = []
        try:
            wg.append(await wg_peer(a, ka, TUN_A, kb, TUN_B, f"{R_IP}:{pa}"))
            wg.append(await wg_peer(b, kb, TUN_B, ka, TUN_A, f"{R_IP}:{pb}"))

            # 1. both peers sent initiations on configuration (keepalive on); the second one got through
            assert wait_ping(a, TUN_B, 20), "no ping over the relayed tunnel"
            assert ping(a, TUN_B, count=5, interval=0.1).ok
            st = relay_status(status, time.time())[str(pa)]
            assert st["latched"][0].startswith("203.0.113.1:") and st["latched"][1].startswith("203.0.113.2:")
            assert st["forwarded_packets"] >= 10 + 2  # five pings each way, and the handshake
            dev = await wg[0].backend.get()
            assert dev is not None
            (observed,) = dev.peers.values()
            assert observed.endpoint == AddrPort.parse(f"{R_IP}:{pa}") and observed.last_handshake

            # 2. junk, forgeries and strangers from F are dropped (and answered with nothing)
            before = relay_status(status, time.time())[str(pa)]
            f0 = udp_socket(f, F_IP)
            forged = [handshake(kb.public_key().raw, forged=True), handshake(ka.public_key().raw)]
            junk = [b"hello relay", os.urandom(100), transport()]
            for pkt in forged:
                f0.sendto(pkt, (R_IP, pa))
            for pkt in junk[:2] * 2 + junk[2:]:
                f0.sendto(pkt, (R_IP, pa))
            f0.sendto(handshake(ka.public_key().raw, forged=True), (R_IP, pb))
            with pytest.raises(TimeoutError):
                f0.recv(2048)
            after = relay_status(status, time.time() + 0.05)[str(pa)]
            assert delta(after, before) == {"bad_mac1": 3, "not_wireguard": 4, "unlatched_source": 1}
            assert after["latched"] == before["latched"]
            assert ping(a, TUN_B, count=3, interval=0.1).ok

            # 3. a flood on another allocation is limited; A and B keep talking meanwhile
            f1, f2 = udp_socket(f, F_IP), udp_socket(f, F_IP)
            f1.sendto(handshake(ky), (R_IP, px))
            await asyncio.sleep(0.1)
            f2.sendto(handshake(kx), (R_IP, py))
            assert f1.recv(2048)[:4] == b"\x01\x00\x00\x00"  # the second initiation went through
            base = relay_status(status, time.time())
            seconds = 2.0
            flooded = asyncio.create_task(asyncio.to_thread(flood, f1, px, seconds))
            arrived = asyncio.create_task(asyncio.to_thread(count_arrivals, f2, seconds + 0.5))
            pinged = await asyncio.to_thread(ping, a, TUN_B, 15, 2, 0.1)
            sent, got = await flooded, await arrived
            end = relay_status(status, time.time() + 0.05)
            fx, ab = end[str(px)], end[str(pa)]
            limited = delta(fx, base[str(px)]).get("rate_limited", 0)
            forwarded = fx["forwarded_packets"] - base[str(px)]["forwarded_packets"]
            assert sent > 2 * (PACKET_BURST + PACKET_RATE * seconds)
            assert limited > sent / 3, (limited, sent)
            assert forwarded <= PACKET_BURST + PACKET_RATE * (seconds + 1), forwarded
            assert 0 < got <= forwarded
            assert pinged.ok, pinged
            assert "rate_limited" not in ab["dropped"]
        finally:
            packets = capture.stop()
            for p in wg:
                await p.backend.close(remove=True)

        # 4. everything R sent over UDP came out of a relay port and was a WireGuard message
        relay_ports = {pa, pb, px, py}
        assert {sport for sport, _ in packets} <= relay_ports, {sport for sport, _ in packets} - relay_ports
        kinds = {wgmsg.message_type(payload) for _, payload in packets}
        assert None not in kinds and {1, 2, 4} <= kinds, kinds
        sent_payloads = {payload for _, payload in packets}
        assert not sent_payloads & {*forged, *junk, handshake(ka.public_key().raw, forged=True)}
        ab_kinds = {wgmsg.message_type(p) for sport, p in packets if sport in (pa, pb)}
        assert {1, 2, 4} <= ab_kinds


async def test_the_relay_relatches_after_a_nat_rebind(capsys: pytest.CaptureFixture[str]) -> None:
    """A's router forgets its mappings (conntrack flushed): A's next packets come from a new random port.
    Data from there is dropped until WireGuard, hearing nothing back, starts a new handshake (after
    about 15 s); its initiation moves leg A (nat.md §5, lab test 5: re-latch within 15 s under traffic)."""
    ka, kb = generate_private_key(), generate_private_key()
    async with relay_lab() as (lab, r, _f, a, b):
        status, [(pa, pb)] = await start_relay(lab, r, (ka.public_key().raw, kb.public_key().raw))
        wg: list[Peer] = []
        try:
            wg.append(await wg_peer(a, ka, TUN_A, kb, TUN_B, f"{R_IP}:{pa}"))
            wg.append(await wg_peer(b, kb, TUN_B, ka, TUN_A, f"{R_IP}:{pb}"))
            assert wait_ping(a, TUN_B, 20), "no ping over the relayed tunnel"
            before = relay_status(status, time.time())[str(pa)]
            lab.nodes["ra"].run(sys.executable, "-c", "from pyroute2 import Conntrack; Conntrack().flush()")
            t0 = time.monotonic()
            assert wait_ping(a, TUN_B, 30), "the relayed tunnel did not come back after the rebind"
            took = time.monotonic() - t0
            after = relay_status(status, time.time())[str(pa)]
        finally:
            for p in wg:
                await p.backend.close(remove=True)
    assert after["latched"][0] != before["latched"][0] and after["latched"][0].startswith("203.0.113.1:")
    assert after["latched"][1] == before["latched"][1]
    assert after["latches"] == before["latches"] + 1
    assert delta(after, before).get("unlatched_source", 0) > 0  # data from the new port, before the handshake
    assert took <= 20, took
    with capsys.disabled():
        print(
            f"\nrelay re-latch after a NAT rebind, WireGuard alone (no agent): {took:.1f} s "
            "(nat.md target: <= 15 s under traffic; with agents: test_traversal_netns's rebind test)"
        )
