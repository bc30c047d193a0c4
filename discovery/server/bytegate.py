"""A first-come-first-served byte budget for writes in flight.

The Watch sender holds one for the whole server and one per client address (see
``docs/design/watch-bounds.md``): the same rule for both, so it is written once here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable


class ByteGate:
    """Grants byte counts up to ``limit`` in flight, in arrival order; 0 means no limit.

    One request larger than the whole limit is granted when nothing else is in flight, so an
    oversized message cannot wait forever. ``on_wait`` is called when a request is the first to
    queue (the gate comes under pressure); :attr:`waiting` tells whether it still is.
    """

    def __init__(self, limit: int, on_wait: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.in_flight = 0  # bytes granted and not yet released
        self.peak = 0
        self._on_wait = on_wait
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> bool:
        """Requests are queued: the gate is under pressure."""
        return bool(self._waiters)

    @property
    def idle(self) -> bool:
        """Nothing granted and nothing queued."""
        return self.in_flight == 0 and not self._waiters

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        """Hold ``n`` bytes of the budget for the body of the ``async with``."""
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes are granted (behind every earlier request)."""
        if not self.limit or (not self._waiters and self._fits(n)):
            self._grant(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        if len(self._waiters) == 1 and self._on_wait is not None:
            self._on_wait()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted, then cancelled before it could be used
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, n: int) -> None:
        """Give back ``n`` granted bytes and grant the requests that now fit, in order."""
        self.in_flight -= n
        if self._waiters:
            self._wake()

    def _fits(self, n: int) -> bool:
        return self.in_flight + n <= self.limit or self.in_flight == 0

    def _grant(self, n: int) -> None:
        self.in_flight += n
        if self.in_flight > self.peak:
            self.peak = self.in_flight

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self._fits(waiters[0][0]):
            n, fut = waiters.popleft()
            if not fut.done():
                self._grant(n)
                fut.set_result(None)
