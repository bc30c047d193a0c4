"""Relay allocations requested over the mesh, between wireguard-go nodes (root, netns).

A and B sit behind symmetric NATs (``hard``, so no direct path: nat.md §2); R is on the internet. The
test configures the tunnels A↔R and B↔R (AllowedIPs: each other's mesh /128). R runs RelayService with its
control server on its mesh address; A asks for an allocation through its tunnel to R, and B hears of it
by NOTIFY through its own. The test then points A's peer B at R:port_a and B's peer A at R:port_b and
checks that A and B handshake and ping end to end. A source the relay does not know is refused; a source
address that is not in the sending peer's AllowedIPs never reaches the relay (cryptokey routing); a
neighbour F on R's internet link forging A's mesh address does not reach the relay's control socket,
which is bound to the mesh link (a socket that is not, is reached); a stopped relay leaves the client
with a timeout, which is what failover acts on.

Each node's control sockets live on an asyncio loop in a thread that entered the node's network
namespace, so the sockets are made there without a subprocess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from ipaddress import ip_network
from typing import Any, TypeVar

import pytest

from kubespan.identity import generate_private_key
from kubespan.relay.control import (
    CLIENT_PORT,
    ControlServer,
    ErrorCode,
    Notice,
    RelayClient,
    RelayRefused,
    RelayTimeout,
)
from kubespan.relay.service import RelayService
from kubespan.wireguard import UserspaceBackend, sync
from kubespan.wireguard.types import AddrPort, DeviceConfig, PeerConfig, PrivateKey, PublicKey
from netns import Lab, Node, ping
from spanutil.ipcodec import ip_without_scope

pytestmark = pytest.mark.root

WG_PORT = 51820
PREFIX = "fd5a:14::"
MESH = {"r": f"{PREFIX}1", "a": f"{PREFIX}2", "b": f"{PREFIX}3"}
A_EXTRA = f"{PREFIX}12"  # a second address of A: in R's AllowedIPs for A, unknown to the relay's directory
KEEPALIVE = 2
F_IP, F_V6, R_V6 = "203.0.113.66", "2001:db8:14::66", "2001:db8:14::1"

T = TypeVar("T")


class NetnsLoop:
    """An asyncio loop on a thread inside ``node``'s network namespace; :meth:`run` awaits a coroutine
    there from the test's own loop. ``close()`` stops the loop and joins the thread."""

    def __init__(self, node: Node) -> None:
        self.loop = asyncio.new_event_loop()
        entered: concurrent.futures.Future[None] = concurrent.futures.Future()

        def work() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                fd = os.open(f"/run/netns/{node.ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                        raise OSError(ctypes.get_errno(), f"setns {node.ns}")
                finally:
                    os.close(fd)
            except BaseException as e:
                entered.set_exception(e)
                return
            entered.set_result(None)
            asyncio.set_event_loop(self.loop)
            self.loop.run_forever()

        self.thread = threading.Thread(target=work, name=f"netns-{node.name}", daemon=True)
        self.thread.start()
        entered.result(10)

    async def run(self, coro: Coroutine[Any, Any, T], within: float = 30) -> T:
        return await asyncio.wait_for(
            asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop)), within
        )

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def wg(node: Node, key: PrivateKey, peers: list[PeerConfig], addrs: list[str]) -> UserspaceBackend:
    """wireguard-go on ``node`` with ``peers`` and mesh addresses ``addrs`` (the first one /64 so the mesh
    prefix routes into the tunnel; the others see :func:`extra_addr`)."""
    backend = UserspaceBackend(
        "kubespan", socket_dir=node.run_dir / "wireguard", command_prefix=["ip", "netns", "exec", node.ns]
    )
    await backend.ensure_device()
    await sync(backend, DeviceConfig.of(key, WG_PORT, 0, peers))
    node.run("ip", "link", "set", "kubespan", "up")
    node.addr("kubespan", f"{addrs[0]}/64")
    for extra in addrs[1:]:
        extra_addr(node, extra)
    return backend


def extra_addr(node: Node, addr: str, dev: str = "kubespan") -> None:
    """``addr``/128 on ``node``'s link ``dev``, deprecated so that it is a source only when bound to."""
    node.run("ip", "-6", "addr", "add", f"{addr}/128", "dev", dev, "nodad", "preferred_lft", "0")


def peer(key: PrivateKey, *allowed: str, endpoint: str | None = None) -> PeerConfig:
    nets = frozenset(ip_network(f"{a}/128") for a in allowed)
    return PeerConfig(key.public_key(), nets, AddrPort.parse(endpoint) if endpoint else None, KEEPALIVE)


