"""A small asyncio HTTP/1.1 server for a handful of fixed read-only pages (standard library only).

``kubespan run`` serves ``/status``, ``/metrics``, ``/healthz`` and its node page on a local address.
aiohttp did that before, but importing aiohttp.web cost each agent ~0.14 s of CPU at start, and N agents
start at once in a cold start (issue 18). This server does only what those pages need: GET and HEAD on
exact paths (the query string is ignored for routing; the path is matched as sent, without
percent-decoding), HTTP/1.0 and 1.1 with keep-alive, and nothing else.

Limits, so that a client cannot hold resources for ever: request line + headers at most
:data:`MAX_HEAD` bytes and :data:`MAX_HEADERS` headers (else 431), a request body of at most
:data:`MAX_BODY` bytes read and discarded (else 413), no chunked request bodies (501), headers
complete within ``header_timeout`` of their first byte, an idle keep-alive connection closed after
``idle_timeout``, and at most ``max_connections`` open connections (new ones beyond are closed at once).
A handler that raises gets a 500 (the error goes to the log, never to the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spanutil.logs import log_event

log = logging.getLogger("spanutil.minihttp")

MAX_HEAD = 16 * 1024  # request line + headers + the blank line, bytes
MAX_HEADERS = 100
MAX_BODY = 4096  # a request body up to this is read and discarded; a longer one gets 413
METHODS = ("GET", "HEAD")
ALLOW = ", ".join(METHODS)
TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class Request:
    """One parsed request: ``path`` without the query string, header names in lower case."""

    method: str
    path: str
    query: str
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Response:
    """What a handler returns; Content-Length and Connection are added by the server."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        """``data`` as a JSON document (the same bytes aiohttp's json_response sent)."""
        return cls(status, json.dumps(data).encode(), {"Content-Type": JSON})

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), {"Content-Type": TEXT})


Handler = Callable[[Request], Awaitable[Response]]


class _Refuse(Exception):
    """A request the server answers itself with ``status`` and then closes the connection."""

    def __init__(self, status: int, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.headers = dict(headers or {})


def _error(status: int, headers: Mapping[str, str] | None = None) -> Response:
    """The server's own error page: ``404: Not Found`` as text, like aiohttp's."""
    return Response(
        status,
        f"{status}: {REASONS.get(status, 'Error')}".encode(),
        {"Content-Type": TEXT, **(headers or {})},
    )


def parse_head(head: bytes) -> tuple[Request, int]:
    """The request in ``head`` (request line and headers, CRLF-separated, without the blank line) and
    its body length; raises :class:`_Refuse` with the status to answer for a request we do not serve."""
    lines = head.decode("latin-1").split("\r\n")
    while lines and not lines[0]:  # a client may send a stray CRLF before a request (RFC 9112 2.2)
        lines.pop(0)
    if not lines:
        raise _Refuse(400)
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _Refuse(400)
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Refuse(505 if version.startswith("HTTP/") else 400)
    if len(lines) - 1 > MAX_HEADERS:
        raise _Refuse(431)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name or "\t" in name:
            raise _Refuse(400)
        key = name.lower()
        value = value.strip(" \t")
        if key == "content-length" and key in headers and headers[key] != value:
            raise _Refuse(400)
        headers[key] = f"{headers[key]}, {value}" if key in headers and key != "content-length" else value
    if "transfer-encoding" in headers:
        raise _Refuse(501)
    length = headers.get("content-length", "0")
    if not length.isdigit() or not length.isascii():
        raise _Refuse(400)
    if int(length) > MAX_BODY:
        raise _Refuse(413)
    if not target.startswith("/"):
        raise _Refuse(400)
    path, _, query = target.partition("?")
    return Request(method, path, query, version, headers), int(length)


def _keep_alive(req: Request) -> bool:
    tokens = {t.strip().lower() for t in req.headers.get("connection", "").split(",")}
    if req.version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def _encode(resp: Response, *, head_only: bool, keep_alive: bool, version: str) -> bytes:
    lines = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, '')}"]
    for name, value in resp.headers.items():
        if name.lower() not in ("content-length", "connection", "transfer-encoding"):
            lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(resp.body)}")
    lines.append(time.strftime("Date: %a, %d %b %Y %H:%M:%S GMT", time.gmtime()))
    if not keep_alive:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body


