"""Browser test helpers (fixtures in conftest.py): chromium flags, artifacts dir, Tab walks, a background loop.

Import from test modules in tests/browser as ``from browserlab import ...``."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
T = TypeVar("T")


def artifacts_dir() -> Path:
    """Where browser artifacts go: ``$ARTIFACTS/browser`` if set, else ``build/artifacts/browser``."""
    base = os.environ.get("ARTIFACTS")
    return (Path(base) if base else REPO / "build" / "artifacts") / "browser"


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


def tab_walk(p: Any, presses: int) -> list[Focus]:
    """Press Tab ``presses`` times from the top of the page; return what took focus each time.

    Stops early when focus leaves the document (returns to the browser UI). ``visible_indicator`` checks
    the computed style of ``:focus-visible``: an outline or a box-shadow."""
    p.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
    out: list[Focus] = []
    for _ in range(presses):
        p.keyboard.press("Tab")
        info = p.evaluate(_FOCUS_JS)
        if info is None:
            break
        out.append(Focus(info["tag"], info["id"], info["text"], bool(info["ring"])))
    return out


class BackgroundLoop:
    """An asyncio loop on its own thread, for sync browser tests that need to drive async clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="browser-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the loop and wait for its result (raises what it raised)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what is left, stop the loop and join its thread."""

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_cancel_all(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
