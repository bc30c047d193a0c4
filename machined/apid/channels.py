"""apid's cache of channels to other nodes' apid: bounded, idle-expiring, never closing a channel
under a running call.

* At most ``max_size`` cached channels (``--backend-channels``, default 256), least recently used
  first out. An idle channel (no call on it) is preferred as the victim; when every cached channel
  is busy the least recently used one leaves the cache anyway and is closed when its last call ends.
* A cached channel unused for ``idle`` seconds (``--backend-idle``, default 300) is closed by a
  periodic sweep.
* Calls take a channel with :meth:`ChannelCache.lease` and give it back when they end (unary reply
  received, stream finished or cancelled). A channel leaves the cache when evicted, expired or
  replaced (``generation`` changed: the client certificate was renewed); it is closed right away when
  no call uses it, else when the last one returns it. So an in-flight call always finishes on its
  channel, and the channels open at any time are the cached ones plus those still carrying calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from spanutil.logs import log_event

log = logging.getLogger("apid")

DEFAULT_MAX_CHANNELS = 256
DEFAULT_IDLE = 300.0


class _Entry:
    __slots__ = ("channel", "generation", "key", "last_used", "retired", "users")

    def __init__(self, key: str, generation: int, channel: Any, now: float) -> None:
        self.key = key
        self.generation = generation
        self.channel = channel
        self.users = 0
        self.last_used = now
        self.retired = False


class ChannelCache:
    """``factory(key)`` makes a channel (anything with ``async close()``); ``clock`` is monotonic
    seconds (injectable for tests)."""

    def __init__(
        self,
        factory: Callable[[str], Any],
        *,
        max_size: int = DEFAULT_MAX_CHANNELS,
        idle: float = DEFAULT_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError("the channel cache needs room for at least one channel")
        if idle <= 0:
            raise ValueError("the idle expiry must be positive")
        self.factory = factory
        self.max_size = max_size
        self.idle = idle
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._draining: set[_Entry] = set()  # out of the cache, calls still on them
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.opened = self.closed = self.evicted = self.expired = self.replaced = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, int]:
        """``cached`` (≤ max_size), ``draining`` (out of the cache, calls still on them), ``in_use``
        (calls running), and totals: ``opened``, ``closed``, ``evicted``, ``expired``, ``replaced``."""
        return {
            "cached": len(self._entries),
            "draining": len(self._draining),
            "in_use": sum(e.users for e in self._entries.values()) + sum(e.users for e in self._draining),
            "opened": self.opened,
            "closed": self.closed,
            "evicted": self.evicted,
            "expired": self.expired,
            "replaced": self.replaced,
        }

    # -- leases ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, key: str, generation: int = 0) -> Iterator[Any]:
        """The channel for ``key``, held for the ``with`` block (one call)."""
        e = self._acquire(key, generation)
        try:
            yield e.channel
        finally:
            self._release(e)

    def _acquire(self, key: str, generation: int) -> _Entry:
        if self._closed:
            raise RuntimeError("channel cache closed")
        self._start_sweeper()
        now = self.clock()
        e = self._entries.get(key)
        if e is not None and e.generation != generation:
            self._drop(e)  # new client certificate: new calls use a new channel, running ones finish
            self.replaced += 1
            e = None
        if e is None:
            self._make_room()
            e = _Entry(key, generation, self.factory(key), now)
            self.opened += 1
            self._entries[key] = e
        else:
            self._entries.move_to_end(key)
        e.users += 1
        e.last_used = now
        return e

    def _release(self, e: _Entry) -> None:
        e.users -= 1
        e.last_used = self.clock()
        if e.retired:
            if e.users == 0 and e in self._draining:  # (not after aclose: closed already)
                self._draining.discard(e)
                self._close(e)
        elif e.users == 0 and self._entries.get(e.key) is e:
            self._entries.move_to_end(e.key)

    def _make_room(self) -> None:
        while len(self._entries) >= self.max_size:
            victim = next((e for e in self._entries.values() if e.users == 0), None)
            if victim is None:  # every cached channel carries a call: the oldest leaves, closed later
                victim = next(iter(self._entries.values()))
            self._drop(victim)
            self.evicted += 1

    def _drop(self, e: _Entry) -> None:
        """Out of the cache: closed now when unused, else when its last call ends."""
        if self._entries.get(e.key) is e:
            del self._entries[e.key]
        e.retired = True
        if e.users:
            self._draining.add(e)
        else:
            self._close(e)

    # -- expiry ---------------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Close the cached channels no call has used for ``idle`` seconds; how many."""
        cutoff = self.clock() - self.idle
        stale = [e for e in self._entries.values() if e.users == 0 and e.last_used <= cutoff]
        for e in stale:
            self._drop(e)
        self.expired += len(stale)
        return len(stale)

    def _start_sweeper(self) -> None:
        if self._sweeper is not None and not self._sweeper.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous test): sweep() by hand
        self._sweeper = loop.create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        interval = min(max(self.idle / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            if self.sweep():
                log_event(log, "backend channels expired", logging.DEBUG, **self.stats())

    # -- closing --------------------------------------------------------------------------------------

    def _close(self, e: _Entry) -> None:
        self.closed += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: nothing to run the close on (a synchronous test's fake channel)
        task = loop.create_task(self._close_channel(e.channel))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_channel(channel: Any) -> None:
        with contextlib.suppress(Exception):
            await channel.close()

    async def aclose(self) -> None:
        """Close every channel, in use or not (shutdown)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        entries = [*self._entries.values(), *self._draining]
        self._entries.clear()
        self._draining.clear()
        for e in entries:
            e.retired = True
            self._close(e)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
