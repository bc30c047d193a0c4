"""The browser harness itself: console errors are caught, screenshots land as artifacts, Tab walks work,
and pytest-asyncio tests that run after the browser started still get a working loop of their own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from browserlab import artifacts_dir, tab_walk

PAGE = """<!doctype html><html><head><style>
button:focus-visible { outline: 3px solid #000; }
#plain:focus-visible { outline: none; }
</style></head><body>
<button id="a">First</button><a id="b" href="#x">Second</a><button id="plain">Third</button>
</body></html>"""


async def test_console_errors_and_page_errors_are_recorded(page: Any) -> None:
    page.allow_console_errors("deliberate")
    await page.set_content("<!doctype html><p>hi</p>")
    await page.evaluate("() => console.error('deliberate console error')")
    await page.evaluate("() => setTimeout(() => { throw new Error('deliberate page error'); }, 0)")
    await page.wait_for_timeout(200)
    kinds = sorted(e.kind for e in page.console_errors)
    assert kinds == ["console", "pageerror"], [str(e) for e in page.console_errors]


async def test_screenshot_is_saved_under_artifacts(
    page: Any, shot: Callable[[Any, str], Awaitable[Path]]
) -> None:
    await page.set_content("<!doctype html><h1>artifact</h1>")
    path = await shot(page, "hello world")
    assert path.is_file() and path.stat().st_size > 0
    assert artifacts_dir() in path.parents
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_tab_walk_reports_order_and_focus_ring(page: Any) -> None:
    await page.set_content(PAGE)
    walk = await tab_walk(page, 3)
    assert [f.id for f in walk] == ["a", "b", "plain"]
    assert [f.visible_indicator for f in walk] == [True, True, False]


def test_a_plain_sync_test_sees_no_running_loop(browser: Any) -> None:
    # The session browser must not leave the thread looking like it runs a loop (the sync API did).
    asyncio.run(asyncio.sleep(0))
