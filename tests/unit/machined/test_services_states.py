"""Service states, the per-service event ring, and the event bus."""

from __future__ import annotations

import asyncio

import pytest

from machined.services import EventRing, ServiceEvent, ServiceState, SubscriptionLagged
from machined.services.states import EventBus


def ev(seq: int, state: ServiceState = ServiceState.RUNNING) -> ServiceEvent:
    return ServiceEvent(seq, "svc", state, f"m{seq}", 1000.0 + seq)


def test_states_carry_talos_wire_values_and_names():
    # machine.ServiceStateEvent.Action
    assert [(s.name, int(s)) for s in ServiceState] == [
        ("INITIALIZED", 0),
        ("PREPARING", 1),
        ("WAITING", 2),
        ("RUNNING", 3),
        ("STOPPING", 4),
        ("FINISHED", 5),
        ("FAILED", 6),
        ("SKIPPED", 7),
        ("STARTING", 8),
    ]
    assert str(ServiceState.RUNNING) == "Running"
    assert ServiceState.WAITING.active and not ServiceState.FAILED.active
    assert ServiceState.SKIPPED.terminal and not ServiceState.INITIALIZED.terminal


def test_event_ring_is_bounded_and_keeps_the_newest():
    ring = EventRing(3)
    for i in range(1, 6):
        ring.append(ev(i))
    assert [e.seq for e in ring] == [3, 4, 5]
    assert [e.seq for e in ring.tail(2)] == [4, 5]
    assert [e.seq for e in ring.tail(10)] == [3, 4, 5]
    assert ring.tail(0) == ()
    assert ring.last is not None and ring.last.seq == 5


async def test_bus_listeners_and_subscribers_see_every_event_in_order():
    bus = EventBus()
    seen: list[int] = []
    remove = bus.add_listener(lambda e: seen.append(e.seq))
    bus.add_listener(lambda e: 1 / 0)  # a broken listener does not stop the others
    sub = bus.subscribe(backlog=[ev(1)])
    bus.publish(ev(2))
    remove()
    bus.publish(ev(3))
    sub.close()
    got = [e.seq async for e in sub]
    assert got == [1, 2, 3]
    assert seen == [2]


async def test_a_slow_subscriber_is_told_it_lagged():
    bus = EventBus()
    sub = bus.subscribe(maxsize=2)
    for i in range(5):
        bus.publish(ev(i))
    got = []
    with pytest.raises(SubscriptionLagged):
        async with asyncio.timeout(1):
            async for e in sub:
                got.append(e.seq)
    assert got == [0, 1]