def normal(addr: str) -> str:
    return str(ip_without_scope(addr))


async def wait_until(cond: Callable[[], Awaitable[bool]], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await cond():
            return True
        await asyncio.sleep(0.2)
    return False


async def test_allocation_over_the_mesh_joins_two_symmetric_nat_nodes() -> None:
    kr, ka, kb = generate_private_key(), generate_private_key(), generate_private_key()
    KR, KA, KB = kr.public_key(), ka.public_key(), kb.public_key()
    loops: dict[str, NetnsLoop] = {}
    backends: list[UserspaceBackend] = []
    clients: dict[str, tuple[NetnsLoop, RelayClient]] = {}
    service_box: dict[str, RelayService] = {}
    async with Lab() as lab:
        r_site, a_site, b_site = lab.site("r", "open"), lab.site("a", "hard"), lab.site("b", "hard")
        r, a, b = r_site.node, a_site.node, b_site.node
        r_ip = r_site.public_ip
        f = lab.node("f")  # a neighbour of R's on the internet segment, with R as its route to the mesh
        lab.attach(f, lab.internet(), [f"{F_IP}/24"])
        r.addr("eth0", f"{R_V6}/64")
        f.addr("eth0", f"{F_V6}/64")
        f.route(f"{MESH['r']}/128", "via", R_V6)
        try:
            t0 = time.monotonic()
            backends.append(await wg(r, kr, [peer(ka, MESH["a"], A_EXTRA), peer(kb, MESH["b"])], [MESH["r"]]))
            backends.append(
                await wg(a, ka, [peer(kr, MESH["r"], endpoint=f"{r_ip}:{WG_PORT}")], [MESH["a"], A_EXTRA])
            )
            backends.append(await wg(b, kb, [peer(kr, MESH["r"], endpoint=f"{r_ip}:{WG_PORT}")], [MESH["b"]]))
            assert await asyncio.to_thread(a.ping, MESH["r"], 3, 2), "A cannot reach R over its tunnel"
            assert await asyncio.to_thread(b.ping, MESH["r"], 3, 2), "B cannot reach R over its tunnel"

            # the relay's directory: mesh address -> key, key -> client address
            who_r = {MESH["a"]: KA, MESH["b"]: KB}
            where_r = {KA: (MESH["a"], CLIENT_PORT), KB: (MESH["b"], CLIENT_PORT)}
            for node in (r, a, b, f):
                loops[node.name] = NetnsLoop(node)
            lr, la, lb, lf = loops["r"], loops["a"], loops["b"], loops["f"]

            async def start_service() -> dict[str, Any]:
                svc = RelayService(
                    MESH["r"],
                    lambda addr: who_r.get(normal(addr)),
                    where_r.get,
                    public_host=r_ip,
                    device="kubespan",
                )
                await svc.start()
                service_box["svc"] = svc
                return svc.status()

            await lr.run(start_service())
            svc = service_box["svc"]

            def relay_only(addr: str) -> PublicKey | None:
                return KR if normal(addr) == MESH["r"] else None

            notices: list[Notice] = []

            async def start_client(
                loop: NetnsLoop, host: str, on_notify: Callable[[Notice], None] | None = None
            ) -> RelayClient:
                async def start() -> RelayClient:
                    c = RelayClient(host, who=relay_only, on_notify=on_notify)
                    await c.start()
                    return c

                c = await loop.run(start())
                clients[host] = (loop, c)
                return c

            ca = await start_client(la, MESH["a"])
            cb = await start_client(lb, MESH["b"], notices.append)
            ca_extra = await start_client(la, A_EXTRA)

            # 1. RTT over the tunnel, then A allocates and B is told
            rtt = await la.run(ca.ping(MESH["r"], timeout=2))
            assert 0 < rtt < 1
            got = await la.run(ca.allocate(MESH["r"], KB, timeout=5))
            assert got.lifetime == 180
            for _ in range(50):
                if notices:
                    break
                await asyncio.sleep(0.05)
            assert len(notices) == 1, "B got no NOTIFY over its tunnel"
            (notice,) = notices
            assert (notice.relay, notice.peer, notice.lifetime) == (KR, KA, 180)
            port_a, port_b = got.port, notice.port
            assert (await la.run(ca.allocate(MESH["r"], KB, timeout=5))).port == port_a
            assert (await lb.run(cb.allocate(MESH["r"], KA, timeout=5))).port == port_b
            status = await lr.run(_status(svc))
            assert len(status["allocations"]) == 1 and status["control"]["notify_acked"] >= 2

            # 2. the pair's endpoints go through the relay: handshake and ping end to end
            a_peers = [
                peer(kr, MESH["r"], endpoint=f"{r_ip}:{WG_PORT}"),
                peer(kb, MESH["b"], endpoint=f"{r_ip}:{port_a}"),
            ]
            b_peers = [
                peer(kr, MESH["r"], endpoint=f"{r_ip}:{WG_PORT}"),
                peer(ka, MESH["a"], endpoint=f"{r_ip}:{port_b}"),
            ]
            t_cfg = time.monotonic()
            await sync(backends[1], DeviceConfig.of(ka, WG_PORT, 0, a_peers))
            await sync(backends[2], DeviceConfig.of(kb, WG_PORT, 0, b_peers))

            async def handshaken() -> bool:
                dev = await backends[1].get()
                return dev is not None and bool(dev.peers[KB].last_handshake)

            assert await wait_until(handshaken, 15), "no A-B handshake through the relay"
            took, setup = time.monotonic() - t_cfg, time.monotonic() - t0
            result = await asyncio.to_thread(ping, a, MESH["b"], 5, 2, 0.1)
            assert result.ok, result
            status = await lr.run(_status(svc))
            (alloc,) = status["allocations"]
            assert alloc["ports"] == [port_a, port_b]
            assert alloc["latched"][0].startswith(f"{a_site.public_ip}:")
            assert alloc["latched"][1].startswith(f"{b_site.public_ip}:")
            assert status["forwarded_packets"] >= 10 + 2

            # 3. a source the relay's directory does not know is refused ...
            with pytest.raises(RelayRefused) as refused:
                await la.run(ca_extra.allocate(MESH["r"], KB, timeout=5))
            assert refused.value.code == ErrorCode.UNKNOWN_SOURCE
            # ... and a source outside the sending peer's AllowedIPs never gets there (R's WireGuard drops it)
            spoof = f"{PREFIX}99"
            extra_addr(a, spoof)
            ca_spoof = await start_client(la, spoof)
            before = (await lr.run(_status(svc)))["control"]
            with pytest.raises(RelayTimeout):
                await la.run(ca_spoof.ping(MESH["r"], timeout=1))
            assert (await lr.run(_status(svc)))["control"] == before

            # 4. a neighbour on another link forging A's mesh address reaches a socket not held to the mesh
            # link (Linux's weak host model), but not the relay's, which is bound to it
            loose_box: dict[str, ControlServer] = {}

            async def start_loose() -> int:
                loose = ControlServer(
                    MESH["r"], svc, lambda addr: who_r.get(normal(addr)), where_r.get, port=0
                )
                await loose.start()
                loose_box["s"] = loose
                return loose.address[1]

            loose_port = await lr.run(start_loose())
            try:
                extra_addr(f, MESH["a"], "eth0")
                forger = await start_client(lf, MESH["a"])
                before = (await lr.run(_status(svc)))["control"]
                with pytest.raises(RelayTimeout):  # the answer goes to the real A, through the tunnel
                    await lf.run(forger.ping(MESH["r"], timeout=1))
                assert (await lr.run(_status(svc)))["control"] == before
                forger.relay_port = loose_port
                with pytest.raises(RelayTimeout):
                    await lf.run(forger.ping(MESH["r"], timeout=1))
                assert loose_box["s"].counters.requests == {"PING": 1}  # taken for A: the hole is real
            finally:
                await lr.run(loose_box["s"].stop())

            # 5. the relay stops: the client times out (what failover acts on)
            await lr.run(svc.stop())
            t_stop = time.monotonic()
            with pytest.raises(RelayTimeout):
                await la.run(ca.allocate(MESH["r"], KB, timeout=2, retry=0.5))
            assert 1.9 <= time.monotonic() - t_stop < 5
            print(
                f"\nrelay over the mesh: RTT to R {rtt * 1000:.2f} ms; endpoints set to A-B handshake {took:.2f} s (whole setup {setup:.1f} s)"
            )
        finally:
            for loop, c in clients.values():
                await loop.run(c.stop())
            if "svc" in service_box:
                await loops["r"].run(service_box["svc"].stop())
            for loop in loops.values():
                loop.close()
            for be in backends:
                await be.close(remove=True)


async def _status(svc: RelayService) -> dict[str, Any]:
    return svc.status()
