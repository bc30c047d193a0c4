"""The machine event ring (Talos's ``runtime.Events``): the last 1000 events with sortable ids.

Each event is a protobuf message of ``machine.proto`` (``ServiceStateEvent``,
``ConfigValidationErrorEvent``, ``MachineStatusEvent``, ...) with an xid-style id
(20 characters, base32hex, sortable by time) and an optional actor id. The Events
RPC packs the message into an ``Any`` with type URL ``talos/runtime/<full name>``.

Readers :meth:`subscribe` with Talos's tail options (``tail_events``, ``tail_id``,
``tail_seconds``) and get the backlog, then live events. A reader that falls more
than its queue behind is ended with :class:`EventsLagged`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RING_SIZE = 1000  # Talos keeps 1000
TYPE_URL_PREFIX = "talos/runtime/"

_MACHINE = secrets.token_bytes(3)
_counter = itertools.count(int.from_bytes(secrets.token_bytes(3), "big"))


def xid(now: float | None = None) -> str:
    """A globally unique, time-sortable id in the format of rs/xid (what Talos's events use)."""
    ts = int(time.time() if now is None else now)
    raw = (
        ts.to_bytes(4, "big")
        + _MACHINE
        + (os.getpid() & 0xFFFF).to_bytes(2, "big")
        + (next(_counter) & 0xFFFFFF).to_bytes(3, "big")
    )
    # rs/xid: base32hex ("0-9a-v", in value order: the text sorts as the bytes do), no padding
    return base64.b32hexencode(raw).decode().rstrip("=").lower()


def type_url(message: Any) -> str:
    return TYPE_URL_PREFIX + message.DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)
class MachineEvent:
    id: str
    timestamp: float  # unix time
    message: Any  # a protobuf message (not modified after publishing)
    actor_id: str = ""

    @property
    def type_url(self) -> str:
        return type_url(self.message)


class EventsLagged(Exception):
    """A reader fell too far behind; subscribe again (with ``tail_id``) to resume."""


class EventSubscription:
    def __init__(self, owner: MachineEvents, backlog: list[MachineEvent], maxsize: int) -> None:
        self._owner = owner
        self._q: collections.deque[MachineEvent | None] = collections.deque(backlog)
        self._maxsize = maxsize + len(backlog)
        self._waiter: asyncio.Future[None] | None = None
        self._lagged = False
        self._closed = False

    def _push(self, ev: MachineEvent | None) -> None:
        if self._closed:
            return
        if ev is not None and len(self._q) >= self._maxsize:
            self._lagged = True
            self._q.clear()
            self._q.append(None)
            self._close()
        else:
            self._q.append(ev)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _close(self) -> None:
        self._closed = True
        self._owner._subs.discard(self)

    def close(self) -> None:
        if not self._closed:
            self._close()
            self._q.append(None)
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> MachineEvent:
        while not self._q:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        ev = self._q.popleft()
        if ev is None:
            if self._lagged:
                raise EventsLagged("event reader fell behind; subscribe again with tail_id")
            raise StopAsyncIteration
        return ev

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class MachineEvents:
    """A bounded ring of machine events with subscribers."""

    def __init__(self, size: int = RING_SIZE, *, clock: Callable[[], float] = time.time) -> None:
        self._ring: collections.deque[MachineEvent] = collections.deque(maxlen=size)
        self._subs: set[EventSubscription] = set()
        self._clock = clock

    def publish(self, message: Any, actor_id: str = "") -> MachineEvent:
        now = self._clock()
        ev = MachineEvent(xid(now), now, message, actor_id)
        self._ring.append(ev)
        for s in list(self._subs):
            s._push(ev)
        return ev

    def __len__(self) -> int:
        return len(self._ring)

    def history(
        self, *, tail_events: int = 0, tail_id: str = "", tail_seconds: int = 0, actor_id: str = ""
    ) -> list[MachineEvent]:
        """Talos's tail options: ``tail_events`` (-1: everything kept), events after ``tail_id``,
        or events of the last ``tail_seconds``; the largest selection wins."""
        items = [e for e in self._ring if not actor_id or e.actor_id == actor_id]
        picked: list[MachineEvent] = []
        if tail_events < 0:
            picked = items
        elif tail_events > 0:
            picked = items[-tail_events:]
        if tail_id:
            ids = [e.id for e in items]
            after = items[ids.index(tail_id) + 1 :] if tail_id in ids else items
            picked = after if len(after) > len(picked) else picked
        if tail_seconds > 0:
            since = self._clock() - tail_seconds
            recent = [e for e in items if e.timestamp >= since]
            picked = recent if len(recent) > len(picked) else picked
        return picked

    def subscribe(
        self,
        *,
        tail_events: int = 0,
        tail_id: str = "",
        tail_seconds: int = 0,
        actor_id: str = "",
        maxsize: int = 4096,
    ) -> EventSubscription:
        backlog = self.history(
            tail_events=tail_events, tail_id=tail_id, tail_seconds=tail_seconds, actor_id=actor_id
        )
        sub = EventSubscription(self, backlog, maxsize)
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        for s in list(self._subs):
            s.close()
