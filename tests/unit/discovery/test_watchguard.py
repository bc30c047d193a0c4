"""Watch bounds (discovery/server/watchguard.py) and the lazy Watch message producers of service.py."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os

import pytest

from discovery.limits import Limits
from discovery.server.service import change_chunks, change_messages, snapshot_chunks, snapshot_messages
from discovery.server.state import AffiliateView, Change, Registry, change_size
from discovery.server.watchguard import RefusalLog, WatchSender, WatchSlots, WriteStalled, client_key
from spanapi.discovery.server import cluster_pb2 as pb

# ---------------------------------------------------------------------------- slots


def test_client_key_groups_ipv6_by_64() -> None:
    v4 = ipaddress.ip_address("203.0.113.7")
    a = ipaddress.ip_address("2001:db8:1:2::1")
    b = ipaddress.ip_address("2001:db8:1:2:ffff::9")
    c = ipaddress.ip_address("2001:db8:1:3::1")
    assert client_key(v4) == "203.0.113.7"
    assert client_key(a) == client_key(b) == "2001:db8:1:2::/64"
    assert client_key(c) != client_key(a)
    assert client_key(None) == "local"


def test_slots_per_client_and_total() -> None:
    s = WatchSlots(max_total=5, max_per_client=3)
    assert [s.acquire("a") for _ in range(3)] == [None, None, None]
    assert s.acquire("a") == "per_ip"
    assert s.acquire("b") is None and s.acquire("b") is None
    assert s.acquire("c") == "total"  # 5 open
    s.release("a")
    assert s.count("a") == 2 and s.total == 4
    assert s.acquire("c") is None
    for k in ("a", "a", "b", "b", "c"):
        s.release(k)
    assert s.total == 0 and s.count("a") == 0


def test_slots_zero_means_unlimited() -> None:
    s = WatchSlots(0, 0)
    assert all(s.acquire("x") is None for _ in range(10_000))


# ---------------------------------------------------------------------------- refusal log


def test_refusal_log_is_rate_bounded(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RefusalLog(10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="discovery.server"):
        for i in range(10_000):
            now[0] = i * 0.001  # 10 s of refusals, 1,000 per second
            rl.refused("per_ip", "192.0.2.1", 1024)
        assert rl.lines == 1
        now[0] = 10.5
        rl.refused("total", "192.0.2.2", 20_000)
    assert rl.lines == 2
    lines = [r for r in caplog.records if r.getMessage().startswith("watch refused")]
    assert len(lines) == 2
    fields = lines[1]._fields  # type: ignore[attr-defined]
    assert fields["refused_since_last_line"] == {"per_ip": 9_999, "total": 1}


# ---------------------------------------------------------------------------- sender


class FakeContext:
    """A servicer context whose writes complete when the test says so (``stuck``: never)."""

    def __init__(self, stuck: bool = False) -> None:
        self.stuck = stuck
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        if self.stuck:
            await asyncio.Event().wait()
        self.written.append(data)


async def test_write_completes_and_releases() -> None:
    s = WatchSender(budget=1000, stall_timeout=1.0)
    ctx = FakeContext()
    await s.write(ctx, 3, b"abc")
    await s.write(ctx, 2, lambda: b"de")  # serialized lazily
    assert ctx.written == [b"abc", b"de"]
    assert s.in_flight == 0 and s.peak == 3


async def test_stalled_write_times_out_and_releases() -> None:
    s = WatchSender(budget=1000, stall_timeout=0.05)
    with pytest.raises(WriteStalled) as ei:
        await s.write(FakeContext(stuck=True), 100, b"x" * 100)
    assert not ei.value.shed and "0.05" in str(ei.value)
    assert s.in_flight == 0


async def test_budget_is_fifo_and_allows_one_oversized_write() -> None:
    s = WatchSender(budget=100, stall_timeout=5.0)
    gate = asyncio.Event()
    order: list[str] = []

    class Gated(FakeContext):
        async def write(self, data: bytes) -> None:
            await gate.wait()
            order.append(data.decode())

    ctx = Gated()
    first = asyncio.create_task(s.write(ctx, 80, b"first"))
    await asyncio.sleep(0)
    assert s.in_flight == 80
    second = asyncio.create_task(s.write(ctx, 50, b"second"))
    third = asyncio.create_task(s.write(ctx, 10, b"third"))  # fits, but waits behind "second"
    await asyncio.sleep(0)
    assert s.in_flight == 80
    gate.set()
    await asyncio.gather(first, second, third)
    assert order == ["first", "second", "third"]
    # larger than the whole budget: granted when nothing else is in flight
    await s.write(FakeContext(), 500, b"big")
    assert s.in_flight == 0 and s.peak == 500


async def test_pressure_sheds_a_stalled_writer_for_a_waiting_reader() -> None:
    s = WatchSender(budget=100, stall_timeout=30.0, pressure_stall=0.05)
    stalled = asyncio.create_task(s.write(FakeContext(stuck=True), 100, b"x" * 100))
    await asyncio.sleep(0.1)  # in flight for longer than pressure_stall, but well under stall_timeout
    reader = FakeContext()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(s.write(reader, 60, b"y" * 60), 5)
    assert loop.time() - t0 < 1.0  # shed at once: it had already been in flight for 0.1 s
    assert reader.written == [b"y" * 60]
    with pytest.raises(WriteStalled) as ei:
        await stalled
    assert ei.value.shed
    assert s.in_flight == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    s = WatchSender(budget=10, stall_timeout=30.0, pressure_stall=30.0)
    gate = asyncio.Event()

    class Gated(FakeContext):
        async def write(self, data: bytes) -> None:
            await gate.wait()

    holder = asyncio.create_task(s.write(Gated(), 10, b"a"))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(s.write(FakeContext(), 5, b"b"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.set()
    await holder
    assert s.in_flight == 0
    await s.write(FakeContext(), 10, b"c")


async def test_one_client_cannot_take_the_whole_budget() -> None:
    # global budget 100, a client's share 30: a client that never reads holds at most 30 and
    # the rest of its writes wait in its own queue, while another client's write goes through.
    s = WatchSender(budget=100, stall_timeout=30.0, pressure_stall=30.0, per_client=30)
    evil = [asyncio.create_task(s.write(FakeContext(stuck=True), 10, b"e" * 10, "evil")) for _ in range(8)]
    await asyncio.sleep(0.01)
    assert s.in_flight == 30
    good = FakeContext()
    await asyncio.wait_for(s.write(good, 60, b"g" * 60, "good"), 1)
    assert good.written == [b"g" * 60]
    for t in evil:
        t.cancel()
    await asyncio.gather(*evil, return_exceptions=True)
    assert s.in_flight == 0 and s.clients_tracked == 0


async def test_empty_messages_take_no_share() -> None:
    s = WatchSender(budget=100, stall_timeout=30.0, per_client=30)
    await asyncio.gather(*(s.write(FakeContext(), 0, b"", "c") for _ in range(5)))
    await s.write(FakeContext(), 10, b"x" * 10, "c")
    assert s.in_flight == 0 and s.clients_tracked == 0


async def test_client_waiting_for_its_share_sheds_only_its_own_stalled_writes() -> None:
    s = WatchSender(budget=1000, stall_timeout=30.0, pressure_stall=0.05, per_client=20)
    other = asyncio.create_task(s.write(FakeContext(stuck=True), 10, b"o" * 10, "other"))
    stalled = asyncio.create_task(s.write(FakeContext(stuck=True), 20, b"x" * 20, "evil"))
    await asyncio.sleep(0.1)
    reader = FakeContext()
    await asyncio.wait_for(s.write(reader, 20, b"y" * 20, "evil"), 2)  # waits for evil's share
    assert reader.written == [b"y" * 20]
    with pytest.raises(WriteStalled) as ei:
        await stalled
    assert ei.value.shed
    assert not other.done()  # the other client was under no pressure: its write is still in flight
    other.cancel()
    await asyncio.gather(other, return_exceptions=True)
    assert s.in_flight == 0


async def test_snapshot_slots_per_client() -> None:
    s = WatchSender(budget=0, stall_timeout=30.0, pressure_stall=30.0, snapshots_per_client=2)
    gate = asyncio.Event()
    inside: list[str] = []

    async def snapshot(client: str, name: str) -> None:
        async with s.snapshot_slot(client):
            inside.append(name)
            await gate.wait()

    evil = [asyncio.create_task(snapshot("evil", f"e{i}")) for i in range(3)]
    good = asyncio.create_task(snapshot("good", "g"))
    await asyncio.sleep(0.01)
    assert sorted(inside) == ["e0", "e1", "g"]  # the third of one client waits, other clients do not
    gate.set()
    await asyncio.gather(*evil, good)
    assert inside[-1] == "e2" and not s._snapshots


async def test_waiting_for_a_snapshot_slot_sheds_the_clients_stalled_snapshot() -> None:
    s = WatchSender(budget=0, stall_timeout=30.0, pressure_stall=0.05, snapshots_per_client=1)

    async def stalled() -> None:
        async with s.snapshot_slot("evil"):
            await s.write(FakeContext(stuck=True), 10, b"x" * 10, "evil")

    first = asyncio.create_task(stalled())
    await asyncio.sleep(0.1)
    reader = FakeContext()

    async def second() -> None:
        async with s.snapshot_slot("evil"):
            await s.write(reader, 10, b"y" * 10, "evil")

    await asyncio.wait_for(second(), 2)  # the stalled holder was shed, freeing the slot
    assert reader.written == [b"y" * 10]
    with pytest.raises(WriteStalled) as ei:
        await first
    assert ei.value.shed


# ---------------------------------------------------------------------------- lazy messages


def view(i: int, data: int = 2048, eps: int = 64) -> AffiliateView:
    return AffiliateView(f"node-{i}", os.urandom(data), tuple(os.urandom(32) for _ in range(eps)))


def test_snapshot_chunks_are_bounded_lazy_and_complete() -> None:
    views = [view(i) for i in range(1024)]
    limit = 64 << 10
    gen = snapshot_chunks(views, limit)
    assert iter(gen) is gen  # a generator: nothing is serialized up front
    seen: list[str] = []
    total = 0
    for bound, serialize in gen:
        raw = serialize()
        assert len(raw) <= bound  # the size the budget is charged is an upper bound
        assert bound <= limit + 4_500  # one affiliate may overshoot the limit
        msg = pb.WatchResponse.FromString(raw)
        assert not msg.deleted
        seen += [a.id for a in msg.affiliates]
        total += len(raw)
    assert seen == [v.id for v in views]
    assert total > 4 << 20  # a full cluster of maximum affiliates: ~4.3 MiB in ~70 messages


def test_empty_snapshot_is_one_empty_message() -> None:
    assert snapshot_messages([]) == [b""]
    assert [pb.WatchResponse.FromString(m) for m in snapshot_messages([])] == [pb.WatchResponse()]


def test_change_chunks_batch_runs_and_cut_large_runs() -> None:
    ups = [Change(v.id, v) for v in (view(i) for i in range(40))]
    dels = [Change(f"gone-{i}", None) for i in range(3)]
    chunks = change_chunks([*ups[:20], *dels, *ups[20:]], limit=32 << 10)
    msgs = [pb.WatchResponse.FromString(m if isinstance(m, bytes) else m()) for _, m in chunks]
    assert [a.id for m in msgs for a in m.affiliates] == [
        *(c.id for c in ups[:20]),
        *(c.id for c in dels),
        *(c.id for c in ups[20:]),
    ]
    assert [m.deleted for m in msgs].count(True) == 1
    for (bound, _), msg in zip(chunks, msgs, strict=True):
        assert len(msg.SerializeToString()) <= bound
    assert all(b <= (32 << 10) + 4_500 for b, _ in chunks)


def test_lone_change_is_serialized_once() -> None:
    c = Change("a", view(1, 100, 2))
    first = change_messages([c])[0]
    assert c.wire is first
    assert change_chunks([c]) == [(len(first), first)]


# ---------------------------------------------------------------------------- per-watcher byte cap


def test_watcher_over_byte_cap_is_lost() -> None:
    reg = Registry(Limits(watch_buffer=1000, watch_buffer_bytes=20_000))
    slow = reg.subscribe("c")
    fast = reg.subscribe("c")
    size = change_size(Change("a", view(0, 2048, 0)))
    n = 20_000 // size
    for i in range(n):
        reg.update("c", f"a{i}", os.urandom(2048), [], 60)
        fast.drain()
    assert not slow.lost and slow.pending == n
    reg.update("c", "one-more", os.urandom(2048), [], 60)
    assert slow.lost and not fast.lost
    assert reg.stats()[3] == 1
