"""Punch probes and their answers: the wire codec, the MAC, replay and rate state (pure, no sockets).

A probe asks "does my packet reach you through this candidate?"; the peer answers from its WireGuard
port to the probe's source, so the answer travels back through the very NAT mappings WireGuard will use.
Both share one fixed 116-byte layout (big-endian)::

     0  magic      4   b"KSPQ" (probe) or b"KSPA" (answer); never a WireGuard type 1-4 + three zeros
     4  version    1   1
     5  reserved   3   zero
     8  sender    32   the sender's WireGuard public key
    40  nonce     16   random, fresh per message
    56  time       8   sender's wall clock, Unix milliseconds
    64  reply_to  16   answer: the probe's nonce; probe: zero
    80  family     1   answer: 4 or 6, the probe's source as the answerer saw it; probe: 0
    81  reserved   1   zero
    82  port       2   that source's port
    84  address   16   that source's address (IPv4 in the first 4 bytes)
   100  mac       16   BLAKE2s-128 over bytes 0-99, keyed by :func:`probe_key`

The MAC key is derived from the cluster secret with its own label, so it shares nothing with the
preshared key or the affiliate encryption that use the same secret. Receivers reject a time more than
``MAX_SKEW_MS`` away from theirs and a nonce already seen (:class:`ReplayGuard`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

from kubespan.wireguard.types import AddrPort, PublicKey

__all__ = [
    "ANSWER_MAGIC",
    "MAX_SKEW_MS",
    "MESSAGE_LEN",
    "OPENER_PAYLOAD",
    "PROBE_MAGIC",
    "ProbeError",
    "ProbeMessage",
    "RateLimiter",
    "ReplayGuard",
    "decode",
    "encode",
    "probe_key",
]

PROBE_MAGIC: Final = b"KSPQ"
ANSWER_MAGIC: Final = b"KSPA"
OPENER_PAYLOAD: Final = b"KSPO"  # an opener's whole payload: dies on the way, and is ignored if it does not
VERSION: Final = 1
NONCE_LEN: Final = 16
MAC_LEN: Final = 16
MESSAGE_LEN: Final = 116
MAX_SKEW_MS: Final = 30_000
_LABEL: Final = b"kubespan punch probe mac v1"
_HEAD = struct.Struct("!4sB3s32s16sQ16sBBH16s")  # everything the MAC covers (100 bytes)
assert _HEAD.size + MAC_LEN == MESSAGE_LEN


class ProbeError(ValueError):
    """A datagram that is not a valid probe or answer; the text says why (for counters, not for peers)."""


def probe_key(cluster_secret: bytes) -> bytes:
    """The 32-byte MAC key of probes, derived from the cluster secret under a label of its own."""
    if not cluster_secret:
        raise ValueError("cluster_secret: empty")
    secret = cluster_secret if len(cluster_secret) <= 32 else hashlib.blake2s(cluster_secret).digest()
    return hashlib.blake2s(_LABEL, key=secret).digest()


def _mac(key: bytes, head: bytes) -> bytes:
    return hashlib.blake2s(head, key=key, digest_size=MAC_LEN).digest()


@dataclass(frozen=True, slots=True)
class ProbeMessage:
    """A probe (``answer`` false) or an answer; ``observed`` is set on answers only."""

    answer: bool
    sender: PublicKey
    nonce: bytes
    time_ms: int
    reply_to: bytes = bytes(NONCE_LEN)
    observed: AddrPort | None = None

    @classmethod
    def probe(cls, sender: PublicKey, now_ms: int) -> ProbeMessage:
        return cls(False, sender, os.urandom(NONCE_LEN), now_ms)

    @classmethod
    def answering(
        cls, probe: ProbeMessage, sender: PublicKey, observed: AddrPort, now_ms: int
    ) -> ProbeMessage:
        return cls(True, sender, os.urandom(NONCE_LEN), now_ms, probe.nonce, observed)


def encode(msg: ProbeMessage, key: bytes) -> bytes:
    """``msg`` on the wire, MAC'd with ``key`` (from :func:`probe_key`)."""
    if len(msg.nonce) != NONCE_LEN or len(msg.reply_to) != NONCE_LEN:
        raise ValueError(f"nonce and reply_to must be {NONCE_LEN} bytes")
    family, port, addr = 0, 0, bytes(16)
    if msg.observed is not None:
        family, port = msg.observed.ip.version, msg.observed.port
        addr = msg.observed.ip.packed.ljust(16, b"\0")
    head = _HEAD.pack(
        ANSWER_MAGIC if msg.answer else PROBE_MAGIC,
        VERSION,
        bytes(3),
        msg.sender.raw,
        msg.nonce,
        msg.time_ms,
        msg.reply_to,
        family,
        0,
        port,
        addr,
    )
    return head + _mac(key, head)


