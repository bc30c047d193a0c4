"""The relay forwarder on loopback UDP (kubespan.relay.forwarder): real sockets, crafted WireGuard
messages, an injected clock where time matters."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from kubespan.relay import Forwarder, Limits, RelayError, RelayLimits, wgmsg
from kubespan.relay.testing import handshake, transport
from kubespan.wireguard.types import PublicKey

HOST = "127.0.0.1"
QUIET = 0.15  # how long "nothing arrives" is watched


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Peer:
    """A UDP socket on loopback standing in for one WireGuard peer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()

    def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, (HOST, port))

    async def recv(self, wait: float = 2.0) -> tuple[bytes, tuple[str, int]] | None:
        try:
            async with asyncio.timeout(wait):
                return await asyncio.get_running_loop().sock_recvfrom(self.sock, 4096)
        except TimeoutError:
            return None

    async def drain(self, wait: float = QUIET) -> list[bytes]:
        """Everything that arrives until nothing has for ``wait`` seconds."""
        got = []
        while (m := await self.recv(wait)) is not None:
            got.append(m[0])
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made = [Peer() for _ in range(5)]
    yield made
    for p in made:
        p.close()


@pytest.fixture
async def relay() -> AsyncIterator[Forwarder]:
    async with Forwarder(HOST) as fwd:
        yield fwd


def keys() -> tuple[bytes, bytes]:
    return os.urandom(32), os.urandom(32)


async def join(fwd: Forwarder, a: Peer, b: Peer) -> tuple[bytes, bytes, int, int]:
    """A new allocation with both legs latched by valid initiations; returns keys and ports."""
    ka, kb = keys()
    pa, pb = await fwd.allocate(ka, kb)
    a.send(handshake(kb), pa)
    await asyncio.sleep(0.05)  # in order: a's initiation finds leg B empty, b's goes through
    init_b = handshake(ka)
    b.send(init_b, pb)
    got = await a.recv()
    assert got == (init_b, (HOST, pa)), got  # from the relay's leg-A port, bytes unchanged
    return ka, kb, pa, pb


async def test_latched_peers_exchange_wireguard_through_their_own_legs(relay: Forwarder, peers) -> None:
    a, b = peers[0], peers[1]
    _, kb, pa, pb = await join(relay, a, b)
    data = transport(1200)
    a.send(data, pa)
    assert await b.recv() == (data, (HOST, pb))
    resp = handshake(kb, wgmsg.RESPONSE)
    a.send(resp, pa)
    assert await b.recv() == (resp, (HOST, pb))
    st = relay.status()[0]
    assert st["ports"] == [pa, pb] and st["latched"] == [f"{HOST}:{a.addr[1]}", f"{HOST}:{b.addr[1]}"]
    assert st["forwarded_packets"] == 3 and st["forwarded_bytes"] == 148 + len(data) + 92


async def test_no_latch_without_mac1_for_the_other_peer(relay: Forwarder, peers) -> None:
    a, b = peers[0], peers[1]
    ka, kb = keys()
    pa, pb = await relay.allocate(PublicKey(ka), PublicKey(kb))
    b.send(handshake(ka), pb)  # leg B latched to b
    await asyncio.sleep(0.05)
    a.send(handshake(ka), pa)  # keyed for A itself: wrong
    a.send(handshake(kb, forged=True), pa)
    a.send(transport(), pa)
    assert await b.drain() == []
    al = relay.allocation(pa)
    assert al is not None and al.legs[0].latched is None
    assert al.counters.dropped == {"bad_mac1": 2, "peer_not_latched": 1, "unlatched_source": 1}


async def test_junk_forgeries_and_strangers_get_nothing_through(relay: Forwarder, peers) -> None:
    a, b, eve = peers[0], peers[1], peers[2]
    _, kb, pa, pb = await join(relay, a, b)
    for port in (pa, pb):
        eve.send(b"hello relay", port)
        eve.send(os.urandom(148), port)
        eve.send(transport(), port)
        eve.send(handshake(kb, forged=True), port)
    a.send(b"\x05\x00\x00\x00" + bytes(60), pa)  # not WireGuard, even from the latched peer
    assert await b.drain() == [] and await a.drain() == [] and await eve.drain() == []
    st = relay.status()[0]
    assert st["forwarded_packets"] == 1  # b's initiation only
    assert sum(st["dropped"].values()) == 9 + 1  # + a's initiation that found leg B empty
    assert st["latched"] == [f"{HOST}:{a.addr[1]}", f"{HOST}:{b.addr[1]}"]


async def test_relatch_after_a_nat_rebind(relay: Forwarder, peers) -> None:
    a, b, a2 = peers[0], peers[1], peers[2]
    _, kb, pa, pb = await join(relay, a, b)
    a2.send(transport(), pa)  # A's NAT moved it; data alone does not re-latch
    assert await b.drain() == []
    init = handshake(kb)
    a2.send(init, pa)
    assert await b.recv() == (init, (HOST, pb))
    data = transport()
    b.send(data, pb)
    assert await a2.recv() == (data, (HOST, pa))
    assert await a.drain() == []  # the old address gets nothing any more
    a.send(transport(), pa)
    assert await b.drain() == []


