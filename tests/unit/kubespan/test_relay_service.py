"""The relay service (kubespan.relay.service) over loopback: a real forwarder on 127.0.0.1 and the control
server and clients on distinct 127.0.0.x addresses standing for mesh addresses."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from kubespan.relay import Forwarder, Limits, RelayLimits
from kubespan.relay.control import ErrorCode, Notice, RelayClient, RelayRefused, RelayTimeout
from kubespan.relay.service import RelayService
from kubespan.relay.testing import handshake
from kubespan.wireguard.types import PublicKey

PUBLIC = "127.0.0.1"
RELAY = "127.0.0.20"
KR = PublicKey(b"\x0f" * 32)
NODES = {f"127.0.0.{21 + i}": PublicKey(bytes([0xA0 + i]) * 32) for i in range(5)}  # A, B, C, D, E
(A, KA), (B, KB), (C, KC), (D, KD), (E, KE) = NODES.items()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Relay:
    service: RelayService
    clients: dict[PublicKey, RelayClient]
    notices: dict[PublicKey, list[Notice]]
    clock: Clock

    async def allocate(self, requester: PublicKey, peer: PublicKey) -> int:
        got = await self.clients[requester].allocate(RELAY, peer, timeout=1, retry=0.2)
        return got.port


Factory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay() -> AsyncIterator[Factory]:
    """Start a service (keyword arguments: ``limits``, ``relay_limits``, ``per_requester``) with a client
    for every node; all are stopped after the test."""
    started: list[Relay] = []

    async def build(
        limits: Limits | None = None, relay_limits: RelayLimits | None = None, **kw: Any
    ) -> Relay:
        addrs: dict[PublicKey, tuple[str, int]] = {}
        who = {**NODES, RELAY: KR}
        clock = Clock()
        fwd = Forwarder(PUBLIC, limits, relay_limits, clock=clock, sweep_interval=3600)
        svc = RelayService(
            RELAY,
            who.get,
            addrs.get,
            control_port=0,
            forwarder=fwd,
            notify_interval=0.05,
            notify_attempts=2,
            **kw,
        )
        await svc.start()
        relay = Relay(svc, {}, {}, clock)
        started.append(relay)
        for host, k in NODES.items():
            relay.notices[k] = []
            c = RelayClient(
                host, port=0, relay_port=svc.server.address[1], who=who.get, on_notify=relay.notices[k].append
            )
            await c.start()
            relay.clients[k] = c
            addrs[k] = c.address
        return relay

    yield build
    for r in started:
        for c in r.clients.values():
            await c.stop()
        await r.service.stop()


async def wait_for(cond: Callable[[], object], within: float = 2.0) -> None:
    for _ in range(int(within / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_a_pair_gets_one_allocation_whichever_side_asks(start_relay: Factory) -> None:
    r = await start_relay()
    port_a = await r.allocate(KA, KB)
    await wait_for(lambda: r.notices[KB])
    (notice,) = r.notices[KB]
    assert (notice.relay, notice.peer, notice.lifetime) == (KR, KA, 180)
    port_b = notice.port
    assert port_a != port_b
    assert await r.allocate(KB, KA) == port_b  # the follower asking anyway gets its own leg
    assert await r.allocate(KA, KB) == port_a  # and a repeat is the same allocation
    assert len(r.service.forwarder) == 1
    alloc = r.service.forwarder.allocation(port_a)
    assert alloc is not None and (alloc.key_a, alloc.key_b) == (KA.raw, KB.raw)
    await wait_for(lambda: len(r.notices[KA]) == 1)  # B's request told A too, with A's leg
    assert r.notices[KA][0].port == port_a


async def test_the_granted_ports_are_the_right_legs(start_relay: Factory) -> None:
    """A handshake for B sent to A's port and one for A sent to B's port latch and cross."""
    r = await start_relay()
    port_a = await r.allocate(KA, KB)
    await wait_for(lambda: r.notices[KB])
    port_b = r.notices[KB][0].port
    sa, sb = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    try:
        for s in (sa, sb):
            s.bind((PUBLIC, 0))
            s.settimeout(1)
        sa.sendto(handshake(KB.raw), (PUBLIC, port_a))
        await asyncio.sleep(0.05)
        hs = handshake(KA.raw)
        sb.sendto(hs, (PUBLIC, port_b))
        assert await asyncio.to_thread(sa.recv, 2048) == hs
    finally:
        sa.close()
        sb.close()
    st = r.service.status()
    assert st["forwarded_packets"] == 1 and st["dropped"] == {"peer_not_latched": 1}


async def test_a_requester_may_hold_only_its_cap(start_relay: Factory) -> None:
    r = await start_relay(per_requester=2)
    await r.allocate(KA, KB)
    await r.allocate(KA, KC)
    with pytest.raises(RelayRefused, match=r"limit: requester holds 2 allocations \(per_requester 2\)") as e:
        await r.allocate(KA, KD)
    assert e.value.code == ErrorCode.LIMIT
    await r.allocate(KA, KB)  # an existing pair is no new allocation
    await r.allocate(KD, KA)  # others still may, even with A
    assert len(r.service.forwarder) == 3
    assert r.service.status()["control"]["refused"] == {"limit": 1}


async def test_a_full_relay_refuses(start_relay: Factory) -> None:
    r = await start_relay(relay_limits=RelayLimits(max_allocations=1))
    await r.allocate(KA, KB)
    with pytest.raises(RelayRefused, match="relay_full") as e:
        await r.allocate(KC, KD)
    assert e.value.code == ErrorCode.RELAY_FULL
    assert await r.allocate(KB, KA) > 0  # the existing pair is still served


async def test_release_frees_the_pair_for_a_new_allocation(start_relay: Factory) -> None:
    r = await start_relay()
    await r.allocate(KA, KB)
    await r.clients[KB].release(RELAY, KA, timeout=1)
    assert len(r.service.forwarder) == 0
    await r.clients[KB].release(RELAY, KA, timeout=1)  # again: still answered
    await r.clients[KE].release(RELAY, KA, timeout=1)  # a stranger to the pair releases nothing
    port = await r.allocate(KB, KA)
    alloc = r.service.forwarder.allocation(port)
    assert alloc is not None and alloc.key_a == KB.raw


async def test_an_expired_allocation_is_replaced_by_a_new_one(start_relay: Factory) -> None:
    r = await start_relay(limits=Limits(idle_timeout=30))
    first = await r.allocate(KA, KB)
    old = r.service.forwarder.allocation(first)
    await wait_for(lambda: r.notices[KB])
    assert r.notices[KB][0].lifetime == 30
    r.clock.now += 31
    assert r.service.forwarder.expire_idle()
    second = await r.allocate(KB, KA)  # the pair is forgotten: B's request makes a new allocation
    new = r.service.forwarder.allocation(second)
    assert new is not None and new is not old and new.key_a == KB.raw
    assert len(r.service.forwarder) == 1 and r.service.status()["expired"] == 1


async def test_a_stopped_service_releases_everything_and_requests_time_out(start_relay: Factory) -> None:
    r = await start_relay()
    await r.allocate(KA, KB)
    await r.service.stop()
    assert len(r.service.forwarder) == 0 and r.service.status()["running"] is False
    with pytest.raises(RelayTimeout):
        await r.clients[KA].allocate(RELAY, KB, timeout=0.3, retry=0.1)
    with pytest.raises(RelayTimeout):
        await r.clients[KA].ping(RELAY, timeout=0.3)


async def test_status_sums_the_allocations(start_relay: Factory) -> None:
    r = await start_relay()
    await r.allocate(KA, KB)
    await r.allocate(KC, KD)
    await wait_for(lambda: r.service.status()["control"]["notify_acked"] == 2)
    st = r.service.status()
    assert st["running"] is True and len(st["allocations"]) == 2
    assert st["forwarded_packets"] == 0 and st["forwarded_bytes"] == 0 and st["dropped"] == {}
    assert st["control"]["requests"] == {"ALLOCATE": 2}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="per_requester must be at least 1, not 0"):
        RelayService(RELAY, lambda _a: None, lambda _k: None, per_requester=0)
    with pytest.raises(ValueError, match="wildcard"):
        RelayService("0.0.0.0", lambda _a: None, lambda _k: None)
