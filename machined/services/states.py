"""Service states and the per-service event history (Talos's ``ServiceStateEvent``).

States and their wire values follow Talos's ``machine.ServiceStateEvent.Action`` enum, so the machine API
can send them as-is.  Every state change (and a few same-state notices: health changes, mesh
degradation, dependency loss) is a :class:`ServiceEvent`, kept in a bounded :class:`EventRing` per
service and broadcast to listeners and subscribers through an :class:`EventBus`.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from spanutil.logs import log_event

log = logging.getLogger("machined.services")

EVENT_RING_SIZE = 64  # Talos keeps 64 events per service


class ServiceState(enum.IntEnum):
    """Talos's service states; the integer is the ``ServiceStateEvent.Action`` wire value."""

    INITIALIZED = 0  # defined, never started
    PREPARING = 1  # conditions hold; resolving the command and spawning the process
    WAITING = 2  # waiting for dependencies / the mesh, or for the restart back-off to elapse
    RUNNING = 3  # the process is alive
    STOPPING = 4  # SIGTERM (then SIGKILL) sent to the process group
    FINISHED = 5  # exited with code 0, or stopped on request
    FAILED = 6  # exited non-zero / by a signal, or could not be started
    SKIPPED = 7  # disabled: never runs, counts as "up" for dependents
    STARTING = 8  # start requested; conditions not yet evaluated

    def __str__(self) -> str:
        return self.name.capitalize()

    @property
    def active(self) -> bool:
        """The service's run loop is alive (it will, or does, run a process)."""
        return self in _ACTIVE

    @property
    def terminal(self) -> bool:
        return self in (ServiceState.FINISHED, ServiceState.FAILED, ServiceState.SKIPPED)


_ACTIVE = frozenset(
    {
        ServiceState.STARTING,
        ServiceState.WAITING,
        ServiceState.PREPARING,
        ServiceState.RUNNING,
        ServiceState.STOPPING,
    }
)


class EventKind(enum.StrEnum):
    STATE = "state"  # a state transition (or a new message in the same waiting state)
    HEALTH = "health"  # health changed while running
    MESH_DEGRADED = "mesh-degraded"  # the service's mesh condition stopped holding while it runs
    MESH_RECOVERED = "mesh-recovered"  # ... and holds again
    DEPENDENCY_DOWN = "dependency-down"  # a dependency stopped being up while the service runs
    DEPENDENCY_UP = "dependency-up"


@dataclass(frozen=True, slots=True)
class ServiceEvent:
    seq: int  # supervisor-wide, strictly increasing
    service: str
    state: ServiceState  # the state after the event
    message: str
    timestamp: float  # unix time
    kind: EventKind = EventKind.STATE


class EventRing:
    """The last ``size`` events of one service."""

    def __init__(self, size: int = EVENT_RING_SIZE) -> None:
        if size < 1:
            raise ValueError(f"event ring size must be at least 1, got {size}")
        self._ring: collections.deque[ServiceEvent] = collections.deque(maxlen=size)

    def append(self, ev: ServiceEvent) -> None:
        self._ring.append(ev)

    def __len__(self) -> int:
        return len(self._ring)

    def __iter__(self) -> Iterator[ServiceEvent]:
        return iter(tuple(self._ring))

    def tail(self, n: int | None = None) -> tuple[ServiceEvent, ...]:
        """The last ``n`` events, oldest first (all of them when ``n`` is None)."""
        items = tuple(self._ring)
        if n is None:
            return items
        return items[len(items) - n :] if 0 < n < len(items) else (items if n > 0 else ())

    @property
    def last(self) -> ServiceEvent | None:
        return self._ring[-1] if self._ring else None


class SubscriptionLagged(Exception):
    """A subscriber fell more than its queue size behind; resubscribe (with a tail) to resynchronise."""


class Subscription:
    """An async iterator of events; ``close()`` (or leaving ``async with``) ends it."""

    def __init__(self, bus: EventBus, backlog: Iterable[ServiceEvent], maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[ServiceEvent | None] = asyncio.Queue()
        self._maxsize = maxsize
        self._lagged = False
        for ev in backlog:
            self._queue.put_nowait(ev)

    def _push(self, ev: ServiceEvent) -> None:
        if self._lagged:
            return
        if self._queue.qsize() >= self._maxsize:
            self._lagged = True
            self._queue.put_nowait(None)
            self._bus._subs.discard(self)
            return
        self._queue.put_nowait(ev)

    def close(self) -> None:
        if self in self._bus._subs:
            self._bus._subs.discard(self)
            self._queue.put_nowait(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ServiceEvent:
        ev = await self._queue.get()
        if ev is None:
            if self._lagged:
                raise SubscriptionLagged(f"subscriber fell more than {self._maxsize} events behind")
            raise StopAsyncIteration
        return ev

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


Listener = Callable[[ServiceEvent], None]


class EventBus:
    """Fan-out of service events: synchronous listeners (called inline, errors logged) and queued
    subscribers (bounded; a subscriber that falls behind gets :class:`SubscriptionLagged`)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._subs: set[Subscription] = set()

    def add_listener(self, fn: Listener) -> Callable[[], None]:
        self._listeners.append(fn)

        def remove() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return remove

    def subscribe(self, backlog: Iterable[ServiceEvent] = (), maxsize: int = 4096) -> Subscription:
        sub = Subscription(self, backlog, maxsize)
        self._subs.add(sub)
        return sub

    def publish(self, ev: ServiceEvent) -> None:
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception as e:
                log_event(log, "service event listener failed", logging.ERROR, error=repr(e))
        for sub in list(self._subs):
            sub._push(ev)

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()
