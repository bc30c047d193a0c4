"""Each node's own page: ``/`` on the mesh agent's HTTP address (``kubespan run`` and machined).

A static page shipped in ``kubespan/web`` (HTML/CSS/JS, no CDN, no build step) that reads ``/status``
from its own origin every second and shows this node's view: its peers, their states, paths,
endpoints, handshake ages and counters. Read-only: it only ever sends GETs, and the agent serves it on
the same address as ``/status`` (127.0.0.1 by default). Both HTTP servers route through :func:`lookup`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

# path -> (file in kubespan/web, content type)
FILES = {
    "/": ("node.html", "text/html; charset=utf-8"),
    "/static/node.css": ("node.css", "text/css; charset=utf-8"),
    "/static/node.js": ("node.js", "text/javascript; charset=utf-8"),
}
# The page loads only its own files and talks only to its own origin.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:"
HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@cache
def _read(name: str) -> bytes:
    return resources.files("kubespan").joinpath("web", name).read_bytes()


def lookup(path: str) -> tuple[str, bytes] | None:
    """``(content type, body)`` of the page's file at ``path`` (query string already removed), or None."""
    entry = FILES.get(path)
    if entry is None:
        return None
    name, ctype = entry
    return ctype, _read(name)
