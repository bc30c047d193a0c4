"""The registry's landing page: a small static page (HTML/CSS/JS shipped in ``web/``) that polls ``/stats``.

The registry is blind (it stores ciphertext only), and the page must not undo that: ``/stats`` carries
counts and cumulative counters only (clusters, affiliates, endpoints, open watches, RPCs by method and
status code, store health), never an identifier, address or blob. The page turns the counters into rates
between two polls. No CDN, no build step: the files are read once from the package and served as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from discovery.server.rpcmetrics import RpcMetrics
from discovery.server.state import Registry
from discovery.version import version

# name under /static/ -> content type; index.html is served at /
STATIC = {
    "landing.css": "text/css",
    "landing.js": "text/javascript",
}
# The page loads only its own files and talks only to its own origin.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:"


def _read(name: str) -> bytes:
    return resources.files("discovery.server").joinpath("web", name).read_bytes()


@dataclass
class Landing:
    """Serves ``/``, ``/static/*`` and ``/stats`` for one daemon.

    ``store_kind`` is ``memory``, ``file`` or ``etcd``; ``store_problem`` returns why the store cannot be
    written now (None when healthy); the reason itself stays on ``/healthz``."""

    registry: Registry
    rpcs: RpcMetrics
    store_kind: str
    store_problem: Callable[[], str | None]
    started: float = field(default_factory=time.monotonic)
    _files: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._files = {name: _read(name) for name in ("index.html", *STATIC)}

    def stats(self) -> dict[str, Any]:
        """Counts and cumulative counters only; ``uptime_seconds`` lets a reader compute rates."""
        clusters, affiliates, endpoints, subs = self.registry.stats()
        rpcs = {
            name: {"started": m.started, "codes": dict(sorted(m.codes.items()))}
            for (_kind, name), m in sorted(self.rpcs.methods.items(), key=lambda kv: kv[0][1])
        }
        return {
            "clusters": clusters,
            "affiliates": affiliates,
            "endpoints": endpoints,
            "subscriptions": subs,
            "rpcs": rpcs,
            "store": {"kind": self.store_kind, "healthy": self.store_problem() is None},
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "version": version(),
        }

    async def index(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self._files["index.html"],
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
        )

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._files[name],
            content_type=STATIC[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def stats_handler(self, _: web.Request) -> web.Response:
        return web.json_response(
            self.stats(), headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"}
        )

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            web.get("/static/{name}", self.static),
            web.get("/stats", self.stats_handler),
        ]
