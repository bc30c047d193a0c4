"""The relay forwarder: non-blocking UDP sockets on the asyncio loop around
:class:`~kubespan.relay.allocation.Allocation`.

Each allocation owns two UDP ports on the relay (leg A for node A, leg B for node B). A datagram that
the allocation accepts on one leg leaves through the other leg's socket, unchanged: the relay adds no
header and holds no session keys, so WireGuard stays end to end. Idle allocations expire; the number of
allocations and the relay-wide rate are bounded. Lifecycle: ``start()`` (or ``async with``), then
``allocate``/``release``, then ``close()``, which releases every allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

from kubespan.relay.allocation import Addr, Allocation, Budget, Limits
from kubespan.wireguard.types import PublicKey
from spanutil.logs import log_event

log = logging.getLogger("kubespan.relay")

SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux; not in the socket module


class RelayError(Exception):
    """An allocation cannot be made (relay full, no free port, relay not running)."""


@dataclass(frozen=True)
class RelayLimits:
    """Limits of the whole relay; a rate of 0 means unlimited."""

    max_allocations: int = 256
    packet_rate: float = 0.0
    packet_burst: float = 0.0
    byte_rate: float = 0.0
    byte_burst: float = 0.0

    def __post_init__(self) -> None:
        if self.max_allocations < 1:
            raise ValueError(f"max_allocations must be at least 1, not {self.max_allocations}")


_BATCH = 256  # datagrams read per wake-up of one socket before the event loop gets a turn
_MAX_DATAGRAM = 65535


class _Slot:
    """An allocation with its two non-blocking UDP sockets, read straight from the event loop's selector:
    one wake-up drains up to ``_BATCH`` datagrams, and each accepted one is sent at once (a full send
    buffer drops it, as a router would)."""

    def __init__(self, allocation: Allocation, clock: Callable[[], float]) -> None:
        self.allocation = allocation
        self.clock = clock
        self.socks: list[socket.socket | None] = [None, None]
        self.ports = (0, 0)
        self.recv_errors = 0
        self._buf = bytearray(_MAX_DATAGRAM)
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, leg: int, sock: socket.socket) -> None:
        self._loop = loop
        self.socks[leg] = sock
        loop.add_reader(sock.fileno(), self.on_readable, leg)

    def on_readable(self, leg: int) -> None:
        sock, out = self.socks[leg], self.socks[1 - leg]
        if sock is None:
            return
        alloc = self.allocation
        now = self.clock()
        buf = self._buf
        view = memoryview(buf)
        for _ in range(_BATCH):
            try:
                size, src = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.recv_errors += 1  # e.g. a queued ICMP error
                continue
            data = view[:size]  # no copy: sent on (or dropped) before the next read reuses the buffer
            latches = alloc.counters.latches
            dst = alloc.receive(leg, data, src, now)
            if alloc.counters.latches != latches:
                log_event(log, "relay leg latched", port=self.ports[leg], leg="ab"[leg], addr=_fmt(src))
            if dst is None:
                continue
            try:
                if out is None:
                    raise BlockingIOError
                out.sendto(data, dst)
            except OSError:
                alloc.send_failed(size)

    def close(self) -> None:
        """Stop reading and close both sockets, now."""
        for i, sock in enumerate(self.socks):
            if sock is None:
                continue
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
            self.socks[i] = None

    def status(self, now: float) -> dict[str, Any]:
        a = self.allocation
        return {
            "ports": list(self.ports),
            "key_a": PublicKey(a.key_a).b64,
            "key_b": PublicKey(a.key_b).b64,
            "latched": [None if leg.latched is None else _fmt(leg.latched) for leg in a.legs],
            "age": round(now - a.created, 3),
            "idle": round(now - a.last_active, 3),
            **a.counters.as_dict(),
            "recv_errors": self.recv_errors,
        }


def _set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size``-byte buffers: beyond net.core.[rw]mem_max where allowed (CAP_NET_ADMIN), else
    as much as the limit gives."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _fmt(addr: Addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _raw_key(key: bytes | PublicKey) -> bytes:
    return key.raw if isinstance(key, PublicKey) else bytes(key)


class Forwarder:
    """A WireGuard-aware UDP relay on ``host``: allocations of two ports each (see module docstring).

    ``ports`` restricts the ports allocations may use (e.g. a range opened in a firewall); by default
    the kernel picks free ones. ``clock`` is a monotonic clock in seconds (injected by tests);
    ``sweep_interval`` is how often idle allocations are looked for (default: a quarter of the idle
    timeout, at most 5 s); ``buffer_bytes`` sizes each socket's receive and send buffers (bursts from
    WireGuard's batched sends overflow the default ones)."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        limits: Limits | None = None,
        relay_limits: RelayLimits | None = None,
        *,
        ports: Iterable[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval: float | None = None,
        buffer_bytes: int = 4 << 20,
    ) -> None:
        self.host = host
        self.limits = limits or Limits()
        self.relay_limits = relay_limits or RelayLimits()
        self.ports = list(ports) if ports is not None else None
        self.clock = clock
        self.buffer_bytes = buffer_bytes
        self.sweep_interval = sweep_interval or min(5.0, self.limits.idle_timeout / 4)
        rl = self.relay_limits
        self._relay_budget = (
            Budget(rl.packet_rate, rl.packet_burst, rl.byte_rate, rl.byte_burst, clock())
            if rl.packet_rate > 0 or rl.byte_rate > 0
            else None
        )
        self._slots: dict[int, _Slot] = {}  # both ports of every allocation -> its slot
        self._sweeper: asyncio.Task[None] | None = None
        self._state = "new"  # new -> running -> closed
        self.expired = 0  # allocations released by the idle timeout, since start

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise RelayError(f"relay forwarder is {self._state}; start it once")
        self._state = "running"
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="relay-idle-sweep")

    async def close(self) -> None:
        """Stop the sweeper and release every allocation (closing its sockets)."""
        self._state = "closed"
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for slot in self._unique():
            self.release(slot.ports[0])

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- allocations -------------------------------------------------------------------------------

    async def allocate(self, key_a: bytes | PublicKey, key_b: bytes | PublicKey) -> tuple[int, int]:
        """Two new ports ``(port_a, port_b)``: node A (public key ``key_a``) sends to ``port_a``, node B
        to ``port_b``. Raises ValueError for bad keys and RelayError when the relay is full or not
        running."""
        if self._state != "running":
            raise RelayError(f"relay forwarder is {self._state}, not running")
        alloc = Allocation(_raw_key(key_a), _raw_key(key_b), self.limits, self.clock(), self._relay_budget)
        if len(self) >= self.relay_limits.max_allocations:
            raise RelayError(f"relay full: {self.relay_limits.max_allocations} allocations (max_allocations)")
        slot = _Slot(alloc, self.clock)
        try:
            port_a = self._bind(slot, 0)
            port_b = self._bind(slot, 1)
        except BaseException:
            slot.close()
            raise
        slot.ports = (port_a, port_b)
        self._slots[port_a] = self._slots[port_b] = slot
        log_event(log, "relay allocation made", ports=f"{port_a},{port_b}", allocations=len(self))
        return port_a, port_b

    def release(self, port: int) -> bool:
        """Release the allocation that owns ``port`` (either leg), closing its sockets; False when there is
        none."""
        slot = self._slots.get(port)
        if slot is None:
            return False
        for p in slot.ports:
            self._slots.pop(p, None)
        slot.close()
        log_event(log, "relay allocation released", ports=f"{slot.ports[0]},{slot.ports[1]}")
        return True

    def expire_idle(self) -> list[tuple[int, int]]:
        """Release allocations idle for the idle timeout; return their port pairs."""
        now = self.clock()
        gone = [s.ports for s in self._unique() if s.allocation.idle(now)]
        for ports in gone:
            self.release(ports[0])
        self.expired += len(gone)
        return gone

    def allocation(self, port: int) -> Allocation | None:
        """The allocation owning ``port`` (for counters and tests), or None."""
        slot = self._slots.get(port)
        return slot.allocation if slot is not None else None

    def status(self) -> list[dict[str, Any]]:
        """One entry per allocation: ports, keys, latched addresses, age, idle time and counters."""
        now = self.clock()
        return [s.status(now) for s in self._unique()]

    def __len__(self) -> int:
        return len(self._slots) // 2

    # -- internals ---------------------------------------------------------------------------------

    def _unique(self) -> list[_Slot]:
        return list({id(s): s for s in self._slots.values()}.values())

    def _bind(self, slot: _Slot, leg: int) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        candidates = [0] if self.ports is None else [p for p in self.ports if p not in self._slots]
        for port in candidates:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                _set_buffers(sock, self.buffer_bytes)
                sock.bind((self.host, port))
                sock.setblocking(False)
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRINUSE and self.ports is not None:
                    continue
                raise RelayError(f"cannot bind a relay port on {self.host}: {e.strerror or e}") from e
            slot.attach(asyncio.get_running_loop(), leg, sock)
            return int(sock.getsockname()[1])
        raise RelayError(f"no free relay port on {self.host} in the configured range")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            for ports in self.expire_idle():
                log_event(log, "relay allocation expired", ports=f"{ports[0]},{ports[1]}")
