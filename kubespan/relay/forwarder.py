"""The relay forwarder: asyncio UDP sockets around :class:`~kubespan.relay.allocation.Allocation`.

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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self, cast

from kubespan.relay.allocation import Addr, Allocation, Budget, Limits
from kubespan.wireguard.types import PublicKey
from spanutil.logs import log_event

log = logging.getLogger("kubespan.relay")


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


class _LegProtocol(asyncio.DatagramProtocol):
    """One leg's socket: hands every datagram to its slot; tracks whether the socket is backed up."""

    def __init__(self, slot: _Slot, leg: int) -> None:
        self.slot = slot
        self.leg = leg
        self.transport: asyncio.DatagramTransport | None = None
        self.paused = False
        self.errors = 0
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.slot.on_datagram(self.leg, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.errors += 1  # e.g. ICMP port unreachable from a peer that went away

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class _Slot:
    """An allocation with its two sockets."""

    def __init__(self, allocation: Allocation, clock: Callable[[], float]) -> None:
        self.allocation = allocation
        self.clock = clock
        self.protocols = (_LegProtocol(self, 0), _LegProtocol(self, 1))
        self.ports = (0, 0)

    def on_datagram(self, leg: int, data: bytes, src: Addr) -> None:
        alloc = self.allocation
        latches = alloc.counters.latches
        dst = alloc.receive(leg, data, src, self.clock())
        if alloc.counters.latches != latches:
            log_event(log, "relay leg latched", port=self.ports[leg], leg="ab"[leg], addr=_fmt(src))
        if dst is None:
            return
        out = self.protocols[1 - leg]
        if out.transport is None or out.paused:
            alloc.send_failed(len(data))
            return
        out.transport.sendto(data, dst)

    def close(self) -> None:
        for p in self.protocols:
            if p.transport is not None:
                p.transport.close()

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
        }


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
    timeout, at most 5 s)."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        limits: Limits | None = None,
        relay_limits: RelayLimits | None = None,
        *,
        ports: Iterable[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval: float | None = None,
    ) -> None:
        self.host = host
        self.limits = limits or Limits()
        self.relay_limits = relay_limits or RelayLimits()
        self.ports = list(ports) if ports is not None else None
        self.clock = clock
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
        """Stop the sweeper and release every allocation; returns once every socket is closed."""
        self._state = "closed"
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        slots = self._unique()
        for slot in slots:
            self.release(slot.ports[0])
        closing = [p.closed.wait() for s in slots for p in s.protocols if p.transport is not None]
        await asyncio.gather(*closing)

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
            port_a = await self._bind(slot.protocols[0])
            port_b = await self._bind(slot.protocols[1])
        except BaseException:
            slot.close()
            raise
        slot.ports = (port_a, port_b)
        self._slots[port_a] = self._slots[port_b] = slot
        log_event(log, "relay allocation made", ports=f"{port_a},{port_b}", allocations=len(self))
        return port_a, port_b

    def release(self, port: int) -> bool:
        """Release the allocation that owns ``port`` (either leg); False when there is none. Its sockets
        close at the event loop's next turn."""
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

    async def _bind(self, proto: _LegProtocol) -> int:
        loop = asyncio.get_running_loop()
        candidates = [0] if self.ports is None else [p for p in self.ports if p not in self._slots]
        for port in candidates:
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: proto, local_addr=(self.host, port)
                )
            except OSError as e:
                if e.errno == errno.EADDRINUSE and self.ports is not None:
                    continue
                raise RelayError(f"cannot bind a relay port on {self.host}: {e.strerror or e}") from e
            return int(transport.get_extra_info("sockname")[1])
        raise RelayError(f"no free relay port on {self.host} in the configured range")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            for ports in self.expire_idle():
                log_event(log, "relay allocation expired", ports=f"{ports[0]},{ports[1]}")
