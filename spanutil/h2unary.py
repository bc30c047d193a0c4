"""A minimal, cheap HTTP/2 client for gRPC unary calls over cleartext (h2c): a load generator's tool.

Why: a Python grpc.aio client spends about as much CPU per call as the server it loads (a new
protobuf object, the client call machinery), so on a small machine it takes the cores the servers
would use and a benchmark measures the client. This client sends pre-built bytes: the request header
block is encoded once (HPACK static-table and literal fields only, so it never touches the server's
dynamic table) and a caller varies only the bytes of the message that change. Responses are parsed
only as far as needed: frame headers, and the header blocks (HPACK with its dynamic table, so the
server may index what it likes) to read ``:status`` and ``grpc-status``; a call succeeds only with
grpc-status 0. It answers SETTINGS and PING, returns flow-control credit (WINDOW_UPDATE) for what the
server sends, respects the server's send window and stream limit, and fails calls on RST_STREAM,
GOAWAY and connection loss (status :data:`NO_STATUS`).

Not a general gRPC client: no TLS, no deadlines, no compression, no streaming calls; a response
header name or grpc-status value that the server Huffman-codes is refused with :class:`H2Error`
(grpc-core sends them raw; other Huffman-coded values are skipped unread).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_STATUS = -1  # the call ended without a grpc-status (reset, GOAWAY, connection lost, bad :status)

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# SETTINGS identifiers.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5

MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535

# The HPACK static table (RFC 7541 Appendix A), index 1..61: (name, value).
STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(
    (n.encode(), v.encode())
    for n, v in (
        (":authority", ""),
        (":method", "GET"),
        (":method", "POST"),
        (":path", "/"),
        (":path", "/index.html"),
        (":scheme", "http"),
        (":scheme", "https"),
        (":status", "200"),
        (":status", "204"),
        (":status", "206"),
        (":status", "304"),
        (":status", "400"),
        (":status", "404"),
        (":status", "500"),
        ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"),
        ("accept-language", ""),
        ("accept-ranges", ""),
        ("accept", ""),
        ("access-control-allow-origin", ""),
        ("age", ""),
        ("allow", ""),
        ("authorization", ""),
        ("cache-control", ""),
        ("content-disposition", ""),
        ("content-encoding", ""),
        ("content-language", ""),
        ("content-length", ""),
        ("content-location", ""),
        ("content-range", ""),
        ("content-type", ""),
        ("cookie", ""),
        ("date", ""),
        ("etag", ""),
        ("expect", ""),
        ("expires", ""),
        ("from", ""),
        ("host", ""),
        ("if-match", ""),
        ("if-modified-since", ""),
        ("if-none-match", ""),
        ("if-range", ""),
        ("if-unmodified-since", ""),
        ("last-modified", ""),
        ("link", ""),
        ("location", ""),
        ("max-forwards", ""),
        ("proxy-authenticate", ""),
        ("proxy-authorization", ""),
        ("range", ""),
        ("referer", ""),
        ("refresh", ""),
        ("retry-after", ""),
        ("server", ""),
        ("set-cookie", ""),
        ("strict-transport-security", ""),
        ("transfer-encoding", ""),
        ("user-agent", ""),
        ("vary", ""),
        ("via", ""),
        ("www-authenticate", ""),
    )
)


class H2Error(Exception):
    """The server broke HTTP/2 or HPACK as far as this client understands them."""


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 9-byte header (24-bit length, type, flags, 31-bit stream id) and payload."""
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + stream_id.to_bytes(4, "big") + payload


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK integer (RFC 7541 5.1) with an N-bit prefix; ``first`` holds the pattern bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(s: bytes) -> bytes:
    return hpack_int(len(s), 7) + s  # H = 0: raw octets


