"""Browser test harness: Debian's chromium driven headless by Playwright's sync API (no browser download).

What a test gets:
- ``browser`` (session): one headless chromium for the whole run, launched from ``/usr/bin/chromium``
  (override with ``$CHROMIUM``) with the flags that keep it quiet on a closed network (no background
  networking, component updates, sync or QUIC) and a fresh temporary user-data dir. Skips every browser
  test with the reason when chromium or the ``playwright`` package is missing.
- ``page``: a fresh context and page per test (1280x800). Any console message of type ``error`` and any
  uncaught page error (JS exception) fails the test at teardown, listing them all.
  ``page.console_errors`` holds what was seen so far (assert on it mid-test if you like); a test that
  expects an error (e.g. a lost server) calls ``page.allow_console_errors(substring)`` first.
- ``shot``: ``shot(page, "step-name")`` saves a full-page PNG under the artifacts directory and prints
  its path. The directory is ``$ARTIFACTS/browser/`` when ``$ARTIFACTS`` is set, else
  ``build/artifacts/browser/`` in the repo (gitignored), one sub-directory per test.
- ``keyboard_walk(page, n)`` (or ``from browserlab import tab_walk``): presses Tab up to ``n`` times and returns what took focus each time (tag, id,
  text, whether a focus indicator is visible), for keyboard-only walks.

Tests here are plain ``def`` tests: the sync API refuses to run inside a running asyncio loop, so do not
write ``async def`` tests that use ``page``. Start the servers under test as real processes (see
``tests/integration/conftest.py``), or run coroutines on the ``background_loop`` fixture's thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browserlab import CHROMIUM, CHROMIUM_ARGS, BackgroundLoop, Focus, artifacts_dir, tab_walk


def _missing() -> str | None:
    """Why browser tests cannot run here, or None."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (Debian package 'chromium'; make setup installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"the playwright package is not installed ({e}); make venv installs it"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this directory's tests with the reason when chromium or playwright is missing."""
    reason = _missing()
    if reason is None:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=f"browser tests: {reason}")
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless chromium (Playwright sync API) for the session, with a throw-away profile."""
    reason = _missing()
    if reason is not None:
        pytest.skip(f"browser tests: {reason}")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        # A plain launch gives each run a fresh temporary user-data dir (Playwright makes and removes it);
        # tests get their own fresh contexts (cookies, storage) from the ``page`` fixture.
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


@dataclass
class ConsoleError:
    """One console error or uncaught page error seen by ``page``."""

    kind: str  # "console" or "pageerror"
    text: str
    location: str = ""

    def __str__(self) -> str:
        return f"[{self.kind}] {self.text}" + (f" ({self.location})" if self.location else "")


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page; fails the test at teardown on any console error or uncaught JS exception."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    p = context.new_page()
    errors: list[ConsoleError] = []
    allowed: list[str] = []

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            loc = msg.location or {}
            errors.append(
                ConsoleError("console", msg.text, f"{loc.get('url', '')}:{loc.get('lineNumber', '')}")
            )

    def on_pageerror(exc: Any) -> None:
        errors.append(ConsoleError("pageerror", str(exc)))

    p.on("console", on_console)
    p.on("pageerror", on_pageerror)
    p.console_errors = errors
    p.allow_console_errors = allowed.append
    try:
        yield p
    finally:
        context.close()
    bad = [e for e in errors if not any(a in e.text for a in allowed)]
    if bad:
        pytest.fail("browser console errors:\n" + "\n".join(f"  {e}" for e in bad), pytrace=False)


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Callable[[Any, str], Path]:
    """``shot(page, name)``: save a full-page screenshot as a test artifact, print and return its path."""
    test_dir = artifacts_dir() / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    counter = [0]

    def take(p: Any, name: str) -> Path:
        test_dir.mkdir(parents=True, exist_ok=True)
        counter[0] += 1
        path = test_dir / f"{counter[0]:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        p.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    return take


@pytest.fixture
def keyboard_walk() -> Callable[[Any, int], list[Focus]]:
    """The ``tab_walk`` helper as a fixture (no import needed)."""
    return tab_walk


@pytest.fixture
def background_loop() -> Iterator[BackgroundLoop]:
    """An asyncio loop on a thread: ``background_loop.run(coro)`` from a sync browser test."""
    bg = BackgroundLoop()
    try:
        yield bg
    finally:
        bg.close()
