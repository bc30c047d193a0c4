"""Watch: bootstrap-then-events ordering, id filters, slow watchers, and a replay property."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from machined.state import EventType, Resource, State

NS, T = "test", "Things.test.dev"


def thing(id: str, v: int = 0) -> Resource:
    return Resource.new(NS, T, id, {"v": v})


def summary(evs) -> list[tuple]:
    return [(e.type.name, e.id, e.resource.spec["v"] if e.resource else None) for e in evs]


async def take(w, n: int) -> list:
    async with asyncio.timeout(2):
        return [await anext(w) for _ in range(n)]


async def test_bootstrap_then_events_in_order():
    s = State()
    await s.create(thing("b", 1), owner="c")
    await s.create(thing("a", 2), owner="c")
    await s.create(Resource.new(NS, "Other.test.dev", "z", {"v": 0}), owner="c")
    w = s.watch(NS, T)
    # changes made after watch() and before the first read are not lost, and come after BOOTSTRAPPED
    r = await s.get(NS, T, "a")
    r.spec["v"] = 3
    await s.update(r, owner="c")
    await s.create(thing("c", 4), owner="c")
    await s.destroy(NS, T, "b", owner="c")
    evs = await take(w, 6)
    assert summary(evs) == [
        ("CREATED", "a", 2),
        ("CREATED", "b", 1),
        ("BOOTSTRAPPED", None, None),
        ("UPDATED", "a", 3),
        ("CREATED", "c", 4),
        ("DESTROYED", "b", 1),
    ]
    assert evs[3].old.spec == {"v": 2} and evs[3].old.version == 1 and evs[3].resource.version == 2
    assert w.pending() == 0


async def test_watch_wakes_a_waiting_reader():
    s = State()
    w = s.watch(NS, T, bootstrap=False)
    reader = asyncio.create_task(take(w, 2))
    await asyncio.sleep(0.01)
    assert not reader.done()
    await s.create(thing("a"), owner="c")
    await s.create(thing("b"), owner="c")
    assert summary(await reader) == [("CREATED", "a", 0), ("CREATED", "b", 0)]


async def test_watch_one_id_and_without_bootstrap():
    s = State()
    await s.create(thing("a"), owner="c")
    await s.create(thing("b"), owner="c")
    one = s.watch(NS, T, "b")
    absent = s.watch(NS, T, "x")
    live = s.watch(NS, T, bootstrap=False)
    for id in ("a", "b"):
        r = await s.get(NS, T, id)
        r.spec["v"] = 1
        await s.update(r, owner="c")
    await s.create(thing("x"), owner="c")
    assert summary(await take(one, 3)) == [
        ("CREATED", "b", 0),
        ("BOOTSTRAPPED", None, None),
        ("UPDATED", "b", 1),
    ]
    assert summary(await take(absent, 2)) == [("BOOTSTRAPPED", None, None), ("CREATED", "x", 0)]
    assert summary(await take(live, 3)) == [("UPDATED", "a", 1), ("UPDATED", "b", 1), ("CREATED", "x", 0)]
    assert one.pending() == absent.pending() == live.pending() == 0


async def test_slow_watcher_gets_errored_and_is_closed_without_blocking_the_writer():
    s = State()
    slow = s.watch(NS, T, bootstrap=False, queue_size=3)
    fast = s.watch(NS, T, bootstrap=False, queue_size=100)
    r = thing("a")
    await s.create(r, owner="c")
    for i in range(1, 10):  # the writer never suspends, so nobody reads meanwhile
        r.spec["v"] = i
        await s.update(r, owner="c")
    assert (await s.get(NS, T, "a")).version == 10  # every write went through
    assert slow.closed and s.watcher_count(NS, T) == 1
    evs = [e async for e in slow]  # only the ERRORED event, then the iterator ends
    assert [e.type for e in evs] == [EventType.ERRORED]
    assert "fell behind" in evs[0].error and "queue size 3" in evs[0].error
    got = await take(fast, 10)
    assert [e.resource.spec["v"] for e in got] == list(range(10))


async def test_bootstrap_does_not_count_against_the_bound():
    s = State()
    for i in range(20):
        await s.create(thing(f"r{i:02d}"), owner="c")
    w = s.watch(NS, T, queue_size=2)
    await s.create(thing("new1"), owner="c")
    await s.create(thing("new2"), owner="c")
    evs = await take(w, 23)
    assert not w.closed and [e.type for e in evs[20:]] == [
        EventType.BOOTSTRAPPED,
        EventType.CREATED,
        EventType.CREATED,
    ]
    # once the bootstrap is consumed, the bound is the queue size again
    for i in range(3):
        await s.create(thing(f"more{i}"), owner="c")
    assert w.closed


async def test_closing_a_watch_detaches_and_ends_a_waiting_reader():
    s = State()
    async with s.watch(NS, T) as w:
        assert s.watcher_count(NS, T) == 1
        assert (await anext(w)).type is EventType.BOOTSTRAPPED
        reader = asyncio.create_task(take(w, 1))
        await asyncio.sleep(0)
    assert s.watcher_count(NS, T) == 0
    await asyncio.wait_for(asyncio.gather(reader, return_exceptions=True), 1)
    assert isinstance(reader.exception(), StopAsyncIteration)
    await s.create(thing("a"), owner="c")  # nothing queued to a closed watch
    assert w.pending() == 0


ops = st.lists(
    st.tuples(st.sampled_from(["create", "update", "destroy"]), st.sampled_from("abcd"), st.integers(0, 3)),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(before=ops, after=ops)
def test_replaying_a_watch_reconstructs_the_state(before, after):
    """Whatever the writes, bootstrap + events applied to a dict give exactly the final state."""

    async def run() -> None:
        s = State()

        async def apply(seq) -> None:
            for op, id, v in seq:
                cur = await s.find(NS, T, id)
                if op == "create" and cur is None:
                    await s.create(thing(id, v), owner="c")
                elif op == "update" and cur is not None:
                    cur.spec["v"] = v
                    await s.update(cur, owner="c")
                elif op == "destroy" and cur is not None:
                    await s.destroy(NS, T, id, owner="c")

        await apply(before)
        w = s.watch(NS, T, queue_size=1000)
        await apply(after)
        model: dict[str, tuple[int, dict]] = {}
        while w.pending():
            ev = await anext(w)
            if ev.type in (EventType.CREATED, EventType.UPDATED):
                prev = model.get(ev.id)
                assert prev is None or ev.resource.version == prev[0] + 1  # no gaps, no repeats
                model[ev.id] = (ev.resource.version, ev.resource.spec)
            elif ev.type is EventType.DESTROYED:
                del model[ev.id]
        final = {r.id: (r.version, r.spec) for r in await s.list(NS, T)}
        assert model == final

    asyncio.run(run())
