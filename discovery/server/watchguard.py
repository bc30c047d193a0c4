"""Bounds on Watch streams: how many there are, from whom, and the bytes they hold in flight.

A Watch stream costs the server little while it is idle (~20 KiB: gRPC call state, a task, a
subscription), but every message the server writes is held in memory until the client reads it:
our serialized copy and grpc-core's, then the kernel's socket buffer. A client that opens streams
and never reads its socket would pin all of that for as long as it keeps the connection open. The
bounds here, used by :meth:`ClusterService.watch`:

* :class:`WatchSlots` caps the open watches in total and per client address (an IPv6 client's
  /64, as one host or site is usually given a whole /64); a watch over a cap is refused with
  RESOURCE_EXHAUSTED;
* :class:`WatchSender` writes one message at a time per stream, each at most
  ``WATCH_CHUNK_BYTES`` or so for snapshots (which are serialized lazily, chunk by chunk), and
  accounts the bytes of every write in flight against one global budget and against the client
  address's share of it: a write that would exceed either waits (first come, first served). A write that does not complete within the stall timeout
  fails with :class:`WriteStalled` (the stream is then ABORTED); while writes are waiting for the
  budget, every write in flight gets at most ``PRESSURE_STALL`` seconds, so streams that stopped
  reading are shed first and cannot starve the readers;
* :class:`RefusalLog` writes at most one line per interval about refused watches, with counts, so
  refusals cannot be turned into a log flood.

Measured with a full cluster (1,024 maximum-size affiliates, a ~4.3 MiB snapshot) and clients that
never read: ~180 KiB of server memory per stream (about two chunks and the stream's state), where
the whole snapshot was queued before (~3.2 MiB per stream, more with a larger client receive
buffer). Chunks of 16 KiB would cut that to ~75 KiB but cost twice the CPU per snapshot.

Connections: grpc-core sets ``TCP_USER_TIMEOUT`` to the keepalive timeout, and Linux (5.11 and
later) applies it to a peer that keeps a zero window too, so the connection of a client that never
reads is closed by the kernel after ``--keepalive-timeout`` whatever the stall timeout; a half-open
one (nothing answers) goes after ``--keepalive-time`` + ``--keepalive-timeout`` (pings, see
``discovery.server.main``). Not bounded here: a client that drains its connection very slowly keeps
the kernel's send buffer and grpc-core's last write (one chunk) after its stream was aborted, until
it disconnects; limit connections per source address in front of the server for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from spanutil.ipcodec import IPAddress
from spanutil.logs import log_event

log = logging.getLogger("discovery.server")

# Snapshot messages are cut at about this size (a message may exceed it by one affiliate, ~4.3 KiB).
WATCH_CHUNK_BYTES = 64 << 10
# While writes wait for the global budget, a write in flight longer than this is abandoned.
PRESSURE_STALL = 2.0


class WriteStalled(Exception):
    """A watch write did not complete in time; ``shed`` when that was under budget pressure."""

    def __init__(self, timeout: float, shed: bool) -> None:
        super().__init__(f"no write progress in {timeout:g} s")
        self.timeout = timeout
        self.shed = shed


def client_key(ip: IPAddress | None) -> str:
    """The per-client counting key: an IPv4 address, an IPv6 /64, or ``"local"`` (no IP peer)."""
    if ip is None:
        return "local"
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class WatchSlots:
    """Open-watch counters: in total and per :func:`client_key`. A limit of 0 means no limit."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self._per: dict[str, int] = {}

    def acquire(self, key: str) -> str | None:
        """Take a slot for ``key``; return None, or why not (``"total"`` / ``"per_ip"``)."""
        if self.max_total and self.total >= self.max_total:
            return "total"
        n = self._per.get(key, 0)
        if self.max_per_client and n >= self.max_per_client:
            return "per_ip"
        self._per[key] = n + 1
        self.total += 1
        return None

    def release(self, key: str) -> None:
        n = self._per.get(key, 0) - 1
        if n > 0:
            self._per[key] = n
        else:
            self._per.pop(key, None)
        self.total -= 1

    def count(self, key: str) -> int:
        return self._per.get(key, 0)