def request_headers(authority: str, path: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """The HPACK block of a gRPC unary POST to ``path``: static-table references and literals
    "without indexing" only, so the same block is valid on every stream of every connection."""
    out = bytearray(b"\x83\x86")  # :method POST (static 3), :scheme http (static 6)
    out += hpack_int(4, 4) + _hpack_str(path.encode())  # :path, name static 4
    out += hpack_int(1, 4) + _hpack_str(authority.encode())  # :authority, name static 1
    out += hpack_int(31, 4) + _hpack_str(b"application/grpc")  # content-type, name static 31
    for name, value in (("te", "trailers"), *extra):
        out += b"\x00" + _hpack_str(name.lower().encode()) + _hpack_str(value.encode())
    return bytes(out)


def grpc_message(msg: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 32-bit length, the bytes."""
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def _read_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(block):
            raise H2Error("HPACK integer runs past the header block")
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 28:
            raise H2Error("HPACK integer too large")


class HpackDecoder:
    """HPACK decoding (RFC 7541) as far as a gRPC client needs: names and the few values it reads.

    Keeps the dynamic table. Decoded blocks that change nothing in the table are memoized per table
    generation, so a server repeating the same indexed fields costs one dict lookup per block."""

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size  # what we advertised (SETTINGS_HEADER_TABLE_SIZE)
        self.size_limit = max_size  # the encoder's current choice (<= max_size)
        self.table: collections.deque[tuple[bytes, bytes]] = collections.deque()  # newest first
        self.size = 0
        self.generation = 0
        self._memo: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 1 <= index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        i = index - len(STATIC_TABLE) - 1
        if 0 <= i < len(self.table):
            return self.table[i]
        raise H2Error(f"HPACK index {index} is not in the table")

    def _add(self, name: bytes, value: bytes) -> None:
        self.table.appendleft((name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self.size > self.size_limit and self.table:
            n, v = self.table.pop()
            self.size -= len(n) + len(v) + 32
        self.generation += 1
        self._memo.clear()

    def _string(self, block: bytes, pos: int, wanted: bool) -> tuple[bytes | None, int]:
        """(raw bytes, or None for a Huffman-coded string; next position). ``wanted``: the caller
        needs the value, so a Huffman-coded one is an error."""
        if pos >= len(block):
            raise H2Error("HPACK string runs past the header block")
        huffman = block[pos] & 0x80
        n, pos = _read_int(block, pos, 7)
        if pos + n > len(block):
            raise H2Error("HPACK string runs past the header block")
        if huffman:
            if wanted:
                raise H2Error("Huffman-coded header name or grpc-status: not supported by this client")
            return None, pos + n
        return bytes(block[pos : pos + n]), pos + n

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The fields of one complete header block, in order. Values this client does not read may
        come back as b"?" when Huffman-coded."""
        memo = self._memo.get(block)
        if memo is not None:
            return memo
        out: list[tuple[bytes, bytes]] = []
        changed = False
        pos, end = 0, len(block)
        while pos < end:
            b = block[pos]
            if b & 0x80:  # indexed field
                index, pos = _read_int(block, pos, 7)
                if index == 0:
                    raise H2Error("HPACK index 0")
                out.append(self._entry(index))
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                size, pos = _read_int(block, pos, 5)
                if size > self.max_size:
                    raise H2Error(f"HPACK table size update {size} above our {self.max_size}")
                self.size_limit = size
                self._evict()
                changed = True
                continue
            indexing = b & 0xC0 == 0x40
            index, pos = _read_int(block, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                raw, pos = self._string(block, pos, wanted=True)
                assert raw is not None
                name = raw
            value, pos = self._string(block, pos, wanted=name in (b":status", b"grpc-status"))
            if value is None:
                if indexing:
                    raise H2Error(f"Huffman-coded value of indexed field {name!r}: not supported")
                value = b"?"
            out.append((name, value))
            if indexing:
                self._add(name, value)
                changed = True
        if not changed and len(self._memo) < 256:
            self._memo[bytes(block)] = out
        return out


Done = Callable[[int], None]


class _Stream:
    __slots__ = ("done", "http_ok", "status")

    def __init__(self, done: Done) -> None:
        self.done = done
        self.status = NO_STATUS
        self.http_ok = False


class H2UnaryConnection(asyncio.Protocol):
    """One HTTP/2 connection carrying many concurrent gRPC unary calls. Use :meth:`connect`."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.transport: asyncio.Transport | None = None
        self.decoder = HpackDecoder()
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.send_window = DEFAULT_WINDOW  # connection-level credit the server gave us
        self.peer_stream_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.peer_max_streams = 1 << 31
        self.received = 0  # DATA octets since our last WINDOW_UPDATE
        self.pending: collections.deque[tuple[bytes, bytes, Done]] = collections.deque()
        self.closed: Exception | None = None
        self.goaway = False
        self._buf = bytearray()
        self._out = bytearray()
        self._flush_scheduled = False
        self._cont: tuple[int, int, bytes] | None = None  # (stream id, END_STREAM, block so far)
        self._lost: asyncio.Future[None] | None = None

    @classmethod
    async def connect(cls, host: str, port: int) -> H2UnaryConnection:
        """Open a connection and send the preface; the server's SETTINGS are read as they come."""
        loop = asyncio.get_running_loop()
        conn = cls(f"{host}:{port}")
        conn._lost = loop.create_future()
        await loop.create_connection(lambda: conn, host, port)
        return conn

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        settings = b"".join(
            k.to_bytes(2, "big") + v.to_bytes(4, "big")
            for k, v in ((ENABLE_PUSH, 0), (INITIAL_WINDOW_SIZE, MAX_WINDOW), (HEADER_TABLE_SIZE, 4096))
        )
        transport.write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(exc or ConnectionError("connection closed"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, n = 0, len(buf)
        try:
            while n - pos >= 9:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if n - pos < 9 + length:
                    break
                ftype, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame(ftype, flags, sid, payload)
        except H2Error as e:
            del buf[:pos]
            self._protocol_error(e)
            return
        del buf[:pos]
        if self.received >= 1 << 30:
            self._send(frame(WINDOW_UPDATE, 0, 0, self.received.to_bytes(4, "big")))
            self.received = 0

    # -- frames in ---------------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._cont is not None and ftype != CONTINUATION:
            raise H2Error("expected CONTINUATION")
        if ftype == DATA:
            self.received += len(payload)
            if flags & END_STREAM:
                self._finish(sid)
        elif ftype == HEADERS:
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1 : len(payload) - pad]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._headers(sid, flags, payload)
        elif ftype == CONTINUATION:
            if self._cont is None or self._cont[0] != sid:
                raise H2Error("unexpected CONTINUATION")
            _, end_stream, block = self._cont
            self._cont = None
            self._headers(sid, end_stream | flags, block + payload)
        elif ftype == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self._send(frame(SETTINGS, ACK, 0))
        elif ftype == PING:
            if not flags & ACK:
                self._send(frame(PING, ACK, 0, payload))
        elif ftype == WINDOW_UPDATE:
            if sid == 0:
                self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                self._drain()
        elif ftype == RST_STREAM:
            st = self.streams.pop(sid, None)
            if st is not None:
                st.done(NO_STATUS)
                self._drain()
        elif ftype == GOAWAY:
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            self.goaway = True
            for s in [s for s in self.streams if s > last]:
                self.streams.pop(s).done(NO_STATUS)
            self._fail_pending()
        elif ftype == PUSH_PROMISE:
            raise H2Error("PUSH_PROMISE though we disabled push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == INITIAL_WINDOW_SIZE:
                self.peer_stream_window = value
            elif key == MAX_FRAME_SIZE:
                self.peer_max_frame = value
            elif key == MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
        self._drain()

    def _headers(self, sid: int, flags: int, payload: bytes) -> None:
        if not flags & END_HEADERS:
            self._cont = (sid, flags & END_STREAM, payload)
            return
        fields = self.decoder.decode(payload)  # always: it may change the dynamic table
        st = self.streams.get(sid)
        if st is None:
            return
        for name, value in fields:
            if name == b"grpc-status":
                try:
                    st.status = int(value)
                except ValueError:
                    raise H2Error(f"grpc-status {value!r} is not a number") from None
            elif name == b":status":
                st.http_ok = value == b"200"
        if flags & END_STREAM:
            self._finish(sid)

    def _finish(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is not None:
            st.done(st.status if st.http_ok else NO_STATUS)
            self._drain()

    # -- calls out ---------------------------------------------------------------------------------

    def start_call(self, header_block: bytes, body: bytes | bytearray, done: Done) -> None:
        """Send one unary call: ``header_block`` from :func:`request_headers`, ``body`` a gRPC
        length-prefixed message (:func:`grpc_message`; copied at once, so a caller may reuse its
        buffer). ``done(grpc_status)`` runs once, from the event loop, with the server's grpc-status
        or :data:`NO_STATUS`. A call waits (in order) while the server's stream limit is reached or
        its connection window is smaller than the whole body."""
        if self.closed is not None or self.goaway:
            done(NO_STATUS)
            return
        if self.pending or not self._can_send(len(body)):
            self.pending.append((header_block, bytes(body), done))
            return
        self._write_call(header_block, body, done)

    def _can_send(self, size: int) -> bool:
        if size > self.peer_stream_window:
            raise ValueError(f"request body of {size} bytes exceeds the server's stream window")
        return size <= self.send_window and len(self.streams) < self.peer_max_streams

    def _write_call(self, header_block: bytes, body: bytes | bytearray, done: Done) -> None:
        sid = self.next_id
        if sid > MAX_WINDOW:
            self.goaway = True  # stream ids exhausted: this connection takes no more calls
            done(NO_STATUS)
            return
        self.next_id = sid + 2
        self.streams[sid] = _Stream(done)
        self.send_window -= len(body)
        sidb = sid.to_bytes(4, "big")
        out = self._out
        out += len(header_block).to_bytes(3, "big") + bytes((HEADERS, END_HEADERS)) + sidb
        out += header_block
        step = self.peer_max_frame
        for i in range(0, len(body), step):
            chunk = body[i : i + step]
            last = i + step >= len(body)
            out += len(chunk).to_bytes(3, "big") + bytes((DATA, END_STREAM if last else 0)) + sidb
            out += chunk
        if not body:
            out += frame(DATA, END_STREAM, sid)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _drain(self) -> None:
        while self.pending and self.closed is None and not self.goaway:
            hb, body, done = self.pending[0]
            if not self._can_send(len(body)):
                return
            self.pending.popleft()
            self._write_call(hb, body, done)
        if self.goaway:
            self._fail_pending()

    def _send(self, data: bytes) -> None:
        self._out += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and self.closed is None:
            self.transport.write(bytes(self._out))
        self._out.clear()

    def _fail_pending(self) -> None:
        while self.pending:
            self.pending.popleft()[2](NO_STATUS)

    def _fail_all(self, exc: Exception) -> None:
        if self.closed is None:
            self.closed = exc
        streams, self.streams = self.streams, {}
        for st in streams.values():
            st.done(NO_STATUS)
        self._fail_pending()

    def _protocol_error(self, e: H2Error) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.write(frame(GOAWAY, 0, 0, b"\x00\x00\x00\x00" + (1).to_bytes(4, "big")))
            self.transport.close()
        self._fail_all(e)

    # -- conveniences ---------------------------------------------------------------------------------

    async def call(self, path: str, message: bytes) -> int:
        """One unary call; its grpc-status (or :data:`NO_STATUS`). For tests and one-offs."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def done(status: int) -> None:
            if not fut.done():
                fut.set_result(status)

        self.start_call(request_headers(self.authority, path), grpc_message(message), done)
        return await fut

    async def close(self) -> None:
        """Send GOAWAY and close; calls still in flight end with :data:`NO_STATUS`."""
        if self.transport is None:
            return
        self._flush()
        if not self.transport.is_closing():
            self.transport.write(frame(GOAWAY, 0, 0, b"\x00\x00\x00\x00" * 2))
            self.transport.close()
        if self._lost is not None:
            await self._lost


class CountingBody:
    """A caller's request body for :func:`closed_loop`: one gRPC-framed message, built once, whose 8
    bytes at ``offset`` (an offset into ``message``) hold a big-endian counter bumped on every call,
    so every call sends different bytes at the cost of one slice assignment."""

    def __init__(self, message: bytes, offset: int) -> None:
        if not 0 <= offset <= len(message) - 8:
            raise ValueError(f"offset {offset} leaves no 8 bytes in a {len(message)}-byte message")
        self.buf = bytearray(grpc_message(message))
        self.offset = offset + 5
        self.calls = 0

    def __call__(self) -> bytearray:
        self.calls += 1
        self.buf[self.offset : self.offset + 8] = self.calls.to_bytes(8, "big")
        return self.buf

    @property
    def message(self) -> bytes:
        """The message as last sent."""
        return bytes(self.buf[5:])


@dataclass
class LoadResult:
    """What a closed-loop run saw: grpc-status -> count, and its wall time."""

    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses[0]

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 0)


async def closed_loop(
    conns: Sequence[H2UnaryConnection],
    path: str,
    bodies: Sequence[Callable[[], bytes | bytearray]],
    seconds: float,
) -> LoadResult:
    """Run one caller per entry of ``bodies`` (spread round-robin over ``conns``): each sends a call
    to ``path`` (e.g. "/pkg.Service/Method"),
    and when it ends sends the next (``bodies[i]()`` gives its body), until ``seconds`` have passed;
    then waits for the calls in flight. No task or future per call: completions chain in callbacks."""
    loop = asyncio.get_running_loop()
    result = LoadResult()
    statuses = result.statuses
    finished: asyncio.Future[None] = loop.create_future()
    active = len(bodies)
    start = time.monotonic()
    deadline = start + seconds

    blocks = {id(c): request_headers(c.authority, path) for c in conns}

    def caller(conn: H2UnaryConnection, next_body: Callable[[], bytes | bytearray]) -> Done:
        header_block = blocks[id(conn)]

        def done(status: int) -> None:
            nonlocal active
            statuses[status] += 1
            if time.monotonic() < deadline and conn.closed is None and not conn.goaway:
                conn.start_call(header_block, next_body(), done)
                return
            active -= 1
            if active == 0 and not finished.done():
                finished.set_result(None)

        return done

    if not bodies:
        return result
    for i, nb in enumerate(bodies):
        conn = conns[i % len(conns)]
        conn.start_call(blocks[id(conn)], nb(), caller(conn, nb))
    await finished
    result.seconds = time.monotonic() - start
    return result
