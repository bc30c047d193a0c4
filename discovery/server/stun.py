"""A stateless STUN responder (``--stun-addr``): answers Binding requests with the source address seen.

Nodes learn the public mapping of their WireGuard port from it (issue 14). It keeps no per-client state
beyond a fixed-size rate-limit table, so it is not a store of who asked, and it is a poor amplifier: the
reply (40 bytes for IPv4, 52 for IPv6) is at most :data:`MAX_GROWTH` bytes longer than the request it
answers, and each source address (an IPv6 /64) gets only a few replies a second. Anything that is not a
well-formed Binding request, or that asks for something we do not understand, is dropped silently.

Each reply leaves from the address its request was sent to (``IP_PKTINFO`` / ``IPV6_PKTINFO``), so a
wildcard listener on a multi-homed host still answers from the right IP: a NAT drops a reply that comes
from another address than the one it asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import struct
import time
from array import array
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from spanutil import stun
from spanutil.ipcodec import ip_without_scope

__all__ = ["MAX_GROWTH", "Listener", "RateTable", "StunResponder", "reply_source", "serve"]

MAX_GROWTH = 32  # bytes a reply may add to its request: 20-byte request -> 52-byte IPv6 reply
RATE = 10.0  # replies per second per source address (IPv6: per /64)
BURST = 20.0
SLOTS = 4096  # rate-limit table size: 64 KiB whatever the number of sources
GLOBAL_RATE = 20_000.0  # replies per second in total: bounds the CPU and bandwidth a flood can take
DROP_REASONS = ("malformed", "not_binding", "unsupported", "rate_limited")
RECV_SIZE = 2048  # longer datagrams arrive truncated and fail the length check

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst (the local address), addr (header destination)
_IN6_PKTINFO = struct.Struct("=16si")  # addr, ifindex
_CMSG_SPACE = socket.CMSG_SPACE(_IN_PKTINFO.size) + socket.CMSG_SPACE(_IN6_PKTINFO.size)


class RateTable:
    """Token buckets in a fixed-size table indexed by a keyed hash of the source: sources that collide
    share a bucket (a legitimate client then gets fewer replies), and nothing grows with the number of
    sources. ``rate <= 0`` disables the limit."""

    def __init__(
        self,
        rate: float = RATE,
        burst: float = BURST,
        slots: int = SLOTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.slots, self.clock = rate, max(1.0, burst), slots, clock
        self._key = os.urandom(16)  # an outsider cannot aim many sources at one slot
        self._tokens = array("d", [self.burst]) * slots
        self._stamp = array("d", [clock()]) * slots

    def _slot(self, source: bytes) -> int:
        digest = hashlib.blake2b(source, digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little") % self.slots

    def allow(self, source: bytes) -> bool:
        """Take one token for ``source`` (the address bytes to limit by); False when none is left."""
        if self.rate <= 0:
            return True
        i = self._slot(source)
        now = self.clock()
        tokens = min(self.burst, self._tokens[i] + (now - self._stamp[i]) * self.rate)
        self._stamp[i] = now
        if tokens < 1.0:
            self._tokens[i] = tokens
            return False
        self._tokens[i] = tokens - 1.0
        return True


def limit_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """What a source is rate-limited by: its IPv4 address, or its IPv6 /64 (one host owns a whole /64)."""
    return ip.packed if ip.version == 4 else ip.packed[:8]


def source_address(addr: Any) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """The datagram's source as (ip, port), IPv4-mapped IPv6 (dual-stack socket) turned back into IPv4."""
    try:
        ip = ip_without_scope(addr[0])
        port = int(addr[1])
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