class WatchSender:
    """Writes watch messages under a stall timeout and a global in-flight byte budget.

    ``budget`` 0 means no budget; ``stall_timeout`` 0 means no timeout (writes are then abandoned
    only under budget pressure). ``per_client`` (0: none) caps one client's share of the budget
    with a queue of its own, so one address's streams that never read cannot take the whole
    budget and starve everybody else's watches; a client waiting for its share puts only its own
    writes under pressure. One stream has at most one write in flight (its handler awaits
    each), so the budget also bounds the bytes of the snapshots being produced: a chunk is
    serialized only once its bytes are granted.

    Writes in flight are checked by a sweep every ``period`` seconds (while there are any), not by
    a timer per write: a write is abandoned by cancelling its task, which :meth:`write` turns into
    :class:`WriteStalled`.
    """

    def __init__(
        self,
        budget: int,
        stall_timeout: float,
        pressure_stall: float = PRESSURE_STALL,
        per_client: int = 0,
        snapshots_per_client: int = 0,
    ) -> None:
        self.budget = budget
        self.per_client = per_client
        self.snapshots_per_client = snapshots_per_client
        self._snapshots: dict[str, tuple[asyncio.Semaphore, int]] = {}  # client -> (slots, users)
        self._client_bytes: dict[str, int] = {}
        self._client_waiters: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self.stall_timeout = stall_timeout
        self.pressure_stall = min(pressure_stall, stall_timeout) if stall_timeout > 0 else pressure_stall
        limits = [self.pressure_stall / 4, 1.0] + ([stall_timeout / 4] if stall_timeout > 0 else [])
        self.period = max(0.005, min(limits))
        self.in_flight = 0  # bytes granted and not yet released
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._writes: dict[asyncio.Task[Any], tuple[float, str]] = {}  # task -> (start, client)
        self._marked: dict[asyncio.Task[Any], bool] = {}  # abandoned writes -> under pressure?
        self._sweeper: asyncio.TimerHandle | None = None
        self._pressure = False

    # -- budget ------------------------------------------------------------------------------

    def _fits(self, n: int) -> bool:
        return self.in_flight + n <= self.budget or self.in_flight == 0

    async def _wait(self, n: int) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        if not self._pressure:
            # Budget exhausted with writers waiting: writes in flight get pressure_stall from now on.
            self._pressure = True
            self._sweep()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release(n)  # granted, then cancelled before it could be used
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def _grant(self, n: int) -> None:
        self.in_flight += n
        if self.in_flight > self.peak:
            self.peak = self.in_flight

    def _release(self, n: int) -> None:
        self.in_flight -= n
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self._fits(waiters[0][0]):
            n, fut = waiters.popleft()
            if not fut.done():
                self._grant(n)
                fut.set_result(None)
        if not waiters:
            self._pressure = False

    def _client_fits(self, client: str, n: int) -> bool:
        used = self._client_bytes.get(client, 0)
        return used + n <= self.per_client or used == 0

    async def _client_acquire(self, client: str, n: int) -> None:
        waiters = self._client_waiters.get(client)
        if waiters is None and self._client_fits(client, n):
            self._client_bytes[client] = self._client_bytes.get(client, 0) + n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        if waiters is None:
            waiters = self._client_waiters[client] = deque()
            self._sweep()  # this client's writes in flight are under pressure from now on
        waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._client_release(client, n)
            else:
                waiters.remove(entry)
                self._client_wake(client)
            raise

    def _client_release(self, client: str, n: int) -> None:
        left = self._client_bytes[client] - n
        if left:
            self._client_bytes[client] = left
        else:
            del self._client_bytes[client]
        self._client_wake(client)

    def _client_wake(self, client: str) -> None:
        waiters = self._client_waiters.get(client)
        if waiters is None:
            return
        while waiters and self._client_fits(client, waiters[0][0]):
            n, fut = waiters.popleft()
            if not fut.done():
                self._client_bytes[client] = self._client_bytes.get(client, 0) + n
                fut.set_result(None)
        if not waiters:
            del self._client_waiters[client]

    # -- snapshot slots ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def snapshot_slot(self, client: str) -> AsyncIterator[None]:
        """Hold one of ``client``'s snapshot slots while its snapshot is sent.

        Sending a full cluster's snapshot is the costliest thing a watch asks of the server: a
        burst of watches from one address would have every snapshot serialized at once (CPU that
        delays everybody's calls) and, for clients that never read, a chunk of each pinned in
        grpc-core. With ``snapshots_per_client`` slots the rest wait, cheaply; while they wait,
        that client's writes in flight are under pressure, so a stalled one frees its slot soon.
        """
        if not self.snapshots_per_client:
            yield
            return
        sem, users = self._snapshots.get(client) or (asyncio.Semaphore(self.snapshots_per_client), 0)
        self._snapshots[client] = (sem, users + 1)
        try:
            if sem.locked():
                self._sweep()  # waiting for a slot: this client's writes are under pressure
            async with sem:
                yield
        finally:
            sem, users = self._snapshots[client]
            if users > 1:
                self._snapshots[client] = (sem, users - 1)
            else:
                del self._snapshots[client]

    def _slots_wanted(self, client: str) -> bool:
        entry = self._snapshots.get(client)
        return entry is not None and entry[1] > self.snapshots_per_client

    # -- stall detection -----------------------------------------------------------------------

    def _sweep(self) -> None:
        """Abandon the writes in flight for longer than allowed; re-arm while any are in flight."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if not self._writes:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, (start, client) in self._writes.items():
            pressure = self._pressure or client in self._client_waiters or self._slots_wanted(client)
            limit = self.pressure_stall if pressure else self.stall_timeout
            if limit > 0 and start <= now - limit and task not in self._marked:
                self._marked[task] = pressure
                task.cancel()
        self._sweeper = loop.call_later(self.period, self._sweep)

    # -- writes ------------------------------------------------------------------------------

    async def write(
        self, context: Any, size: int, message: bytes | Callable[[], bytes], client: str = ""
    ) -> None:
        """Write one message of about ``size`` bytes (``message`` may serialize it lazily) for
        ``client`` (a :func:`client_key`).

        Raises :class:`WriteStalled` when the write does not complete in time.
        """
        share = self.per_client and size > 0  # an empty message (an empty snapshot) takes no share
        if share:
            await self._client_acquire(client, size)
        try:
            await self._write(context, size, message, client)
        finally:
            if share:
                self._client_release(client, size)

    async def _write(
        self, context: Any, size: int, message: bytes | Callable[[], bytes], client: str
    ) -> None:
        if self.budget and (self._waiters or not self._fits(size)):
            await self._wait(size)
        else:
            self._grant(size)
        try:
            data = message() if callable(message) else message
            task = asyncio.current_task()
            assert task is not None
            self._writes[task] = (asyncio.get_running_loop().time(), client)
            if self._sweeper is None:
                self._sweep()
            try:
                await context.write(data)
            except asyncio.CancelledError:
                shed = self._marked.pop(task, None)
                if shed is None:
                    raise  # cancelled by someone else (the client went away, shutdown)
                task.uncancel()
                raise WriteStalled(self.pressure_stall if shed else self.stall_timeout, shed) from None
            finally:
                del self._writes[task]
        finally:
            self._release(size)


class RefusalLog:
    """At most one warning line per ``interval`` about refused watches, with counts since the last."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = -float("inf")
        self._counts: dict[str, int] = {}
        self.lines = 0

    def refused(self, reason: str, client: str, limit: int, **fields: Any) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self.interval
        counts, self._counts = self._counts, {}
        self.lines += 1
        log_event(
            log,
            "watch refused: too many watches",
            logging.WARNING,
            reason=reason,
            client=client,
            limit=limit,
            refused_since_last_line=counts,
            log_interval_s=self.interval,
            **fields,
        )
