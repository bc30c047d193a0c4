"""The userspace backend against real wireguard-go in lab namespaces (root)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path

import pytest

from kubespan.identity import generate_private_key
from kubespan.wireguard import UserspaceBackend, WireGuardError, sync, uapi
from kubespan.wireguard.diff import UpdatePeer, diff_device
from kubespan.wireguard.types import AddrPort, DeviceConfig, PeerConfig, PresharedKey, PrivateKey, PublicKey
from netns.lab import Lab, Node

pytestmark = pytest.mark.root

PORT = 51820
PSK = PresharedKey(os.urandom(32))


@dataclass
class Side:
    node: Node
    backend: UserspaceBackend
    key: PrivateKey
    underlay: str
    tunnel: str
    config: DeviceConfig | None = None
    restarted: asyncio.Event = field(default_factory=asyncio.Event)

    def peer(self, extra: tuple[str, ...] = ()) -> PeerConfig:
        nets = frozenset(ip_network(n) for n in (f"{self.tunnel}/32", *extra))
        return PeerConfig(self.key.public_key(), nets, AddrPort.parse(f"{self.underlay}:{PORT}"), 0, PSK)

    def link_up(self) -> None:
        """Data plane stand-in: the tunnel address and link state (a restart recreates the link empty)."""
        self.node.run("ip", "addr", "replace", f"{self.tunnel}/24", "dev", "kubespan")
        self.node.run("ip", "link", "set", "kubespan", "up")

    async def reapply(self) -> None:
        assert self.config is not None
        await sync(self.backend, self.config)
        self.link_up()
        self.restarted.set()


def backend_for(node: Node, side: list[Side], ifname: str = "kubespan") -> UserspaceBackend:
    async def on_restart() -> None:
        await side[0].reapply()

    return UserspaceBackend(
        ifname,
        socket_dir=node.run_dir / "wireguard",
        command_prefix=["ip", "netns", "exec", node.ns],
        on_restart=on_restart,
        backoff_initial=0.05,
    )


@contextlib.asynccontextmanager
async def mesh_pair() -> AsyncIterator[tuple[Lab, Side, Side]]:
    """Two nodes on a veth, each with a configured wireguard-go tunnel to the other."""
    with Lab() as lab:
        a, b = lab.node("a"), lab.node("b")
        lab.link(a, b, ["10.77.0.1/24"], ["10.77.0.2/24"])
        ref_a: list[Side] = []
        ref_b: list[Side] = []
        sa = Side(a, backend_for(a, ref_a), generate_private_key(), "10.77.0.1", "10.88.0.1")
        sb = Side(b, backend_for(b, ref_b), generate_private_key(), "10.77.0.2", "10.88.0.2")
        ref_a.append(sa)
        ref_b.append(sb)
        try:
            for me, other in ((sa, sb), (sb, sa)):
                await me.backend.ensure_device()
                me.config = DeviceConfig.of(me.key, PORT, 0x20, [other.peer()])
                await sync(me.backend, me.config)
                me.link_up()
            yield lab, sa, sb
        finally:
            for s in (sa, sb):
                await s.backend.close(remove=True)


def ping(node: Node, target: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if node.ping(target, timeout=1):
            return True
    return False


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def link_exists(node: Node, ifname: str = "kubespan") -> bool:
    return node.run("ip", "link", "show", ifname, check=False).returncode == 0


async def test_two_nodes_ping_over_wireguard_go():
    async with mesh_pair() as (_, a, b):
        assert a.backend.pid and b.backend.pid and a.backend.pid != b.backend.pid
        assert ping(a.node, b.tunnel) and ping(b.node, a.tunnel)
        for me, other in ((a, b), (b, a)):
            dev = await me.backend.get()
            assert dev is not None and dev.public_key == me.key.public_key() and dev.listen_port == PORT
            assert dev.fwmark == 0x20
            p = dev.peers[other.key.public_key()]
            assert p.rx_bytes > 0 and p.tx_bytes > 0
            assert p.last_handshake is not None and abs(time.time() - p.last_handshake) < 30
            assert p.endpoint == AddrPort.parse(f"{other.underlay}:{PORT}") and p.preshared_key == PSK
        # the socket is reached through the bind-mount source; the host's /run/wireguard is untouched
        assert (a.node.run_dir / "wireguard" / "kubespan.sock").exists()
        assert not exists("/run/wireguard/kubespan.sock")


async def test_unchanged_sync_writes_nothing_and_one_peer_change_one_block():
    async with mesh_pair() as (_, a, b):
        extra = [
            PeerConfig(PublicKey(os.urandom(32)), frozenset({ip_network(f"fd77::{n}/128")})) for n in range(5)
        ]
        assert a.config is not None
        cfg = DeviceConfig.of(a.key, PORT, 0x20, [*a.config.peers.values(), *extra])
        await sync(a.backend, cfg)
        client = a.backend.client
        gets, sets = client.gets, client.sets
        assert await sync(a.backend, cfg) == []
        assert (client.gets, client.sets) == (gets + 1, sets)  # read once, wrote nothing

        changed = DeviceConfig.of(a.key, PORT, 0x20, [b.peer(extra=("10.99.0.0/24",)), *extra])
        ops = await sync(a.backend, changed)
        assert client.sets == sets + 1
        assert ops == [
            UpdatePeer(b.key.public_key(), allowed_ips=changed.peers[b.key.public_key()].allowed_ips)
        ]
        request = uapi.encode_set(client.last_set_ops) or b""
        assert request.count(b"public_key=") == 1 and b"replace_peers" not in request
        dev = await a.backend.get()
        assert dev is not None and diff_device(changed, dev) == []
        assert dev.peers[b.key.public_key()].rx_bytes > 0 or ping(a.node, b.tunnel)  # session kept


async def test_sigkill_restarts_and_reapplies():
    async with mesh_pair() as (_, a, b):
        assert ping(a.node, b.tunnel)
        old = a.backend.pid
        assert old
        os.kill(old, signal.SIGKILL)
        await asyncio.wait_for(a.restarted.wait(), 10)
        assert a.backend.restarts == 1 and a.backend.pid not in (None, old)
        dev = await a.backend.get()
        assert dev is not None and a.config is not None and diff_device(a.config, dev) == []
        assert ping(a.node, b.tunnel) and ping(b.node, a.tunnel)


async def test_thousand_peers_one_set_and_read_back(capsys: pytest.CaptureFixture[str]):
    with Lab() as lab:
        n = lab.node("a")
        be = backend_for(n, [])
        other = backend_for(n, [], ifname="kubespan2")
        try:
            await be.ensure_device()
            peers = [
                PeerConfig(
                    PublicKey(os.urandom(32)),
                    frozenset({ip_network(f"fd00::{i:x}/128"), ip_network(f"10.{i >> 8}.{i & 255}.0/24")}),
                    AddrPort.parse(f"192.0.2.{i % 250 + 1}:{40000 + i}"),
                    25,
                    PSK,
                )
                for i in range(1000)
            ]
            cfg = DeviceConfig.of(generate_private_key(), PORT, 0x20, peers)
            # a set whose first line fails (port taken by another device) answers before reading the rest
            await other.ensure_device()
            await sync(other, DeviceConfig.of(generate_private_key(), PORT, 0, []))
            ops = diff_device(cfg, await be.get())
            with pytest.raises(WireGuardError) as e:
                await be.apply(ops)
            assert e.value.errno == errno.EADDRINUSE and str(be.socket_path) in str(e.value)
            await other.close(remove=True)

            sets = be.client.sets
            t0 = time.perf_counter()
            await be.apply(diff_device(cfg, await be.get()))
            t_set = time.perf_counter() - t0
            assert be.client.sets == sets + 1
            t0 = time.perf_counter()
            dev = await be.get()
            t_get = time.perf_counter() - t0
            assert dev is not None and len(dev.peers) == 1000 and diff_device(cfg, dev) == []
            for p in peers[::97]:
                got = dev.peers[p.public_key]
                assert got.config() == p
            t0 = time.perf_counter()
            assert await sync(be, cfg) == []
            t_noop = time.perf_counter() - t0
            assert be.client.sets == sets + 1
            with capsys.disabled():
                print(
                    f"\n1000 peers on wireguard-go: set {t_set * 1000:.1f} ms, get {t_get * 1000:.1f} ms,"
                    f" no-op sync {t_noop * 1000:.1f} ms"
                )
        finally:
            await other.close(remove=True)
            await be.close(remove=True)


async def test_close_remove_deletes_link_and_keep_is_adopted():
    with Lab() as lab:
        n = lab.node("a")
        first = backend_for(n, [])
        second = backend_for(n, [], ifname="kubespan")
        try:
            await first.ensure_device()
            cfg = DeviceConfig.of(generate_private_key(), PORT, 0x20, [])
            await sync(first, cfg)
            pid = first.pid
            assert link_exists(n)
            await first.close(remove=False)  # the daemon and its link stay
            assert link_exists(n) and pid and exists(f"/proc/{pid}")

            await second.ensure_device()  # a new agent adopts it, configuration intact
            assert second.adopted and second.pid == pid
            assert await sync(second, cfg) == []

            await second.close(remove=True)
            assert not link_exists(n)
            assert not (n.run_dir / "wireguard" / "kubespan.sock").exists()
            assert await second.get() is None
        finally:
            await first.close(remove=True)
            await second.close(remove=True)
