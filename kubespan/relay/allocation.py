"""One relay allocation as a pure state machine: two legs, latching, forwarding decisions, counters.

An allocation joins node A (on leg A) and node B (on leg B). Packets arriving on leg A come from A and
are addressed to B, so leg A checks mac1 against B's public key, and leg B against A's. A leg latches
onto a source address only on a handshake (initiation or response) whose mac1 verifies, and re-latches
when a new valid, not replayed handshake arrives from another address (NAT rebind). Only WireGuard
messages from a leg's latched address go to the other leg's latched address. The clock is the
caller's; sockets live in :mod:`kubespan.relay.forwarder`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kubespan.relay import wgmsg
from kubespan.relay.ratelimit import TokenBucket

Addr = tuple[Any, ...]  # a socket address as asyncio reports it: (host, port) or (host, port, flow, scope)

_REPLAY_MEMORY = 16  # recent mac1 values per leg; WireGuard never sends the same handshake twice


class Drop(StrEnum):
    """Why a datagram was not forwarded (the counter names)."""

    NOT_WIREGUARD = "not_wireguard"
    UNLATCHED_SOURCE = "unlatched_source"  # not a handshake, and not from the leg's latched address
    BAD_MAC1 = "bad_mac1"
    REPLAYED = "replayed_handshake"  # a handshake this leg has already seen, from a new address
    PEER_NOT_LATCHED = "peer_not_latched"  # valid, but the other leg has no address yet
    RATE_LIMITED = "rate_limited"  # over the allocation's packet or byte rate
    RELAY_RATE_LIMITED = "relay_rate_limited"  # over the relay-wide packet or byte rate
    SEND_FAILED = "send_failed"  # the outgoing socket refused or was backed up


@dataclass(frozen=True)
class Limits:
    """Per-allocation limits; a rate of 0 means unlimited. Bursts are in packets and bytes."""

    idle_timeout: float = 180.0
    packet_rate: float = 100_000.0
    packet_burst: float = 10_000.0
    byte_rate: float = 125_000_000.0  # 1 Gbit/s
    byte_burst: float = 12_500_000.0

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {self.idle_timeout}")
        for name in ("packet_rate", "packet_burst", "byte_rate", "byte_burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")


class Budget:
    """A packet bucket and a byte bucket spent together."""

    __slots__ = ("bytes", "packets")

    def __init__(
        self, packet_rate: float, packet_burst: float, byte_rate: float, byte_burst: float, now: float
    ) -> None:
        self.packets = TokenBucket(packet_rate, packet_burst, now)
        self.bytes = TokenBucket(byte_rate, byte_burst, now)

    def take(self, size: int, now: float) -> bool:
        if not self.bytes.take(size, now):
            return False
        if not self.packets.take(1, now):
            self.bytes.tokens += size  # not spent after all
            return False
        return True


@dataclass
class Counters:
    """What an allocation did, for status and metrics."""

    forwarded_packets: int = 0
    forwarded_bytes: int = 0
    latches: int = 0  # first latch and every re-latch, both legs
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: Drop) -> None:
        self.dropped[reason.value] = self.dropped.get(reason.value, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "forwarded_packets": self.forwarded_packets,
            "forwarded_bytes": self.forwarded_bytes,
            "latches": self.latches,
            "dropped": dict(sorted(self.dropped.items())),
        }


class Leg:
    """One side of an allocation: the mac1 key its senders must use and the address it latched."""

    __slots__ = ("latched", "mac1_key", "recent")

    def __init__(self, receiver_public_key: bytes) -> None:
        self.mac1_key = wgmsg.mac1_key(receiver_public_key)
        self.latched: Addr | None = None
        self.recent: deque[bytes] = deque(maxlen=_REPLAY_MEMORY)


class Allocation:
    """The state of one allocation between the WireGuard peers with public keys ``key_a`` and ``key_b``.

    :meth:`receive` decides, for a datagram that arrived on leg 0 (A) or 1 (B), where to send it on the
    other leg, or returns None and counts the drop."""

    def __init__(
        self, key_a: bytes, key_b: bytes, limits: Limits, now: float, relay_budget: Budget | None = None
    ) -> None:
        for name, key in (("key_a", key_a), ("key_b", key_b)):
            if len(key) != 32:
                raise ValueError(f"{name} must be a 32-byte WireGuard public key, not {len(key)} bytes")
        if key_a == key_b:
            raise ValueError("key_a and key_b must differ: an allocation joins two peers")
        self.key_a = bytes(key_a)
        self.key_b = bytes(key_b)
        self.limits = limits
        self.legs = (Leg(key_b), Leg(key_a))  # leg A carries messages to B, leg B messages to A
        self.budget = Budget(
            limits.packet_rate, limits.packet_burst, limits.byte_rate, limits.byte_burst, now
        )
        self.relay_budget = relay_budget
        self.counters = Counters()
        self.created = now
        self.last_active = now

    def receive(self, leg: int, data: bytes | memoryview, src: Addr, now: float) -> Addr | None:
        """The address on the other leg to send ``data`` to, or None (dropped and counted). ``data`` may
        be a view of a reused buffer: nothing keeps a reference to it."""
        kind = wgmsg.message_type(data)
        if kind is None:
            return self._drop(Drop.NOT_WIREGUARD)
        this = self.legs[leg]
        if wgmsg.is_handshake(kind):
            if not wgmsg.verify_mac1_key(data, this.mac1_key):
                return self._drop(Drop.BAD_MAC1)
            mac = bytes(data[len(data) - 32 : len(data) - 16])
            if src != this.latched:
                if mac in this.recent:
                    return self._drop(Drop.REPLAYED)
                this.latched = src
                self.counters.latches += 1
                self.last_active = now
            this.recent.append(mac)
        elif src != this.latched:
            return self._drop(Drop.UNLATCHED_SOURCE)
        dst = self.legs[1 - leg].latched
        if dst is None:
            return self._drop(Drop.PEER_NOT_LATCHED)
        if not self.budget.take(len(data), now):
            return self._drop(Drop.RATE_LIMITED)
        if self.relay_budget is not None and not self.relay_budget.take(len(data), now):
            return self._drop(Drop.RELAY_RATE_LIMITED)
        self.counters.forwarded_packets += 1
        self.counters.forwarded_bytes += len(data)
        self.last_active = now
        return dst

    def send_failed(self, size: int) -> None:
        """The forwarder could not send a ``size``-byte packet :meth:`receive` passed: count it as dropped."""
        self.counters.forwarded_packets -= 1
        self.counters.forwarded_bytes -= size
        self.counters.drop(Drop.SEND_FAILED)

    def idle(self, now: float) -> bool:
        """Nothing forwarded and no latch for ``limits.idle_timeout`` seconds."""
        return now - self.last_active >= self.limits.idle_timeout

    def _drop(self, reason: Drop) -> None:
        self.counters.drop(reason)
        return None
