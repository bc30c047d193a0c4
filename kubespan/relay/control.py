"""Relay allocations requested over the mesh: a small request/response protocol over UDP between mesh
addresses (issue 14; layouts and rules in docs/design/relay.md, "Control protocol").

It runs inside WireGuard: a datagram from mesh address X reached us only if it came through the tunnel
of the peer whose AllowedIPs hold X (cryptokey routing), so the source address names the requester. The
caller maps addresses to public keys (``who``) and keys to control addresses (``where``); a source it
does not know is refused. That holds only for datagrams that came through the tunnel, so the sockets
bind the mesh address (never a wildcard) and should be held to the mesh link (``device``). Only
requests are answered.

- :func:`encode` / :func:`decode`: the strict codec (magic, version, type, request id, fixed bodies).
- :class:`ControlServer`: the relay's side, on ``(mesh address, CONTROL_PORT)``. It answers ALLOCATE,
  RELEASE and PING through a :class:`RelayHandler` and sends NOTIFY to the pair's other peer, retried
  until acknowledged.
- :class:`RelayClient`: every node's side, on ``(mesh address, CLIENT_PORT)``: ``allocate``,
  ``release``, ``ping`` (RTT) and NOTIFY delivery to a callback, with an acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from kubespan.wireguard.types import PublicKey
from spanutil.ipcodec import ip_without_scope
from spanutil.logs import log_event

log = logging.getLogger("kubespan.relay.control")

CONTROL_PORT = 51822  # the relay's control server, on its mesh address (51820: WireGuard, 51821: status)
CLIENT_PORT = 51823  # every node's relay client and NOTIFY listener, on its mesh address

MAGIC = b"KR"
VERSION = 1
HEADER = struct.Struct("!2sBBI")  # magic, version, type, request id
MAX_TEXT = 128  # bytes of UTF-8 in an ERROR
MAX_MESSAGE = HEADER.size + 2 + MAX_TEXT  # the largest valid datagram (an ERROR with the longest text)
MAX_LIFETIME = 2**32 - 1

Address = tuple[str, int]


class MsgType(IntEnum):
    ALLOCATE = 1  # client -> relay: peer key
    ALLOCATED = 2  # relay -> client: peer key, port for the requester, lifetime
    RELEASE = 3  # client -> relay: peer key
    RELEASED = 4  # relay -> client: peer key
    PING = 5  # client -> relay
    PONG = 6  # relay -> client
    NOTIFY = 7  # relay -> the pair's other peer: requester's key, port for the notified peer, lifetime
    NOTIFIED = 8  # peer -> relay: acknowledges a NOTIFY (same request id)
    ERROR = 9  # relay -> client: code, text


class ErrorCode(IntEnum):
    UNKNOWN_SOURCE = 1  # the request's source address is not a known peer's mesh address
    UNKNOWN_PEER = 2  # the requested peer is not known to the relay (or is the requester itself)
    RELAY_FULL = 3  # the relay holds its maximum number of allocations
    LIMIT = 4  # the requester holds its maximum number of allocations
    NOT_A_RELAY = 5  # the node does not relay (now)
    INTERNAL = 6  # the relay failed (e.g. no free port)


_BODY = {  # exact body length per type; ERROR is 2 + its text
    MsgType.ALLOCATE: 32,
    MsgType.ALLOCATED: 32 + 2 + 4,
    MsgType.RELEASE: 32,
    MsgType.RELEASED: 32,
    MsgType.PING: 0,
    MsgType.PONG: 0,
    MsgType.NOTIFY: 32 + 2 + 4,
    MsgType.NOTIFIED: 32 + 2,
}
_REQUESTS = frozenset({MsgType.ALLOCATE, MsgType.RELEASE, MsgType.PING})


class DecodeError(ValueError):
    """A datagram is not a valid control message; the text names the field and the limit."""


@dataclass(frozen=True)
class Message:
    """One control message. ``peer``, ``port``, ``lifetime`` (seconds), ``code`` and ``text`` are set
    as the type needs (see the layouts in :data:`_BODY` and the design doc); others stay empty."""

    type: MsgType
    request_id: int
    peer: PublicKey | None = None
    port: int = 0
    lifetime: int = 0
    code: int = 0
    text: str = ""


def encode(msg: Message) -> bytes:
    """The datagram for ``msg``; ValueError names the field out of bounds."""
    if not 0 <= msg.request_id <= 0xFFFFFFFF:
        raise ValueError(f"request_id must fit 32 bits, not {msg.request_id}")
    head = HEADER.pack(MAGIC, VERSION, int(msg.type), msg.request_id)
    t = msg.type
    if t == MsgType.ERROR:
        text = msg.text.encode("utf-8")
        if len(text) > MAX_TEXT:
            raise ValueError(f"text must be at most {MAX_TEXT} bytes of UTF-8, not {len(text)}")
        if not 0 < msg.code <= 255:
            raise ValueError(f"code must be 1-255, not {msg.code}")
        return head + bytes([msg.code, len(text)]) + text
    if t in (MsgType.PING, MsgType.PONG):
        return head
    if msg.peer is None:
        raise ValueError(f"peer is required in {t.name}")
    body = msg.peer.raw
    if t in (MsgType.ALLOCATED, MsgType.NOTIFY, MsgType.NOTIFIED):
        if not 1 <= msg.port <= 65535:
            raise ValueError(f"port must be 1-65535, not {msg.port}")
        body += struct.pack("!H", msg.port)
    if t in (MsgType.ALLOCATED, MsgType.NOTIFY):
        if not 0 <= msg.lifetime <= MAX_LIFETIME:
            raise ValueError(f"lifetime must be 0-{MAX_LIFETIME} s, not {msg.lifetime}")
        body += struct.pack("!I", msg.lifetime)
    return head + body


def decode(data: bytes | memoryview) -> Message:
    """The message in ``data``; DecodeError for anything but an exact, known layout."""
    data = bytes(data)
    if len(data) > MAX_MESSAGE:
        raise DecodeError(f"datagram is {len(data)} bytes, above the maximum {MAX_MESSAGE}")
    if len(data) < HEADER.size:
        raise DecodeError(f"datagram is {len(data)} bytes, below the header's {HEADER.size}")
    magic, version, kind, rid = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError(f"magic must be {MAGIC!r}, not {magic!r}")
    if version != VERSION:
        raise DecodeError(f"version must be {VERSION}, not {version}")
    try:
        t = MsgType(kind)
    except ValueError:
        raise DecodeError(f"type {kind} is not a known message type (1-{len(MsgType)})") from None
    body = data[HEADER.size :]
    if t == MsgType.ERROR:
        if len(body) < 2:
            raise DecodeError(f"ERROR body is {len(body)} bytes, below 2")
        code, n = body[0], body[1]
        if code == 0:
            raise DecodeError("ERROR code must be 1-255, not 0")
        if n > MAX_TEXT or len(body) != 2 + n:
            raise DecodeError(f"ERROR text length {n} does not match the {len(body) - 2} bytes sent")
        try:
            text = body[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("ERROR text is not UTF-8") from None
        return Message(t, rid, code=code, text=text)
    if len(body) != _BODY[t]:
        raise DecodeError(f"{t.name} body must be {_BODY[t]} bytes, not {len(body)}")
    if not body:
        return Message(t, rid)
    peer = PublicKey(body[:32])
    port = struct.unpack_from("!H", body, 32)[0] if len(body) >= 34 else 0
    lifetime = struct.unpack_from("!I", body, 34)[0] if len(body) >= 38 else 0
    if len(body) >= 34 and port == 0:
        raise DecodeError(f"{t.name} port must be 1-65535, not 0")
    return Message(t, rid, peer=peer, port=port, lifetime=lifetime)


def _check_bind_host(host: str) -> str:
    """``host`` as a specific address: the control sockets must never listen on a wildcard."""
    try:
        ip = ip_without_scope(host)
    except ValueError:
        raise ValueError(f"host must be an IP address (the node's mesh address), not {host!r}") from None
    if ip.is_unspecified:
        raise ValueError(f"host must be the node's mesh address, not the wildcard {host!r}")
    return host


def _same_host(a: str, b: str) -> bool:
    """Whether two address strings name the same IP (``::1`` and ``0::1`` alike)."""
    try:
        return ip_without_scope(a) == ip_without_scope(b)
    except ValueError:
        return a == b


def _new_request_id() -> int:
    return int.from_bytes(os.urandom(4), "big")


class _Endpoint(asyncio.DatagramProtocol):
    """A datagram socket feeding ``on_datagram``; errors from the kernel (ICMP) are ignored."""

    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        """Close the socket and return once it is closed (the port is free again)."""
        if self.transport is not None:
            self.transport.close()
            await self.closed

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("relay control socket error: %s", exc)


async def _open(
    host: str, port: int, device: str | None, on_datagram: Callable[[bytes, Any], None]
) -> _Endpoint:
    """A UDP socket on ``(host, port)``, bound to ``device`` when given (SO_BINDTODEVICE): then only
    datagrams that arrived on that link are received, and answers leave through it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        where = f"{host}:{port}" + (f" on device {device}" if device else "")
        raise OSError(e.errno, f"cannot bind the relay control socket to {where}: {e.strerror or e}") from e
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: _Endpoint(on_datagram), sock=sock)
    return proto


