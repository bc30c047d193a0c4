"""The machine event ring (xid ids, Talos's tail options, lagging readers) and machined's own log rings."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading

import pytest

from machined.daemon import events as events_mod
from machined.daemon.events import EventsLagged, MachineEvents, xid
from machined.daemon.logcapture import CONTROLLER_RUNTIME, MACHINED, RingHandler, make_rings
from spanapi.talos.machine import machine_pb2


def ev(text: str) -> machine_pb2.ConfigValidationErrorEvent:
    return machine_pb2.ConfigValidationErrorEvent(error=text)


def test_xids_are_20_base32hex_chars_and_sort_by_time():
    a, b = xid(1_700_000_000), xid(1_700_000_001)
    assert re.fullmatch(r"[0-9a-v]{20}", a) and a < b
    assert len({xid() for _ in range(1000)}) == 1000


def test_xids_sort_in_the_order_they_were_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # every value of the last characters within one second (the alphabet was once out of value order:
    # "...hhvq" sorted after "...hh0a", the id made after it; a machined unit test caught it by chance)
    monkeypatch.setattr(events_mod, "_counter", itertools.count(0))
    ids = [xid(1_700_000_000) for _ in range(2048)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_xid_text_is_rs_xids(monkeypatch: pytest.MonkeyPatch) -> None:
    # rs/xid's documented example: these 12 bytes are "9m4e2mr0ui3e8a215n4g"
    monkeypatch.setattr(events_mod, "_MACHINE", bytes([0x60, 0xF4, 0x86]))
    monkeypatch.setattr(events_mod.os, "getpid", lambda: 0xE428)
    monkeypatch.setattr(events_mod, "_counter", itertools.count(0x412DC9))
    assert xid(0x4D88E15B) == "9m4e2mr0ui3e8a215n4g"


def test_history_tail_options():
    now = [1000.0]
    events = MachineEvents(size=5, clock=lambda: now[0])
    ids = []
    for i in range(7):
        now[0] += 10
        ids.append(events.publish(ev(str(i)), actor_id="a" if i == 6 else "").id)
    assert len(events) == 5  # the ring keeps the last 5
    msgs = lambda evs: [e.message.error for e in evs]  # noqa: E731
    assert msgs(events.history()) == []
    assert msgs(events.history(tail_events=2)) == ["5", "6"]
    assert msgs(events.history(tail_events=-1)) == ["2", "3", "4", "5", "6"]
    assert msgs(events.history(tail_id=ids[4])) == ["5", "6"]
    assert msgs(events.history(tail_id="unknown")) == ["2", "3", "4", "5", "6"]
    assert msgs(events.history(tail_seconds=25)) == ["4", "5", "6"]  # at 1050, 1060, 1070
    assert msgs(events.history(tail_events=-1, actor_id="a")) == ["6"]
    assert events.history(tail_events=1)[0].type_url == "talos/runtime/machine.ConfigValidationErrorEvent"


async def test_subscribers_get_backlog_then_live_and_a_slow_one_is_ended():
    events = MachineEvents()
    events.publish(ev("old"))
    sub = events.subscribe(tail_events=1)
    events.publish(ev("new"))
    got = [await anext(sub), await anext(sub)]
    assert [g.message.error for g in got] == ["old", "new"]
    slow = events.subscribe(maxsize=3)
    for i in range(5):
        events.publish(ev(str(i)))
    with pytest.raises(EventsLagged):
        async with asyncio.timeout(1):
            async for _ in slow:
                pass
    events.close()
    with pytest.raises(StopAsyncIteration):
        while True:
            await anext(sub)


async def test_log_records_go_to_the_ring_of_their_id_also_from_threads():
    rings = make_rings()
    h = RingHandler(rings, asyncio.get_running_loop())
    lg = logging.getLogger("machined.test.capture")
    lg.addHandler(h)
    cr = logging.getLogger("controller-runtime.x")
    cr.addHandler(h)
    try:
        lg.error("from the loop")
        cr.error("a controller")
        t = threading.Thread(target=lambda: lg.error("from a thread"))
        t.start()
        t.join()
        await asyncio.sleep(0.01)
    finally:
        lg.removeHandler(h)
        cr.removeHandler(h)
    machined = [line.text for line in rings[MACHINED].tail()]
    assert ['"msg":"from the loop"' in machined[0], '"msg":"from a thread"' in machined[1]] == [True, True]
    assert all(line.stream == "stderr" for line in rings[MACHINED].tail())
    [only] = rings[CONTROLLER_RUNTIME].tail()
    assert '"logger":"controller-runtime.x"' in only.text
