"""Bounds on Watch streams: how many there are, from whom, and the bytes they hold in flight.

A client that opens streams and never reads would otherwise pin the server's memory: these caps
(open watches in total and per address, bytes in flight in total and per address, snapshot slots,
stall timeouts) keep that bounded, and :class:`RefusalLog` keeps refusals from flooding the log.
The design and its measurements: ``docs/design/watch-bounds.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from discovery.server.bytegate import ByteGate
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
    with a :class:`ByteGate` (a queue) of its own, so one address's streams that never read cannot take the whole
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
        self.per_client = per_client
        self.snapshots_per_client = snapshots_per_client
        self._snapshots: dict[str, tuple[asyncio.Semaphore, int]] = {}  # client -> (slots, users)
        self._clients: dict[str, ByteGate] = {}  # per-client shares, while in use
        self.stall_timeout = stall_timeout
        self.pressure_stall = min(pressure_stall, stall_timeout) if stall_timeout > 0 else pressure_stall
        limits = [self.pressure_stall / 4, 1.0] + ([stall_timeout / 4] if stall_timeout > 0 else [])
        self.period = max(0.005, min(limits))
        # Writes waiting for the global budget put every write in flight under pressure.
        self._gate = ByteGate(budget, on_wait=self._sweep)
        self._writes: dict[asyncio.Task[Any], tuple[float, str]] = {}  # task -> (start, client)
        self._marked: dict[asyncio.Task[Any], bool] = {}  # abandoned writes -> under pressure?
        self._sweeper: asyncio.TimerHandle | None = None

    # -- budget ------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Bytes granted by the global budget and not yet released."""
        return self._gate.in_flight

    @property
    def peak(self) -> int:
        return self._gate.peak

    @property
    def clients_tracked(self) -> int:
        """Client addresses with bytes in flight or writes waiting for their share."""
        return len(self._clients)

    def _under_pressure(self, client: str) -> bool:
        gate = self._clients.get(client)
        return self._gate.waiting or (gate is not None and gate.waiting) or self._slots_wanted(client)

    @contextlib.asynccontextmanager
    async def _client_share(self, client: str, n: int) -> AsyncIterator[None]:
        """Hold ``n`` bytes of ``client``'s share; its gate is dropped once idle."""
        gate = self._clients.get(client)
        if gate is None:
            gate = self._clients[client] = ByteGate(self.per_client, on_wait=self._sweep)
        try:
            async with gate.hold(n):
                yield
        finally:
            if gate.idle:
                del self._clients[client]

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
            pressure = self._under_pressure(client)
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
        if self.per_client and size > 0:  # an empty message (an empty snapshot) takes no share
            async with self._client_share(client, size):
                await self._write(context, size, message, client)
        else:
            await self._write(context, size, message, client)

    async def _write(
        self, context: Any, size: int, message: bytes | Callable[[], bytes], client: str
    ) -> None:
        async with self._gate.hold(size):
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