class StunResponder:
    """Decides the reply to each datagram (XOR-MAPPED-ADDRESS and FINGERPRINT for a Binding request) and
    counts what it did: plain integers (one event loop), read by :class:`StunMetrics` at scrape time."""

    def __init__(self, limiter: RateTable | None = None, global_limiter: RateTable | None = None) -> None:
        self.limiter = limiter or RateTable()
        self.global_limiter = global_limiter or RateTable(GLOBAL_RATE, GLOBAL_RATE, slots=1)
        self.answered = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    def reply(self, data: bytes, addr: Any) -> bytes | None:
        """The reply to one datagram (None: drop it). Pure apart from the rate tables and counters."""
        if not stun.looks_like_stun(data):
            self.dropped["malformed"] += 1
            return None
        try:
            msg = stun.parse(data)
        except stun.StunError:
            self.dropped["malformed"] += 1
            return None
        if msg.type != stun.BINDING_REQUEST:
            self.dropped["not_binding"] += 1  # responses, indications, other methods: never answered
            return None
        # A request asking for something we do not do (credentials, other attributes that must be
        # understood) would deserve a 4xx; a stateless responder keeps it simple and stays silent.
        if msg.unknown_required(frozenset()):
            self.dropped["unsupported"] += 1
            return None
        src = source_address(addr)
        if src is None or src[1] == 0:  # port 0 cannot be answered (nor mapped)
            self.dropped["malformed"] += 1
            return None
        if not self.limiter.allow(limit_key(src[0])) or not self.global_limiter.allow(b""):
            self.dropped["rate_limited"] += 1
            return None
        out = stun.binding_success(msg.transaction_id, src)
        if len(out) > len(data) + MAX_GROWTH:  # cannot happen with the replies above; a guard for edits
            self.dropped["unsupported"] += 1
            return None
        self.answered += 1
        return out


def reply_source(ancdata: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes a reply leave from the address the request was sent to (none: the
    kernel chooses). IPv4 uses the local address the kernel matched (``spec_dst``); IPv6 (and IPv4 on a
    dual-stack socket, as a mapped address) the header destination, keeping the interface only where the
    address needs it (link-local)."""
    for level, ctype, data in ancdata:
        if level == socket.IPPROTO_IP and ctype == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _ifindex, local, _dst = _IN_PKTINFO.unpack_from(data)
            return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, local, bytes(4)))]
        if level == socket.IPPROTO_IPV6 and ctype == socket.IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size:
            dst, ifindex = _IN6_PKTINFO.unpack_from(data)
            keep = ifindex if ipaddress.IPv6Address(dst).is_link_local else 0
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(dst, keep))]
    return []


class Listener:
    """One ``--stun-addr`` socket on the event loop: reads datagrams with their destination address and
    sends each reply from it. ``close()`` stops it."""

    def __init__(self, sock: socket.socket, responder: StunResponder) -> None:
        self.sock, self.responder = sock, responder
        self.send_errors = 0
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _readable(self) -> None:
        for _ in range(64):  # bounded per wake-up: other work on the loop keeps its turn under a flood
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(RECV_SIZE, _CMSG_SPACE)
            except OSError:
                return  # nothing left (or an error queued by ICMP: nothing to keep)
            out = self.responder.reply(data, addr)
            if out is None:
                continue
            try:
                self.sock.sendmsg([out], reply_source(ancdata), 0, addr)
            except OSError:
                self.send_errors += 1  # e.g. a full socket buffer: the client asks again

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


class StunMetrics:
    """``discovery_stun_requests_total{result}``: answered, or dropped and why, summed over listeners."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.responders: list[StunResponder] = []
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = CounterMetricFamily(
            "discovery_stun_requests",
            "STUN datagrams received on --stun-addr: answered, or dropped (malformed, not a Binding "
            "request, unsupported attributes, rate-limited).",
            labels=["result"],
        )
        m.add_metric(["answered"], sum(r.answered for r in self.responders))
        for reason in DROP_REASONS:
            m.add_metric([reason], sum(r.dropped[reason] for r in self.responders))
        yield m


def _socket(host: str, port: int) -> socket.socket:
    """A UDP socket bound to ``host:port`` that reports each datagram's destination; ``::`` is dual-stack
    (IPv4 sources arrive IPv4-mapped)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            if host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(host: str, port: int, responder: StunResponder) -> tuple[Listener, int]:
    """Start answering on ``host:port`` (port 0: any); return the listener and the bound port."""
    listener = Listener(_socket(host, port), responder)
    return listener, listener.port
