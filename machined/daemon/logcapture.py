"""machined's own logs: JSON lines to stderr, and a copy in a ring per log id for the Logs RPC.

Two ids, as Talos names them: ``controller-runtime`` (the controller runtime and the controllers,
loggers ``controller-runtime`` and ``controller-runtime.*``) and ``machined`` (everything else the
agent logs: config, mesh, services, API). Each record is one JSON line
(:class:`spanutil.logs.JsonFormatter`), the same text in the ring as on stderr.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from machined.services.logs import LogRing
from spanutil.logs import JsonFormatter

MACHINED = "machined"
CONTROLLER_RUNTIME = "controller-runtime"
RING_LINES = 5000


class RingHandler(logging.Handler):
    """Appends each formatted record to the ring of its log id (thread-safe: records from other
    threads are handed to the event loop)."""

    def __init__(self, rings: dict[str, LogRing], loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__()
        self.rings = rings
        self.loop = loop
        self._thread = threading.get_ident()
        self.setFormatter(JsonFormatter())

    @staticmethod
    def log_id(name: str) -> str:
        if name == CONTROLLER_RUNTIME or name.startswith(CONTROLLER_RUNTIME + "."):
            return CONTROLLER_RUNTIME
        return MACHINED

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            ring = self.rings.get(self.log_id(record.name))
            if ring is None:
                return
            stream = "stderr" if record.levelno >= logging.WARNING else "stdout"
            if threading.get_ident() == self._thread or self.loop is None:
                ring.append(text, stream)
            else:
                self.loop.call_soon_threadsafe(ring.append, text, stream)
        except RuntimeError:  # the loop is closed: nobody can read the ring any more
            pass
        except Exception:
            self.handleError(record)


def make_rings(lines: int = RING_LINES) -> dict[str, LogRing]:
    return {MACHINED: LogRing(lines), CONTROLLER_RUNTIME: LogRing(lines)}


def install(rings: dict[str, LogRing], level: int = logging.INFO) -> RingHandler:
    """Add a :class:`RingHandler` to the root logger (call from the event loop's thread)."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    h = RingHandler(rings, loop)
    h.setLevel(level)
    logging.getLogger().addHandler(h)
    return h


def uninstall(handler: RingHandler) -> None:
    logging.getLogger().removeHandler(handler)
