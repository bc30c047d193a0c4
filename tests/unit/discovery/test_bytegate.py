"""ByteGate: FIFO grants, the oversized request, pressure notice, no limit, cancelled waiters."""

from __future__ import annotations

import asyncio

import pytest

from discovery.server.bytegate import ByteGate


async def test_grants_in_order_and_notices_pressure_once() -> None:
    notices: list[int] = []
    g = ByteGate(10, on_wait=lambda: notices.append(1))
    await g.acquire(8)
    second = asyncio.create_task(g.acquire(5))
    third = asyncio.create_task(g.acquire(1))  # would fit, but queues behind "second"
    await asyncio.sleep(0)
    assert g.waiting and notices == [1] and not second.done() and not third.done()
    g.release(8)
    await asyncio.gather(second, third)
    assert g.in_flight == 6 and not g.waiting and g.peak == 8


async def test_oversized_request_passes_when_nothing_is_in_flight() -> None:
    g = ByteGate(10)
    async with g.hold(50):
        assert g.in_flight == 50
    assert g.idle and g.peak == 50


async def test_no_limit_never_waits() -> None:
    g = ByteGate(0, on_wait=lambda: pytest.fail("a gate without limit never queues"))
    for _ in range(3):
        await g.acquire(1000)
    assert g.in_flight == 3000


async def test_cancelled_waiter_leaves_the_queue_and_lets_others_through() -> None:
    g = ByteGate(10)
    await g.acquire(5)
    big = asyncio.create_task(g.acquire(8))
    small = asyncio.create_task(g.acquire(2))  # fits, but queues behind "big"
    await asyncio.sleep(0)
    assert not small.done()
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    await asyncio.wait_for(small, 1)  # granted once the head of the queue left
    g.release(5)
    g.release(2)
    assert g.idle
