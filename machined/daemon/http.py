"""A tiny HTTP endpoint for probes and scrapers: ``/healthz``, ``/status`` (the mesh status as JSON,
the document ``kubespan status -o json`` reads), ``/metrics`` (Prometheus) and ``/``, the node's own
read-only page that polls ``/status`` (:mod:`kubespan.nodepage`, shared with ``kubespan run``).

Plain asyncio (HTTP/1.0, one request per connection, GET only): machined does not load a web
framework for a few read-only paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kubespan import nodepage

MAX_REQUEST = 8192


class StatusServer:
    def __init__(
        self,
        status: Callable[[], Any],
        healthy: Callable[[], bool],
        registry: CollectorRegistry,
    ) -> None:
        self.status = status
        self.healthy = healthy
        self.registry = registry
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def _route(self, path: str) -> tuple[int, str, bytes]:
        page = nodepage.lookup(path)
        if page is not None:
            return 200, *page
        if path == "/healthz":
            ok = self.healthy()
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"starting\n"
        if path == "/status":
            st = self.status()
            if st is None:
                return 503, "application/json", b'{"error":"starting"}'
            return 200, "application/json", json.dumps(st.as_dict(), default=str).encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method != "GET":
                code, ctype, body = 405, "text/plain", b"method not allowed\n"
            else:
                path = path.split("?", 1)[0]
                code, ctype, body = self._route(path)
            page = method == "GET" and path in nodepage.FILES
            extra = "".join(f"{k}: {v}\r\n" for k, v in nodepage.HEADERS.items()) if page else ""
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
            writer.write(
                f"HTTP/1.0 {code} {reason.get(code, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nDate: {formatdate(usegmt=True)}\r\n{extra}"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
