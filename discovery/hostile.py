"""Hostile and bulk clients of the discovery service: test and benchmark support only.

Nothing in the product imports this module. It drives a real ``discovery-service`` the way an
abusive client would, so that tests and benchmarks can check the server's bounds:

* :func:`open_stalled_watches` opens Watch streams over raw HTTP/2 (a minimal framer written here,
  no HTTP/2 library) with a huge flow-control window, then never reads the socket again: the
  server's writes pile up wherever they can (its send queue, grpc-core's write buffers, the
  kernel's socket buffers);
* :func:`fill_cluster` fills a cluster with affiliates of a chosen size (the largest by default),
  so that every Watch starts with a multi-megabyte snapshot;
* :class:`FreezableProxy` is a loopback TCP proxy that can stop forwarding without closing
  anything: to the server, its clients look like they sit behind a link that went down (half-open
  connections: no FIN, no RST, no answer to pings).

Rate limiting is per client IP: fill a cluster against a server started with ``--rate-limit 0``,
or pass ``sources`` (loopback addresses) so the updates come from many addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Iterable, Sequence

from discovery.limits import AFFILIATE_DATA_MAX, ENDPOINT_MAX, ENDPOINTS_PER_AFFILIATE_MAX
from spanutil.hostport import split_host_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WATCH_PATH = "/sidero.discovery.server.Cluster/Watch"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, SETTINGS, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x2, 0x4, 0x5
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65_535


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
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


def hpack(headers: Iterable[tuple[str, str]]) -> bytes:
    """A header block of literal fields without indexing (no Huffman, no dynamic table)."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return bytes(out)


def grpc_message(body: bytes) -> bytes:
    """The gRPC length-prefixed framing of one uncompressed message."""
    return b"\x00" + struct.pack(">I", len(body)) + body


def watch_request(cluster_id: str) -> bytes:
    """A serialized ``WatchRequest`` (field 1, string)."""
    return _pb_string(1, cluster_id.encode())


def _pb_string(field: int, value: bytes) -> bytes:
    n = len(value)
    varint = bytearray()
    while n > 0x7F:
        varint.append((n & 0x7F) | 0x80)
        n >>= 7
    varint.append(n)
    return bytes(((field << 3) | 2,)) + bytes(varint) + value


def split_addr(addr: str) -> tuple[str, int]:
    """``127.0.0.1:3000`` / ``[::1]:3000`` → (host, port)."""
    return split_host_port(addr)


