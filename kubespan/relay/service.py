"""The relay service a relaying node runs: the forwarder on its public address plus the control server on
its mesh address, answering allocation requests that arrive through the tunnel (issue 14; design in
docs/design/relay.md).

Allocations are per unordered pair of peers: a request from A for B, or from B for A, returns the same
allocation (each side its own leg) while it lives. The forwarder's idle timeout ends an allocation; the
service forgets a pair whose allocation is gone. Each requester may hold at most ``per_requester``
allocations it asked for. Lifecycle: ``start()``, then ``stop()``, which closes both sockets' owners and
releases every allocation.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubespan.relay.allocation import Limits
from kubespan.relay.control import (
    CONTROL_PORT,
    Address,
    ControlServer,
    ErrorCode,
    Grant,
    Refusal,
)
from kubespan.relay.forwarder import Forwarder, RelayError, RelayLimits
from kubespan.wireguard.types import PublicKey


@dataclass
class _Pair:
    key_a: PublicKey  # the requester of the allocation (leg A)
    key_b: PublicKey
    ports: tuple[int, int]

    def port_for(self, key: PublicKey) -> int:
        return self.ports[0] if key == self.key_a else self.ports[1]


class RelayService:
    """Forwarder (``public_host``) + control server (``mesh_host``, ``control_port``, bound to the mesh
    link ``device``, which the agent should always give: see :class:`~kubespan.relay.control.ControlServer`).

    ``who`` and ``where`` map mesh source addresses to peers and peers to their clients' addresses (see
    :class:`~kubespan.relay.control.ControlServer`); ``limits`` and ``relay_limits`` are the forwarder's;
    ``ports`` restricts the forwarder's ports; ``per_requester`` caps the allocations one peer may ask
    for. ``notify_interval`` and ``notify_attempts`` set the NOTIFY retries."""

    def __init__(
        self,
        mesh_host: str,
        who: Callable[[str], PublicKey | None],
        where: Callable[[PublicKey], Address | None],
        *,
        public_host: str = "0.0.0.0",
        control_port: int = CONTROL_PORT,
        device: str | None = None,
        limits: Limits | None = None,
        relay_limits: RelayLimits | None = None,
        ports: range | None = None,
        per_requester: int = 16,
        notify_interval: float = 0.5,
        notify_attempts: int = 10,
        forwarder: Forwarder | None = None,
    ) -> None:
        if per_requester < 1:
            raise ValueError(f"per_requester must be at least 1, not {per_requester}")
        self.per_requester = per_requester
        self.forwarder = (
            forwarder if forwarder is not None else Forwarder(public_host, limits, relay_limits, ports=ports)
        )
        self.server = ControlServer(
            mesh_host,
            self,
            who,
            where,
            port=control_port,
            device=device,
            notify_interval=notify_interval,
            notify_attempts=notify_attempts,
        )
        self._pairs: dict[frozenset[PublicKey], _Pair] = {}
        self._lock = asyncio.Lock()
        self._running = False

    @property
    def lifetime(self) -> int:
        """The allocations' idle timeout in whole seconds, as told to peers."""
        return math.ceil(self.forwarder.limits.idle_timeout)

    async def start(self) -> None:
        """Start the forwarder, then the control server (a failure stops the forwarder again)."""
        await self.forwarder.start()
        try:
            await self.server.start()
        except BaseException:
            await self.forwarder.close()
            raise
        self._running = True

    async def stop(self) -> None:
        """Stop answering, then release every allocation; the service cannot be restarted."""
        self._running = False
        await self.server.stop()
        await self.forwarder.close()
        self._pairs.clear()

    # -- RelayHandler ------------------------------------------------------------------------------

    async def allocate(self, requester: PublicKey, peer: PublicKey) -> Grant:
        """The pair's live allocation, or a new one with the requester on leg A."""
        if not self._running:
            raise Refusal(ErrorCode.NOT_A_RELAY, "the relay service is stopping")
        key = frozenset((requester, peer))
        async with self._lock:
            self._prune()
            pair = self._pairs.get(key)
            if pair is None:
                held = sum(1 for p in self._pairs.values() if p.key_a == requester)
                if held >= self.per_requester:
                    raise Refusal(
                        ErrorCode.LIMIT,
                        f"requester holds {held} allocations (per_requester {self.per_requester})",
                    )
                try:
                    ports = await self.forwarder.allocate(requester, peer)
                except RelayError as e:
                    full = str(e).startswith("relay full")
                    raise Refusal(ErrorCode.RELAY_FULL if full else ErrorCode.INTERNAL, str(e)) from e
                pair = self._pairs[key] = _Pair(requester, peer, ports)
        return Grant(pair.port_for(requester), pair.port_for(peer), self.lifetime)

    async def release(self, requester: PublicKey, peer: PublicKey) -> bool:
        """Release the pair's allocation if there is one (either side may)."""
        async with self._lock:
            pair = self._pairs.pop(frozenset((requester, peer)), None)
            return pair is not None and self.forwarder.release(pair.ports[0])

    # -- status ------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Allocations with their counters, totals of forwarded packets and bytes and of drops by
        reason, idle expiries, and the control server's counters."""
        allocations = self.forwarder.status()
        dropped: dict[str, int] = {}
        for a in allocations:
            for reason, n in a["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        return {
            "running": self._running,
            "allocations": allocations,
            "forwarded_packets": sum(a["forwarded_packets"] for a in allocations),
            "forwarded_bytes": sum(a["forwarded_bytes"] for a in allocations),
            "dropped": dict(sorted(dropped.items())),
            "expired": self.forwarder.expired,
            "control": self.server.status(),
        }

    # -- internals ---------------------------------------------------------------------------------

    def _alive(self, pair: _Pair) -> bool:
        alloc = self.forwarder.allocation(pair.ports[0])
        return alloc is not None and alloc.key_a == pair.key_a.raw and alloc.key_b == pair.key_b.raw

    def _prune(self) -> None:
        """Forget pairs whose allocation the forwarder no longer has (expired while idle)."""
        for key in [k for k, p in self._pairs.items() if not self._alive(p)]:
            del self._pairs[key]