class Server:
    """Serves ``routes`` (exact path -> async handler) on one TCP address between :meth:`start` and
    :meth:`stop`. Every route answers GET and HEAD; other methods get 405, other paths 404."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        max_connections: int = 64,
        idle_timeout: float = 30.0,
        header_timeout: float = 10.0,
    ) -> None:
        self.routes = dict(routes)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._stopping = False

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def connections(self) -> int:
        """How many connections are open now."""
        return len(self._conns)

    @property
    def port(self) -> int:
        """The bound TCP port (useful after starting on port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port``; on failure (address in use...) it raises and the server stays stopped."""
        if self._server is not None:
            raise RuntimeError("server already started")
        self._stopping = False
        self._server = await asyncio.start_server(
            self._connection, host, port, reuse_address=True, limit=MAX_HEAD
        )

    async def stop(self) -> None:
        """Close the listener and every open connection (in-flight requests are cancelled); idempotent."""
        server, self._server = self._server, None
        self._stopping = True
        if server is not None:
            server.close()
        tasks = list(self._conns)
        for task, writer in list(self._conns.items()):
            writer.transport.abort()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._stopping or len(self._conns) >= self.max_connections:
            writer.transport.abort()
            return
        self._conns[task] = writer
        try:
            await self._requests(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away, or was too slow: nothing to answer
        finally:
            self._conns.pop(task, None)
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until it is to close."""
        first = True
        while True:
            # the first byte of a request within the idle timeout (the header timeout on a new
            # connection), then the rest of its head within the header timeout
            wait = self.header_timeout if first else self.idle_timeout
            first = False
            try:
                start = await asyncio.wait_for(reader.readexactly(1), wait)
            except asyncio.IncompleteReadError:
                return
            try:
                rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
            except asyncio.LimitOverrunError:
                await self._send(writer, _error(431), head_only=False, keep_alive=False, version="HTTP/1.1")
                return
            head = start + rest[:-4]
            if len(head) + 4 > MAX_HEAD:
                await self._send(writer, _error(431), head_only=False, keep_alive=False, version="HTTP/1.1")
                return
            try:
                req, length = parse_head(head)
            except _Refuse as e:
                await self._send(
                    writer, _error(e.status, e.headers), head_only=False, keep_alive=False, version="HTTP/1.1"
                )
                return
            if length:
                await asyncio.wait_for(reader.readexactly(length), self.header_timeout)  # discarded
            keep = _keep_alive(req)
            await self._send(
                writer,
                await self._answer(req),
                head_only=req.method == "HEAD",
                keep_alive=keep,
                version=req.version,
            )
            if not keep:
                return

    async def _answer(self, req: Request) -> Response:
        handler = self.routes.get(req.path)
        if handler is None:
            return _error(404)
        if req.method not in METHODS:
            return _error(405, {"Allow": ALLOW})
        try:
            return await handler(req)
        except Exception as e:  # the handler's bug: the client gets a bare 500, the log the cause
            log_event(
                log, "http handler failed", logging.ERROR, path=req.path, error=f"{type(e).__name__}: {e}"
            )
            return _error(500)

    async def _send(
        self, writer: asyncio.StreamWriter, resp: Response, *, head_only: bool, keep_alive: bool, version: str
    ) -> None:
        writer.write(_encode(resp, head_only=head_only, keep_alive=keep_alive, version=version))
        await asyncio.wait_for(writer.drain(), self.idle_timeout)  # a client that does not read is dropped