# -- server -----------------------------------------------------------------------------------------


class Refusal(Exception):
    """A request the relay refuses; becomes an ERROR with ``code`` and ``text``."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Grant:
    """An allocation for the pair (requester, peer): the port each of them sends to, and its lifetime
    (seconds of idleness after which the relay releases it)."""

    requester_port: int
    peer_port: int
    lifetime: int


class RelayHandler(Protocol):
    """What the control server asks the relay to do (implemented by :class:`~kubespan.relay.service.RelayService`).
    Both raise :class:`Refusal` to answer with an ERROR."""

    async def allocate(self, requester: PublicKey, peer: PublicKey) -> Grant: ...

    async def release(self, requester: PublicKey, peer: PublicKey) -> bool: ...


@dataclass
class ServerCounters:
    requests: dict[str, int]
    refused: dict[str, int]
    malformed: int = 0
    notify_sent: int = 0
    notify_acked: int = 0
    notify_failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(sorted(self.requests.items())),
            "refused": dict(sorted(self.refused.items())),
            "malformed": self.malformed,
            "notify_sent": self.notify_sent,
            "notify_acked": self.notify_acked,
            "notify_failed": self.notify_failed,
        }


class ControlServer:
    """The relay's control server on ``(host, port)``, ``host`` being its mesh address.

    ``who(source_ip)`` names the peer behind a source mesh address (None: refused); ``where(key)`` is
    where that peer's client listens (``(mesh address, CLIENT_PORT)``), for NOTIFY. ``device`` is the mesh
    link: give it, or Linux's weak host model lets a neighbour on another link reach the mesh address with
    a forged source and pass as a peer (the tunnel authenticates only what came through it). A NOTIFY is sent
    ``notify_attempts`` times, ``notify_interval`` seconds apart, until a NOTIFIED with its request id
    comes back. At most ``max_inflight`` requests are handled at once; more are dropped (the client
    retries)."""

    def __init__(
        self,
        host: str,
        handler: RelayHandler,
        who: Callable[[str], PublicKey | None],
        where: Callable[[PublicKey], Address | None],
        *,
        port: int = CONTROL_PORT,
        device: str | None = None,
        notify_interval: float = 0.5,
        notify_attempts: int = 10,
        max_inflight: int = 64,
    ) -> None:
        self.host = _check_bind_host(host)
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, not {port}")
        if notify_interval <= 0 or notify_attempts < 1:
            raise ValueError(
                f"notify_interval must be positive and notify_attempts at least 1, not "
                f"{notify_interval} and {notify_attempts}"
            )
        self.port = port
        self.device = device
        self.handler = handler
        self.who = who
        self.where = where
        self.notify_interval = notify_interval
        self.notify_attempts = notify_attempts
        self.max_inflight = max_inflight
        self.counters = ServerCounters({}, {})
        self._endpoint: _Endpoint | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._acks: dict[int, tuple[str, asyncio.Future[None]]] = {}  # NOTIFY id -> (target, acked)

    @property
    def address(self) -> Address:
        """The bound address (the port is the kernel's choice when started with port 0)."""
        if self._endpoint is None or self._endpoint.transport is None:
            raise RuntimeError("control server is not started")
        sockname = self._endpoint.transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    async def start(self) -> None:
        if self._endpoint is not None:
            raise RuntimeError("control server already started")
        self._endpoint = await _open(self.host, self.port, self.device, self._on_datagram)
        log_event(log, "relay control server started", addr=f"{self.host}:{self.address[1]}")

    async def stop(self) -> None:
        """Close the socket and cancel requests and NOTIFYs in flight."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            await endpoint.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._acks.clear()

    def status(self) -> dict[str, Any]:
        return self.counters.as_dict()

    # -- internals ---------------------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1

    def _send(self, msg: Message, addr: Any) -> None:
        if self._endpoint is not None and self._endpoint.transport is not None:
            self._endpoint.transport.sendto(encode(msg), addr)

    def _error(self, rid: int, code: ErrorCode, text: str, addr: Any) -> None:
        self._refuse(code.name.lower())
        clipped = text.encode("utf-8")[:MAX_TEXT].decode("utf-8", "ignore")
        self._send(Message(MsgType.ERROR, rid, code=code, text=clipped), addr)

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        try:
            msg = decode(data)
        except DecodeError as e:
            self.counters.malformed += 1
            log.debug("relay control: malformed datagram from %s: %s", addr[0], e)
            return
        if msg.type == MsgType.NOTIFIED:
            ack = self._acks.get(msg.request_id)
            if ack is not None and _same_host(ack[0], addr[0]) and not ack[1].done():
                ack[1].set_result(None)
            return
        if msg.type not in _REQUESTS:
            # never answered: an answer to an answer could loop between two relays' servers
            self._refuse("not_a_request")
            return
        requester = self.who(addr[0])
        if requester is None:
            self._error(msg.request_id, ErrorCode.UNKNOWN_SOURCE, f"{addr[0]} is not a known peer", addr)
            return
        self.counters.requests[msg.type.name] = self.counters.requests.get(msg.type.name, 0) + 1
        if msg.type == MsgType.PING:
            self._send(Message(MsgType.PONG, msg.request_id), addr)
            return
        if len(self._tasks) >= self.max_inflight:
            self._refuse("busy")
            return
        self._spawn(self._handle(msg, requester, addr))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Message, requester: PublicKey, addr: Any) -> None:
        assert msg.peer is not None
        peer = msg.peer
        try:
            if msg.type == MsgType.RELEASE:
                await self.handler.release(requester, peer)
                self._send(Message(MsgType.RELEASED, msg.request_id, peer=peer), addr)
                return
            if peer == requester:
                raise Refusal(ErrorCode.UNKNOWN_PEER, "the peer is the requester itself")
            target = self.where(peer)
            if target is None:
                raise Refusal(ErrorCode.UNKNOWN_PEER, f"peer {peer.b64} is not known to this relay")
            grant = await self.handler.allocate(requester, peer)
        except Refusal as r:
            self._error(msg.request_id, r.code, r.text, addr)
            return
        except Exception as e:  # the handler's bug must not kill the server
            log.exception("relay control: handling %s failed", msg.type.name)
            self._error(msg.request_id, ErrorCode.INTERNAL, f"internal error: {type(e).__name__}", addr)
            return
        self._send(
            Message(
                MsgType.ALLOCATED,
                msg.request_id,
                peer=peer,
                port=grant.requester_port,
                lifetime=grant.lifetime,
            ),
            addr,
        )
        notice = Message(
            MsgType.NOTIFY, _new_request_id(), peer=requester, port=grant.peer_port, lifetime=grant.lifetime
        )
        await self._notify(notice, target)

    async def _notify(self, notice: Message, target: Address) -> None:
        """Send ``notice`` until acknowledged or the attempts run out."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[notice.request_id] = (target[0], fut)
        try:
            for _ in range(self.notify_attempts):
                self.counters.notify_sent += 1
                self._send(notice, target)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), self.notify_interval)
                    self.counters.notify_acked += 1
                    return
            self.counters.notify_failed += 1
            log_event(log, "relay notify unacknowledged", to=target[0], attempts=self.notify_attempts)
        finally:
            self._acks.pop(notice.request_id, None)


