"""The dashboard's web server (aiohttp): the static page, the view as JSON and as Server-Sent Events.

Routes: ``/`` the page; ``/static/{app.js,style.css}``; ``/api/view`` the current view model (JSON);
``/events`` an SSE stream: a ``view`` event (the whole view) at once, then after each change (at most
every ``min_interval`` s, so a busy mesh coalesces) a ``patch`` event with what changed
(:func:`~.model.diff_view`; a ``view`` again when the set of nodes changed), a comment line every 15 s
to keep proxies open. A reconnecting page starts again from a whole view.

Bound to a loopback address (the default), requests must name a loopback host in ``Host``: a page on
another site cannot reach the dashboard by DNS rebinding. Nothing is loaded from elsewhere (a CSP of
``'self'`` only): the page works offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from importlib import resources

from aiohttp import web

from . import model
from .agents import AgentCollector
from .collector import Collector

DEFAULT_PORT = 50080  # apid is 50000, trustd 50001; the dashboard's page is 50080 by default
DEFAULT_HOST = "127.0.0.1"
STATIC = ("index.html", "app.js", "style.css")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ListenError(ValueError):
    """A listen address the dashboard refuses (malformed, or not loopback without --allow-remote)."""


def parse_listen(addr: str | None) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT``, ``[V6]:PORT`` or a bare IPv6 address → (host, port);
    None → the default 127.0.0.1:50080. An empty host means every interface (Go's convention)."""
    if addr is None or addr == "":
        return DEFAULT_HOST, DEFAULT_PORT
    host, port_text = addr, ""
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise ListenError(f"--web {addr!r}: missing ']'")
        host, rest = addr[1:end], addr[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ListenError(f"--web {addr!r}: expected :PORT after ']'")
        port_text = rest[1:]
    elif addr.count(":") == 1:
        host, port_text = addr.split(":")
    if not port_text:
        return host, DEFAULT_PORT
    try:
        port = int(port_text)
    except ValueError:
        raise ListenError(f"--web {addr!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ListenError(f"--web {addr!r}: port {port} out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback listen address unless ``--allow-remote``: the page shows what the
    operator's certificate may read, to anyone who can reach it."""
    if not is_loopback(host) and not allow_remote:
        shown = host or "every interface"
        raise ListenError(
            f"--web: {shown} is not a loopback address; the dashboard has no login of its own and shows "
            "what your client certificate can read: pass --allow-remote to serve it there anyway"
        )


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("web", name).read_bytes()


@web.middleware
async def _headers(request: web.Request, handler: object) -> web.StreamResponse:
    resp = await handler(request)  # type: ignore[operator]
    for k, v in HEADERS.items():
        resp.headers.setdefault(k, v)
    return resp


def _host_guard(loopback_only: bool) -> object:
    @web.middleware
    async def guard(request: web.Request, handler: object) -> web.StreamResponse:
        if loopback_only:
            host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
            if request.host.startswith("["):
                host = request.host[1 : request.host.find("]")]
            if not is_loopback(host):
                return web.Response(status=421, text="this dashboard answers on a loopback name only\n")
        return await handler(request)  # type: ignore[operator]

    return guard


def make_app(
    collector: Collector | AgentCollector, *, loopback_only: bool = True, min_interval: float = 0.5
) -> web.Application:
    files = {name: _static(name) for name in STATIC}
    app = web.Application(middlewares=[_host_guard(loopback_only), _headers])  # type: ignore[list-item]

    def serve_file(name: str) -> web.Response:
        ctype = CONTENT_TYPES["." + name.rsplit(".", 1)[1]]
        return web.Response(body=files[name], headers={"Content-Type": ctype})

    async def index(_: web.Request) -> web.Response:
        return serve_file("index.html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files or name == "index.html":
            raise web.HTTPNotFound()
        return serve_file(name)

    async def view(_: web.Request) -> web.Response:
        return web.Response(text=collector.view_json(), content_type="application/json")

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        sent, held = -1, None
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            await resp.write(b"retry: 1000\n\n")
            while True:
                version, view_dict, text = collector.current()
                if version != sent:
                    patch = model.diff_view(held, view_dict) if held is not None else None
                    if patch is None:
                        await resp.write(b"event: view\ndata: " + text.encode() + b"\n\n")
                    else:
                        body = json.dumps(patch, separators=(",", ":")).encode()
                        await resp.write(b"event: patch\ndata: " + body + b"\n\n")
                    sent, held = version, view_dict
                    await asyncio.sleep(min_interval)
                    continue
                try:
                    await asyncio.wait_for(collector.event.wait(), 15)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
        return resp

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/view", view)
    app.router.add_get("/events", events)
    return app


async def serve(
    collector: Collector | AgentCollector,
    host: str,
    port: int,
    *,
    loopback_only: bool,
    stop: asyncio.Event,
    ready: object = None,
) -> None:
    """Serve until ``stop`` is set; ``ready(url)`` is called once the socket listens."""
    app = make_app(collector, loopback_only=loopback_only)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port)
    await site.start()
    server = site._server
    sock = server.sockets[0] if server is not None and server.sockets else None
    real_port = sock.getsockname()[1] if sock is not None else port
    shown = host if host and ":" not in host else f"[{host}]" if host else "0.0.0.0"
    if ready is not None:
        ready(f"http://{shown}:{real_port}/")  # type: ignore[operator]
    task = asyncio.create_task(collector.run())
    try:
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