def _read_server_settings(sock: socket.socket, timeout: float) -> None:
    """Read up to and including the server's first (non-ACK) SETTINGS frame, then stop reading."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        while len(buf) < 9:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("server closed the connection before its SETTINGS")
            buf += chunk
        length = int.from_bytes(buf[:3], "big")
        while len(buf) < 9 + length:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("server closed the connection before its SETTINGS")
            buf += chunk
        kind, flags = buf[3], buf[4]
        buf = buf[9 + length :]
        if kind == SETTINGS and not flags & ACK:
            return


def open_stalled_connection(
    addr: str,
    cluster_id: str,
    streams: int = 1,
    *,
    source: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    rcvbuf: int | None = 4096,
    timeout: float = 10.0,
) -> socket.socket:
    """One HTTP/2 connection carrying ``streams`` Watch calls that will never be read.

    The client advertises the largest flow-control window (per stream and for the connection) and
    frame size, acknowledges the server's SETTINGS (the one thing it reads) and sends the requests;
    afterwards nothing is read. ``source`` binds a local address (any 127.x.y.z works on Linux
    loopback, so one test can look like many client IPs); ``headers`` adds request metadata
    (``x-real-ip`` for a server that trusts the loopback as a proxy); a small ``rcvbuf`` keeps the
    local kernel from soaking up what the server sends, as a remote attacker's kernel would.
    """
    host, port = split_addr(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
        settings = struct.pack(
            ">HIHIHI",
            SETTINGS_ENABLE_PUSH,
            0,
            SETTINGS_INITIAL_WINDOW_SIZE,
            MAX_WINDOW,
            SETTINGS_MAX_FRAME_SIZE,
            (1 << 24) - 1,
        )
        sock.sendall(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
        )
        _read_server_settings(sock, timeout)
        out = bytearray(frame(SETTINGS, ACK, 0))
        body = grpc_message(watch_request(cluster_id))
        block = hpack(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", WATCH_PATH),
                (":authority", addr),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *headers,
            ]
        )
        for i in range(streams):
            sid = 1 + 2 * i
            out += frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, body)
        sock.sendall(out)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def open_stalled_watches(
    addr: str,
    cluster_id: str,
    n: int,
    *,
    streams_per_connection: int = 1,
    source: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    rcvbuf: int | None = 4096,
) -> list[socket.socket]:
    """Open ``n`` Watch streams on ``cluster_id`` that are never read; return their sockets.

    One connection per stream by default (each with its own TCP buffers: the worst case for the
    server); ``streams_per_connection`` multiplexes them instead. Close the sockets to end the
    attack (:func:`close_all`).
    """
    socks: list[socket.socket] = []
    try:
        left = n
        while left > 0:
            k = min(left, streams_per_connection)
            socks.append(
                open_stalled_connection(addr, cluster_id, k, source=source, headers=headers, rcvbuf=rcvbuf)
            )
            left -= k
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: Iterable[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def affiliate_request(
    cluster_id: str,
    affiliate_id: str,
    data_size: int,
    endpoints: int = 64,
    endpoint_size: int = 32,
    ttl: int = 1800,
) -> object:
    """An ``AffiliateUpdateRequest`` with random data and endpoint blobs of the given sizes."""
    from spanapi.discovery.server import cluster_pb2 as pb

    req = pb.AffiliateUpdateRequest(
        cluster_id=cluster_id,
        affiliate_id=affiliate_id,
        affiliate_endpoints=[os.urandom(endpoint_size) for _ in range(endpoints)],
    )
    if data_size:
        req.affiliate_data = os.urandom(data_size)
    req.ttl.seconds = ttl
    return req


async def fill_cluster(
    target: str,
    cluster_id: str,
    n: int,
    sources: Sequence[str] = (),
    data_size: int = AFFILIATE_DATA_MAX,
    *,
    width: int = 64,
) -> int:
    """Publish ``n`` affiliates (``fill-0`` ...) of ``data_size`` bytes of data and the most
    endpoints of the largest size (with the defaults, a full cluster of 1,024 is ~4.3 MiB per
    snapshot), ``width`` calls at a time. Returns how many updates were acknowledged.

    With ``sources`` the calls are spread over those loopback addresses (one
    :class:`FreezableProxy` bound to each), so the per-IP rate limit does not make set-up take
    minutes; a call refused with RESOURCE_EXHAUSTED is retried for about ten seconds.
    """
    import grpc

    from spanapi.discovery.server import cluster_pb2_grpc as rpc

    done = 0
    relays = [await FreezableProxy(target, source=ip).start() for ip in sources]
    chans = [grpc.aio.insecure_channel(r.addr) for r in relays] or [grpc.aio.insecure_channel(target)]
    try:
        stubs = [rpc.ClusterStub(c) for c in chans]
        sem = asyncio.Semaphore(width)

        async def one(i: int) -> None:
            nonlocal done
            req = affiliate_request(
                cluster_id, f"fill-{i}", data_size, ENDPOINTS_PER_AFFILIATE_MAX, ENDPOINT_MAX
            )
            async with sem:
                for attempt in range(20):
                    try:
                        await stubs[i % len(stubs)].AffiliateUpdate(req, timeout=10)
                        done += 1
                        return
                    except grpc.aio.AioRpcError as e:
                        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 19:
                            raise
                        await asyncio.sleep(0.5)

        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in chans:
            await c.close()
        for r in relays:
            await r.close()
    return done


class FreezableProxy:
    """A loopback TCP proxy to ``target`` whose :meth:`freeze` stops forwarding in both directions
    without closing a socket (the kernel keeps acknowledging what it buffers, so only
    application-level liveness checks such as HTTP/2 pings can notice). With ``source`` its
    upstream sockets are bound to that loopback address, so a gRPC client (which cannot choose
    its source address) reaches the server as another client IP. Use in a running loop::

        proxy = await FreezableProxy(server.target).start()
        ... connect to proxy.addr ...
        proxy.freeze()
        ...
        await proxy.close()
    """

    def __init__(self, target: str, source: str | None = None) -> None:
        self.upstream = split_addr(target)
        self.source = source
        self.addr = ""
        self.connections = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.addr = f"127.0.0.1:{port}"
        return self

    def freeze(self) -> None:
        """Stop forwarding (in both directions); nothing is closed."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        local = (self.source, 0) if self.source else None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream, local_addr=local)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                if not data:
                    break
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError):
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in self._writers:
            with contextlib.suppress(OSError):
                w.close()
        self._writers.clear()
