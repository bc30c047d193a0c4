"""Watch events and the per-watcher queue.

A :class:`Watch` is an async iterator over :class:`Event`. Writers append to
its queue synchronously and never wait for it. The queue is bounded: when a
watcher has ``queue_size`` undelivered events and another one arrives, the
backlog is dropped, a single ERRORED event is queued and the watch is closed
(the iterator ends after yielding it). The watcher has lost events and must
watch again (with bootstrap) to resynchronise - the same contract as COSI's
"buffer overrun". Bootstrap events do not count against the bound.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .resource import Resource


class EventType(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    DESTROYED = "destroyed"
    BOOTSTRAPPED = "bootstrapped"
    ERRORED = "errored"


class Event:
    """One watch event.

    ``resource`` is the new state (CREATED, UPDATED) or the last state
    (DESTROYED); ``old`` is the previous state for UPDATED. Both are shared
    snapshots: do not modify them (``resource.copy()`` first). BOOTSTRAPPED
    and ERRORED carry no resource; ERRORED carries ``error``.
    """

    __slots__ = ("error", "old", "resource", "type")

    def __init__(
        self,
        type: EventType,
        resource: Resource | None = None,
        old: Resource | None = None,
        error: str | None = None,
    ) -> None:
        self.type = type
        self.resource = resource
        self.old = old
        self.error = error

    @property
    def id(self) -> str | None:
        return None if self.resource is None else self.resource.metadata.id

    def __repr__(self) -> str:
        if self.resource is None:
            return f"Event({self.type.name}{', ' + repr(self.error) if self.error else ''})"
        md = self.resource.metadata
        return f"Event({self.type.name} {md.namespace}/{md.type}/{md.id} v{md.version})"


_BOOTSTRAPPED = Event(EventType.BOOTSTRAPPED)


class Watch:
    """Async iterator of events for one ``(namespace, type[, id])``; also an async context manager.

    Close it (``async with`` / ``aclose()``) when done: an abandoned watch
    stays registered until it overflows.
    """

    __slots__ = (
        "_boot_left",
        "_closed",
        "_detach",
        "_id",
        "_limit",
        "_q",
        "_size",
        "_waiter",
        "namespace",
        "type",
    )

    def __init__(
        self,
        namespace: str,
        type: str,
        id: str | None,
        queue_size: int,
        initial: list[Event],
        detach: Callable[[Watch], None],
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"watch queue_size must be >= 1, got {queue_size}")
        self.namespace = namespace
        self.type = type
        self._id = id
        self._q: deque[Event] = deque(initial)
        self._boot_left = len(initial)
        self._size = queue_size
        self._limit = queue_size + len(initial)
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._detach = detach

    @property
    def id(self) -> str | None:
        return self._id

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        """Events queued and not yet delivered."""
        return len(self._q)

    # --- writer side (synchronous, never blocks) ---

    def _push(self, ev: Event) -> None:
        if self._closed:
            return
        if len(self._q) >= self._limit:
            lost = len(self._q) - self._boot_left
            self._q.clear()
            self._boot_left = 0
            self._q.append(
                Event(
                    EventType.ERRORED,
                    error=(
                        f"watch of {self.namespace}/{self.type} fell behind: {lost} events undelivered "
                        f"(queue size {self._size}); watch closed, watch again with bootstrap to resync"
                    ),
                )
            )
            self._close()
        else:
            self._q.append(ev)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._detach(self)

    # --- reader side ---

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Event:
        q = self._q
        while not q:
            if self._closed:
                raise StopAsyncIteration
            fut = asyncio.get_running_loop().create_future()
            self._waiter = fut
            try:
                await fut
            finally:
                self._waiter = None
        ev = q.popleft()
        if self._boot_left:
            self._boot_left -= 1
            self._limit -= 1
        return ev

    def close(self) -> None:
        """Stop the watch now; undelivered events are dropped."""
        self._q.clear()
        self._boot_left = 0
        self._close()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
