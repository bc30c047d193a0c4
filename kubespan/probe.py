"""Path probes: ICMPv6 echo to a peer's mesh address, through the tunnel.

The endpoint state machine asks for a probe when it needs fresh evidence that
the current path works; a reply proves the round trip through WireGuard. The
prober owns one raw ICMPv6 socket (root), sends echo requests with our own
identifier and maps replies back to peers by sequence number. Without the
privilege for a raw socket it disables itself and the state machine falls back
to its passive rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Hashable

from spanutil.ipcodec import ip_without_scope
from spanutil.logs import log_event

log = logging.getLogger("kubespan.probe")

ECHO_REQUEST = 128
ECHO_REPLY = 129
_PENDING_MAX = 4096
_REQUEST_HEAD = bytes((ECHO_REQUEST, 0))  # type, code


def echo_request(ident: int, seq: int, payload: bytes = b"kubespan-probe") -> bytes:
    """An ICMPv6 echo request (the kernel fills in the checksum on raw ICMPv6 sockets)."""
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq) + payload


def _source(addr: tuple[object, ...]) -> ipaddress.IPv6Address | None:
    """The IPv6 source of a ``recvfrom`` address tuple, else None."""
    try:
        ip = ip_without_scope(addr[0])
    except (ValueError, IndexError):
        return None
    return ip if isinstance(ip, ipaddress.IPv6Address) else None


def parse_echo_reply(packet: bytes) -> tuple[int, int] | None:
    """``(identifier, sequence)`` of an echo reply, else None."""
    if len(packet) < 8 or packet[0] != ECHO_REPLY or packet[1] != 0:
        return None
    _, _, _, ident, seq = struct.unpack("!BBHHH", packet[:8])
    return ident, seq


class Prober:
    """Sends probes and collects which peers answered since the last ``take_answered``."""

    def __init__(self) -> None:
        self.ident = int.from_bytes(os.urandom(2), "big")
        self._seq = 0
        self._pending: dict[int, tuple[Hashable, float]] = {}  # seq -> (peer, sent at)
        self._answered: set[Hashable] = set()
        self._rtt: dict[Hashable, float] = {}  # the latest round trip per peer, until taken
        self._sock: socket.socket | None = None
        self.enabled = False
        self.sent = 0
        self.replies = 0
        # called after replies arrived (the engine wakes so evidence is used at once, not at the next poll)
        self.on_reply: Callable[[], None] | None = None
        # called with the source of each echo request that arrives (the kernel answers it): from a
        # peer's mesh address, the peer's probe came through its session to us
        self.on_request: Callable[[ipaddress.IPv6Address], None] | None = None

    def open(self) -> bool:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        except OSError as e:
            log_event(log, "probes disabled: no raw ICMPv6 socket", logging.WARNING, error=str(e))
            return False
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self.enabled = True
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self.enabled = False

    def send(self, peer: Hashable, address: ipaddress.IPv6Address) -> bool:
        """One echo request to ``address`` on behalf of ``peer``; False when it could not be sent."""
        if self._sock is None:
            return False
        self._seq = (self._seq + 1) & 0xFFFF
        if len(self._pending) >= _PENDING_MAX:
            self._pending.clear()
        self._pending[self._seq] = (peer, time.monotonic())
        try:
            self._sock.sendto(echo_request(self.ident, self._seq), (str(address), 0))
        except OSError:
            return False
        self.sent += 1
        return True

    def _readable(self) -> None:
        assert self._sock is not None
        before = self.replies
        try:
            self._drain()
        finally:
            if self.replies != before and self.on_reply is not None:
                self.on_reply()

    def _drain(self) -> None:
        assert self._sock is not None
        for _ in range(256):
            try:
                data, addr = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if data[:2] == _REQUEST_HEAD and self.on_request is not None:
                source = _source(addr)
                if source is not None:
                    self.on_request(source)
                continue
            parsed = parse_echo_reply(data)
            if parsed is None or parsed[0] != self.ident:
                continue
            pending = self._pending.pop(parsed[1], None)
            if pending is not None:
                peer, sent = pending
                self.replies += 1
                self._answered.add(peer)
                self._rtt[peer] = time.monotonic() - sent

    @property
    def has_answered(self) -> bool:
        """Replies arrived that no ``take_answered`` collected yet."""
        return bool(self._answered)

    def take_answered(self) -> set[Hashable]:
        out, self._answered = self._answered, set()
        return out

    def take_rtts(self) -> dict[Hashable, float]:
        """The latest probe round trip (seconds) per peer answered since the last call."""
        out, self._rtt = self._rtt, {}
        return out
