"""Browser test harness: Debian's chromium driven headless by Playwright's async API (no browser download).

Why async: Playwright's sync API marks the thread as running an event loop for as long as it lives,
which breaks every pytest-asyncio test that runs after it. The async API shares pytest-asyncio's
session loop instead, so browser tests are ``async def`` tests on that loop. Every test collected under
tests/browser gets ``pytest.mark.asyncio(loop_scope="session")`` automatically; an async fixture of your
own that a browser test uses must run on the same loop: ``@pytest_asyncio.fixture(loop_scope="session")``
(its ``scope`` may stay "function").

What a test gets:
- ``browser`` (session): one headless chromium for the whole run, launched from ``/usr/bin/chromium``
  (override with ``$CHROMIUM``) with the flags that keep it quiet on a closed network (no background
  networking, component updates, sync or QUIC); Playwright gives it a fresh temporary user-data dir.
  Every browser test skips with the reason when chromium or the ``playwright`` package is missing.
- ``page``: a fresh context and page per test (1280x800). Any console message of type ``error`` and any
  uncaught page error (JS exception) fails the test at teardown, listing them all.
  ``page.console_errors`` holds what was seen so far; a test that expects an error (e.g. a server it
  stops on purpose) calls ``page.allow_console_errors(substring)`` first.
- ``shot``: ``await shot(page, "step-name")`` saves a full-page PNG under the artifacts directory and
  prints its path: ``$ARTIFACTS/browser/<test>/`` when ``$ARTIFACTS`` is set, else
  ``build/artifacts/browser/<test>/`` in the repo (gitignored).
- ``keyboard_walk`` (or ``from browserlab import tab_walk``): ``await tab_walk(page, n)`` presses Tab up
  to ``n`` times and returns what took focus each time (tag, id, text, focus indicator visible or not).

Start servers under test as real processes (see ``discovery.testing.ServerProcess``); blocking calls
belong in ``asyncio.to_thread`` so the page keeps running meanwhile.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from browserlab import CHROMIUM, CHROMIUM_ARGS, ConsoleError, Focus, artifacts_dir, tab_walk

HERE = Path(__file__).parent
BODY_DONE = pytest.StashKey[bool]()


def _missing() -> str | None:
    """Why browser tests cannot run here, or None."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (Debian package 'chromium'; make setup installs it)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError as e:
        return f"the playwright package is not installed ({e}); make venv installs it"
    return None


def _is_browser_test(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests run on the session loop (the browser's); they skip with the reason when chromium or
    playwright is missing."""
    reason = _missing()
    skip = pytest.mark.skip(reason=f"browser tests: {reason}") if reason else None
    for item in items:
        if not _is_browser_test(item):
            continue
        if skip is not None:
            item.add_marker(skip)


def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Put every ``async def`` test under tests/browser on the session loop (before pytest-asyncio sees it)."""
    if (
        name.startswith("test")
        and inspect.iscoroutinefunction(obj)
        and HERE in Path(str(collector.path)).parents
        and not any(m.name == "asyncio" for m in getattr(obj, "pytestmark", []))
    ):
        pytest.mark.asyncio(loop_scope="session")(obj)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    """One headless chromium (Playwright async API) for the session."""
    reason = _missing()
    if reason is not None:
        pytest.skip(f"browser tests: {reason}")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """Mark the end of the test body: console errors after it (a server fixture stopping before the page
    closes) are not the test's."""
    try:
        return (yield)
    finally:
        item.stash[BODY_DONE] = True


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Any, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A fresh page; fails the test at teardown on any console error or uncaught JS exception seen
    while the test ran (its body and fixtures' set-up)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    p = await context.new_page()
    errors: list[ConsoleError] = []
    allowed: list[str] = []

    def over() -> bool:
        return request.node.stash.get(BODY_DONE, False)

    def on_console(msg: Any) -> None:
        if msg.type == "error" and not over():
            loc = msg.location or {}
            errors.append(
                ConsoleError("console", msg.text, f"{loc.get('url', '')}:{loc.get('lineNumber', '')}")
            )

    def on_pageerror(exc: Any) -> None:
        if not over():
            errors.append(ConsoleError("pageerror", str(exc)))

    p.on("console", on_console)
    p.on("pageerror", on_pageerror)
    p.console_errors = errors
    p.allow_console_errors = allowed.append
    try:
        yield p
    finally:
        await context.close()
    bad = [e for e in errors if not any(a in e.text for a in allowed)]
    if bad:
        pytest.fail("browser console errors:\n" + "\n".join(f"  {e}" for e in bad), pytrace=False)


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Callable[[Any, str], Awaitable[Path]]:
    """``await shot(page, name)``: save a full-page screenshot as a test artifact, print and return its path."""
    test_dir = artifacts_dir() / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    counter = [0]

    async def take(p: Any, name: str) -> Path:
        test_dir.mkdir(parents=True, exist_ok=True)
        counter[0] += 1
        path = test_dir / f"{counter[0]:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        await p.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    return take


@pytest.fixture
def keyboard_walk() -> Callable[[Any, int], Awaitable[list[Focus]]]:
    """The ``tab_walk`` helper as a fixture (no import needed)."""
    return tab_walk