def decode(data: bytes, key: bytes, now_ms: int, max_skew_ms: int = MAX_SKEW_MS) -> ProbeMessage:
    """The message in ``data``, checked: length, magic, version, MAC, then time within ``max_skew_ms``.

    Raises :class:`ProbeError`. Replays are the caller's to catch (:class:`ReplayGuard`)."""
    if len(data) != MESSAGE_LEN:
        raise ProbeError(f"length {len(data)}, not {MESSAGE_LEN}")
    magic, version, reserved, sender, nonce, time_ms, reply_to, family, pad, port, addr = _HEAD.unpack_from(
        data
    )
    if magic not in (PROBE_MAGIC, ANSWER_MAGIC):
        raise ProbeError("not a probe")
    if version != VERSION:
        raise ProbeError(f"version {version}")
    if not hmac.compare_digest(_mac(key, data[: _HEAD.size]), data[_HEAD.size :]):
        raise ProbeError("bad mac")
    # authentic from here on: what follows are a cluster member's mistakes, not forgeries
    if reserved != bytes(3) or pad:
        raise ProbeError("reserved bits set")
    if abs(time_ms - now_ms) > max_skew_ms:
        raise ProbeError(f"stale: {(time_ms - now_ms) / 1000:+.1f} s from our clock")
    answer = magic == ANSWER_MAGIC
    observed: AddrPort | None = None
    try:
        if answer:
            if family == 4 and addr[4:] == bytes(12):
                observed = AddrPort(ipaddress.IPv4Address(addr[:4]), port)
            elif family == 6:
                observed = AddrPort(ipaddress.IPv6Address(addr), port)
            else:
                raise ProbeError(f"answer with address family {family}")
        elif family or port or addr != bytes(16) or reply_to != bytes(NONCE_LEN):
            raise ProbeError("probe with answer fields")
        return ProbeMessage(answer, PublicKey(sender), nonce, time_ms, reply_to, observed)
    except ProbeError:
        raise
    except ValueError as e:
        raise ProbeError(str(e)) from None


class ReplayGuard:
    """Nonces seen in the last ``window_ms`` (at most ``capacity``): each is accepted once.

    Messages older than the staleness limit are rejected before they get here, so a window of twice
    that limit covers every nonce that could still pass. When the guard is full of live nonces it
    refuses new ones (fails closed) rather than forget one that could then be replayed.
    """

    def __init__(self, window_ms: int = 2 * MAX_SKEW_MS, capacity: int = 4096) -> None:
        self.window_ms = window_ms
        self.capacity = capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # nonce -> time first seen (our clock)

    def __len__(self) -> int:
        return len(self._seen)

    def fresh(self, nonce: bytes, now_ms: int) -> bool:
        """True the first time ``nonce`` is offered (and remembers it); False for a replay or when full."""
        while self._seen:
            oldest, seen_ms = next(iter(self._seen.items()))
            if now_ms - seen_ms < self.window_ms:
                break
            del self._seen[oldest]
        if nonce in self._seen or len(self._seen) >= self.capacity:
            return False
        self._seen[nonce] = now_ms
        return True


class RateLimiter:
    """A token bucket per source (``rate`` a second, ``burst`` deep), for at most ``max_sources``.

    Sources whose bucket has refilled are forgotten first; when every tracked source is still
    limited, a new source is refused until one refills (the state never grows past the bound).
    """

    def __init__(self, rate: float = 10.0, burst: float = 20.0, max_sources: int = 1024) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_sources >= 1")
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # tokens, last time

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: Hashable, now: float) -> bool:
        """Take one token from ``source``'s bucket; ``now`` is monotonic seconds."""
        entry = self._buckets.pop(source, None)
        if entry is None:
            if len(self._buckets) >= self.max_sources:
                self._forget_full(now)
                if len(self._buckets) >= self.max_sources:
                    return False
            tokens = self.burst
        else:
            tokens, last = entry
            tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1
        self._buckets[source] = (tokens - 1 if allowed else tokens, now)
        return allowed

    def _forget_full(self, now: float) -> None:
        for source, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.burst:
                del self._buckets[source]