# -- client -----------------------------------------------------------------------------------------


class ControlError(Exception):
    """A relay request failed."""


class RelayTimeout(ControlError):
    """The relay did not answer in time (down, not a relay, or unreachable): time to fail over."""


class RelayRefused(ControlError):
    """The relay answered with an ERROR."""

    def __init__(self, code: int, text: str) -> None:
        name = ErrorCode(code).name.lower() if code in ErrorCode._value2member_map_ else f"code {code}"
        super().__init__(f"relay refused: {name}: {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Notice:
    """A relay's NOTIFY: ``relay`` (the sender, by its mesh address) made an allocation with ``peer``;
    send to the relay's public address at ``port``."""

    relay: PublicKey
    relay_addr: str
    peer: PublicKey
    port: int
    lifetime: int


@dataclass(frozen=True)
class Allocated:
    """The answer to :meth:`RelayClient.allocate`: the port to send to on the relay, and its lifetime."""

    port: int
    lifetime: int


_SEEN_NOTICES = 64  # recent (relay address, request id) pairs: a retried NOTIFY is delivered once


class RelayClient:
    """A node's relay client on ``(host, port)``, ``host`` being its mesh address: requests to relays'
    control servers (at ``(relay mesh address, relay_port)``) and NOTIFY delivery.

    A NOTIFY from a source ``who`` does not know is ignored; from a known one it is acknowledged (every
    time, so the relay stops retrying) and handed to ``on_notify`` (once per NOTIFY). ``device``: the
    mesh link, as for :class:`ControlServer`."""

    def __init__(
        self,
        host: str,
        *,
        port: int = CLIENT_PORT,
        relay_port: int = CONTROL_PORT,
        device: str | None = None,
        who: Callable[[str], PublicKey | None] = lambda _addr: None,
        on_notify: Callable[[Notice], None] | None = None,
    ) -> None:
        self.host = _check_bind_host(host)
        self.port = port
        self.device = device
        self.relay_port = relay_port
        self.who = who
        self.on_notify = on_notify
        self._endpoint: _Endpoint | None = None
        self._pending: dict[int, tuple[str, asyncio.Future[Message]]] = {}  # id -> (relay, reply)
        self._seen: deque[tuple[str, int]] = deque(maxlen=_SEEN_NOTICES)
        self.notices = 0
        self.ignored = 0

    @property
    def address(self) -> Address:
        if self._endpoint is None or self._endpoint.transport is None:
            raise RuntimeError("relay client is not started")
        sockname = self._endpoint.transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    async def start(self) -> None:
        if self._endpoint is not None:
            raise RuntimeError("relay client already started")
        self._endpoint = await _open(self.host, self.port, self.device, self._on_datagram)

    async def stop(self) -> None:
        """Close the socket; requests in flight fail with ControlError."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            await endpoint.close()
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ControlError("relay client stopped"))
        self._pending.clear()

    async def allocate(
        self,
        relay: str,
        peer: PublicKey,
        timeout: float = 2.0,  # noqa: ASYNC109 (the resend schedule needs the deadline)
        *,
        retry: float = 0.5,
    ) -> Allocated:
        """Ask the relay at mesh address ``relay`` for an allocation with ``peer``. Resent every ``retry``
        seconds (the relay answers repeats with the same allocation); RelayTimeout after ``timeout``."""
        reply = await self._request(
            relay, Message(MsgType.ALLOCATE, _new_request_id(), peer=peer), timeout, retry
        )
        if reply.type != MsgType.ALLOCATED or reply.peer != peer:
            raise ControlError(f"relay answered ALLOCATE with {reply.type.name}")
        return Allocated(reply.port, reply.lifetime)

    async def release(
        self,
        relay: str,
        peer: PublicKey,
        timeout: float = 2.0,  # noqa: ASYNC109
        *,
        retry: float = 0.5,
    ) -> None:
        """Release this node's allocation with ``peer`` on ``relay`` (answered also when there is none)."""
        reply = await self._request(
            relay, Message(MsgType.RELEASE, _new_request_id(), peer=peer), timeout, retry
        )
        if reply.type != MsgType.RELEASED:
            raise ControlError(f"relay answered RELEASE with {reply.type.name}")

    async def ping(self, relay: str, timeout: float = 1.0) -> float:  # noqa: ASYNC109
        """The round-trip time to ``relay``'s control server in seconds (one PING; RelayTimeout when lost)."""
        t0 = time.monotonic()
        await self._request(relay, Message(MsgType.PING, _new_request_id()), timeout, timeout)
        return time.monotonic() - t0

    # -- internals ---------------------------------------------------------------------------------

    async def _request(
        self,
        relay: str,
        msg: Message,
        timeout: float,  # noqa: ASYNC109
        retry: float,
    ) -> Message:
        if self._endpoint is None or self._endpoint.transport is None:
            raise ControlError("relay client is not started")
        if timeout <= 0 or retry <= 0:
            raise ValueError(f"timeout and retry must be positive, not {timeout} and {retry}")
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg.request_id] = (relay, fut)
        data, target = encode(msg), (relay, self.relay_port)
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RelayTimeout(
                        f"no answer from relay {relay} to {msg.type.name} within {timeout:g} s"
                    )
                if self._endpoint is None or self._endpoint.transport is None:
                    raise ControlError("relay client stopped")
                self._endpoint.transport.sendto(data, target)
                with contextlib.suppress(TimeoutError):
                    reply = await asyncio.wait_for(asyncio.shield(fut), min(retry, left))
                    break
        finally:
            self._pending.pop(msg.request_id, None)
        if reply.type == MsgType.ERROR:
            raise RelayRefused(reply.code, reply.text)
        return reply

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        try:
            msg = decode(data)
        except DecodeError as e:
            self.ignored += 1
            log.debug("relay client: malformed datagram from %s: %s", addr[0], e)
            return
        if msg.type == MsgType.NOTIFY:
            self._on_notify(msg, addr)
            return
        pending = self._pending.get(msg.request_id)
        if (
            pending is None
            or not _same_host(pending[0], addr[0])
            or pending[1].done()
            or msg.type in _REQUESTS
            or msg.type == MsgType.NOTIFIED
        ):
            self.ignored += 1
            return
        pending[1].set_result(msg)

    def _on_notify(self, msg: Message, addr: Any) -> None:
        relay = self.who(addr[0])
        if relay is None or msg.peer is None:
            self.ignored += 1
            return
        ack = Message(MsgType.NOTIFIED, msg.request_id, peer=msg.peer, port=msg.port)
        if self._endpoint is not None and self._endpoint.transport is not None:
            self._endpoint.transport.sendto(encode(ack), addr)
        seen = (addr[0], msg.request_id)
        if seen in self._seen:
            return
        self._seen.append(seen)
        self.notices += 1
        log_event(log, "relay notify", relay=relay.b64, peer=msg.peer.b64, port=msg.port)
        if self.on_notify is not None:
            try:
                self.on_notify(Notice(relay, addr[0], msg.peer, msg.port, msg.lifetime))
            except Exception:
                log.exception("relay client: the NOTIFY callback failed")
