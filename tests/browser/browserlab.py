"""Browser test helpers (fixtures in conftest.py): chromium flags, the artifacts directory, Tab walks.

Import from test modules in tests/browser as ``from browserlab import ...``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Flags that keep chromium from calling home on this closed network and from needing a GPU or sandbox.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--metrics-recording-only",
    "--no-default-browser-check",
]
REPO = Path(__file__).resolve().parents[2]


def artifacts_dir() -> Path:
    """Where browser artifacts go: ``$ARTIFACTS/browser`` if set, else ``build/artifacts/browser``."""
    base = os.environ.get("ARTIFACTS")
    return (Path(base) if base else REPO / "build" / "artifacts") / "browser"


@dataclass
class ConsoleError:
    """One console error or uncaught page error seen by the ``page`` fixture."""

    kind: str  # "console" or "pageerror"
    text: str
    location: str = ""

    def __str__(self) -> str:
        return f"[{self.kind}] {self.text}" + (f" ({self.location})" if self.location else "")


@dataclass
class Focus:
    """What holds keyboard focus after one Tab press."""

    tag: str
    id: str
    text: str
    visible_indicator: bool  # an outline or box-shadow is drawn around it

    def __str__(self) -> str:
        return f"<{self.tag}#{self.id}> {self.text!r}" + (
            "" if self.visible_indicator else " (no focus ring)"
        )


_FOCUS_JS = """() => {
  const el = document.activeElement;
  if (!el || el === document.body) return null;
  const cs = getComputedStyle(el);
  const outline = cs.outlineStyle !== 'none' && parseFloat(cs.outlineWidth) > 0;
  const shadow = cs.boxShadow && cs.boxShadow !== 'none';
  return {tag: el.tagName.toLowerCase(), id: el.id || '',
          text: (el.innerText || el.getAttribute('aria-label') || el.value || '').trim().slice(0, 80),
          ring: outline || !!shadow};
}"""


async def tab_walk(page: Any, presses: int, *, from_top: bool = True) -> list[Focus]:
    """Press Tab ``presses`` times (from the top of the page unless ``from_top`` is False); return what
    took focus each time. Stops early when focus leaves the document. ``visible_indicator`` reads the
    focused element's computed style: an outline or a box-shadow."""
    if from_top:
        await page.evaluate(
            "() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }"
        )
    out: list[Focus] = []
    for _ in range(presses):
        await page.keyboard.press("Tab")
        info = await page.evaluate(_FOCUS_JS)
        if info is None:
            break
        out.append(Focus(info["tag"], info["id"], info["text"], bool(info["ring"])))
    return out


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.asynccontextmanager
async def tcp_forward(connect: Callable[[], socket.socket]) -> AsyncIterator[int]:
    """A TCP forwarder on 127.0.0.1 for the browser: yields its port; each connection is joined to a
    socket from ``connect()`` (run in a thread; e.g. ``lambda: node.connect_tcp("127.0.0.1", 51821)``
    reaches a server bound to loopback inside a lab node's network namespace)."""

    open_writers: set[asyncio.StreamWriter] = set()
    done: set[asyncio.Future[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        finished = asyncio.get_running_loop().create_future()
        done.add(finished)
        mine = [writer]
        open_writers.add(writer)
        try:
            try:
                sock = await asyncio.to_thread(connect)
            except OSError:
                return
            sock.setblocking(False)
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
            mine.append(up_writer)
            open_writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in mine:
                w.close()
                open_writers.discard(w)
            finished.set_result(None)
            done.discard(finished)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # Closing every socket ends the pipes (no task is cancelled: asyncio would log that).
        for w in list(open_writers):
            w.close()
        if done:
            await asyncio.wait(list(done), timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
