"""machined's status endpoint serves the node page (kubespan.nodepage) beside /status, /metrics and
/healthz: the same files as ``kubespan run``, a strict CSP, a Date header the page measures handshake
ages against, and nothing but GET."""

from __future__ import annotations

import asyncio
from email.utils import parsedate_to_datetime
from typing import Any

from prometheus_client import CollectorRegistry

from kubespan import nodepage
from machined.daemon.http import StatusServer


class _Status:
    def as_dict(self) -> dict[str, Any]:
        return {"nodename": "n1", "peers": []}


async def _request(port: int, line: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{line}\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(h.split(": ", 1) for h in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def test_node_page_is_served_with_csp_and_date() -> None:
    server = StatusServer(_Status, lambda: True, CollectorRegistry())
    await server.start("127.0.0.1", 0)
    try:
        assert server.port is not None
        code, headers, body = await _request(server.port, "GET /?refresh=2 HTTP/1.1")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert body == nodepage.lookup("/")[1]  # type: ignore[index]
        assert b"/static/node.js" in body
        assert headers["Content-Security-Policy"] == nodepage.CSP
        assert parsedate_to_datetime(headers["Date"]).tzinfo is not None
        for path, ctype in (("/static/node.js", "text/javascript"), ("/static/node.css", "text/css")):
            code, headers, body = await _request(server.port, f"GET {path} HTTP/1.1")
            assert code == 200 and headers["Content-Type"].startswith(ctype) and len(body) > 500
            assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere
        code, headers, body = await _request(server.port, "GET /status HTTP/1.1")
        assert (code, body) == (200, b'{"nodename": "n1", "peers": []}')
        assert "Content-Security-Policy" not in headers
        assert (await _request(server.port, "GET /static/../cli.py HTTP/1.1"))[0] == 404
        assert (await _request(server.port, "POST / HTTP/1.1"))[0] == 405
    finally:
        await server.close()