async def test_a_flood_is_limited_while_another_allocation_keeps_working(peers) -> None:
    clock = Clock()  # frozen: no refill during the flood, so the count is exact
    limits = Limits(packet_rate=100, packet_burst=50, byte_rate=0, byte_burst=0)
    async with Forwarder(HOST, limits, clock=clock) as fwd:
        a, b, c, d = peers[:4]
        _, _, pa, _pb = await join(fwd, a, b)
        _, _, pc, _pd = await join(fwd, c, d)
        for i in range(500):
            a.send(transport(), pa)
            if i % 25 == 24:
                await asyncio.sleep(
                    0.002
                )  # let the relay read: this tests its limit, not the kernel's buffer
        got = await b.drain(0.3)
        assert len(got) == 49  # the burst of 50, one spent on b's initiation
        flooded = fwd.allocation(pa)
        assert flooded is not None and flooded.counters.dropped["rate_limited"] == 451
        for i in range(20):  # meanwhile the other allocation passes everything
            c.send(transport(counter=i), pc)
        assert len(await d.drain()) == 20
        other = fwd.allocation(pc)
        assert other is not None and "rate_limited" not in other.counters.dropped
        clock.now += 1  # one second later: 100 more tokens (capped at the burst of 50)
        for _ in range(60):
            a.send(transport(), pa)
        assert len(await b.drain(0.3)) == 50


async def test_unknown_and_released_ports_forward_nothing(relay: Forwarder, peers) -> None:
    a, b, eve = peers[0], peers[1], peers[2]
    _, _, pa, pb = await join(relay, a, b)
    assert relay.release(pb) and relay.allocation(pa) is None and len(relay) == 0
    assert not relay.release(pb)
    a.send(transport(), pa)
    eve.send(transport(), pb)
    assert await b.drain() == [] and await a.drain() == []
    # both ports were closed: they can be bound again
    for port in (pa, pb):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, port))


async def test_idle_allocations_expire_by_the_injected_clock(peers) -> None:
    clock = Clock()
    async with Forwarder(HOST, Limits(idle_timeout=180), clock=clock, sweep_interval=3600) as fwd:
        a, b, c, d = peers[:4]
        _, _, pa, pb = await join(fwd, a, b)
        _, _, pc, pd = await join(fwd, c, d)
        clock.now += 100
        a.send(transport(), pa)
        assert await b.recv() is not None
        clock.now += 80  # c/d: 180 s idle; a/b: 80 s
        assert fwd.expire_idle() == [(pc, pd)]
        assert fwd.allocation(pc) is None and fwd.allocation(pa) is not None
        clock.now += 100
        assert fwd.expire_idle() == [(pa, pb)] and len(fwd) == 0 and fwd.expired == 2


async def test_the_sweeper_expires_on_its_own() -> None:
    async with Forwarder(HOST, Limits(idle_timeout=0.2), sweep_interval=0.05) as fwd:
        await fwd.allocate(*keys())
        async with asyncio.timeout(3):
            while len(fwd):  # noqa: ASYNC110 (watching the forwarder from outside, as a caller would)
                await asyncio.sleep(0.05)
        assert fwd.expired == 1


async def test_the_relay_limits_its_allocations() -> None:
    async with Forwarder(HOST, relay_limits=RelayLimits(max_allocations=2)) as fwd:
        same = os.urandom(32)
        with pytest.raises(ValueError, match="must differ"):
            await fwd.allocate(same, same)
        assert len(fwd) == 0
        first = await fwd.allocate(*keys())
        await fwd.allocate(*keys())
        with pytest.raises(RelayError, match="relay full: 2 allocations"):
            await fwd.allocate(*keys())
        fwd.release(first[0])
        await fwd.allocate(*keys())
        assert len(fwd) == 2
        assert len(fwd) == 2


def free_range(n: int) -> range:
    """``n`` consecutive loopback UDP ports that were free a moment ago."""
    for base in range(42000, 60000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((HOST, p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return range(base, base + n)
    raise AssertionError("no free port range")


async def test_allocations_stay_in_the_configured_port_range() -> None:
    ports = free_range(5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, ports[1]))  # someone else holds one of them
        async with Forwarder(HOST, ports=ports) as fwd:
            got = [await fwd.allocate(*keys()), await fwd.allocate(*keys())]
            assert got == [(ports[0], ports[2]), (ports[3], ports[4])]
            with pytest.raises(RelayError, match="no free relay port"):
                await fwd.allocate(*keys())
            assert len(fwd) == 2


async def test_lifecycle_leaves_known_state(peers) -> None:
    fwd = Forwarder(HOST)
    with pytest.raises(RelayError, match="new, not running"):
        await fwd.allocate(*keys())
    await fwd.start()
    with pytest.raises(RelayError, match="start it once"):
        await fwd.start()
    ports = [p for _ in range(3) for p in await fwd.allocate(*keys())]
    await fwd.close()
    assert len(fwd) == 0 and fwd.status() == []
    with pytest.raises(RelayError, match="closed"):
        await fwd.allocate(*keys())
    for port in ports:  # every socket was closed
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, port))


async def test_ipv6_works_alike() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    socks = []
    try:
        for _ in range(2):
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            socks.append(s)
            try:
                s.bind(("::1", 0))
            except OSError as e:
                pytest.skip(f"no IPv6 loopback here: {e}")
            s.setblocking(False)
        a, b = socks
        ka, kb = keys()
        loop = asyncio.get_running_loop()
        async with Forwarder("::1") as fwd:
            pa, pb = await fwd.allocate(ka, kb)
            a.sendto(handshake(kb), ("::1", pa))
            await asyncio.sleep(0.05)
            b.sendto(handshake(ka), ("::1", pb))
            _, src = await asyncio.wait_for(loop.sock_recvfrom(a, 2048), 2)
            assert src[:2] == ("::1", pa)
            data = transport()
            a.sendto(data, ("::1", pa))
            assert (await asyncio.wait_for(loop.sock_recvfrom(b, 2048), 2))[0] == data
            assert fwd.status()[0]["latched"] == [
                f"[::1]:{a.getsockname()[1]}",
                f"[::1]:{b.getsockname()[1]}",
            ]
    finally:
        for s in socks:
            s.close()
