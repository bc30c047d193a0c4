"""The registry's landing page in a real browser: a real discovery-service process, real clients.

The page shows counts and rates read from /stats (from the DOM), follows a client that joins, keeps the
registry blind (no cluster id, affiliate id or hostname of the clients appears anywhere on the page),
can be walked with the keyboard alone (tab order, visible focus), and logs no console errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from browserlab import tab_walk

from discovery.client.client import DiscoveryClient
from discovery.testing import ServerProcess
from spanapi.discovery.client import affiliate_pb2

Shot = Callable[[Any, str], Awaitable[Path]]
SECRET = os.urandom(32)
# (cluster id, affiliate id): two clusters, three affiliates at first
FIRST = [
    ("cluster-alpha-7f3a", "node-alpha-1"),
    ("cluster-alpha-7f3a", "node-alpha-2"),
    ("cluster-beta-91c2", "node-beta-1"),
]
JOINER = ("cluster-gamma-55d0", "node-gamma-1")
DASH = "\u2013"  # what the page shows before it has a value


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real discovery-service on loopback, state in memory."""
    with ServerProcess(None, "--no-rpc-log", log_path=tmp_path / "server.log") as srv:
        yield srv


class Clients:
    """Real discovery clients: each says Hello, publishes its affiliate and keeps a Watch open."""

    def __init__(self, target: str) -> None:
        self.url = f"http://{target}"
        self.stack = contextlib.AsyncExitStack()

    async def join(self, cluster_id: str, affiliate_id: str) -> None:
        c = await self.stack.enter_async_context(
            DiscoveryClient([self.url], cluster_id=cluster_id, secret=SECRET, affiliate_id=affiliate_id)
        )
        info = affiliate_pb2.Affiliate(node_id=affiliate_id, hostname=f"host-of-{affiliate_id}")
        await c.set_local_data(info)
        assert await asyncio.wait_for(c.wait_connected(), 10), f"{affiliate_id} did not connect"


@pytest_asyncio.fixture(loop_scope="session")
async def clients(registry: ServerProcess) -> AsyncIterator[Clients]:
    cs = Clients(registry.target)
    async with cs.stack:
        yield cs


async def text(page: Any, sel: str) -> str:
    return (await page.locator(sel).inner_text()).strip()


async def wait_counts(page: Any, timeout_ms: float = 10_000, **want: str) -> None:
    """Wait until each element #id shows the wanted text (the page polls /stats every 0.5 s here)."""
    for key, value in want.items():
        await page.wait_for_function(
            "([id, v]) => document.getElementById(id).textContent.trim() === v",
            arg=[key, value],
            timeout=timeout_ms,
        )


async def test_registry_page_shows_counts_follows_joins_and_stays_blind(
    page: Any, shot: Shot, registry: ServerProcess, clients: Clients
) -> None:
    for cid, aid in FIRST:
        await clients.join(cid, aid)
    await page.goto(f"http://127.0.0.1:{registry.ports['landing']}/?refresh=0.5")
    await wait_counts(page, clusters="2", affiliates="3", watchers="3")
    store = await text(page, "#store")
    assert store.startswith("✓ ok") and "memory" in store, store
    # Rates need two polls; then each RPC method the clients used has a row, with totals.
    await page.wait_for_function(f"() => document.getElementById('rpc-rate').textContent.trim() !== '{DASH}'")
    methods = await page.locator("#rpcs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.method)")
    assert {"Hello", "AffiliateUpdate", "Watch"} <= set(methods), methods
    assert await page.locator('#rpcs tr[data-method="Watch"] td').nth(2).inner_text() == "3"
    assert await page.locator("#status").get_attribute("class") == "status"
    await shot(page, "three-clients")

    await clients.join(*JOINER)
    await wait_counts(page, timeout_ms=5_000, clusters="3", affiliates="4", watchers="4")
    await shot(page, "after-join")

    # Blind: nothing that names a cluster, a node or a host reaches the page.
    html = await page.content()
    for cid, aid in [*FIRST, JOINER]:
        for word in (cid, aid, f"host-of-{aid}"):
            assert word not in html, f"{word!r} leaked onto the landing page"


async def test_registry_page_keyboard_walk(page: Any, shot: Shot, registry: ServerProcess) -> None:
    await page.goto(f"http://127.0.0.1:{registry.ports['landing']}/?refresh=0.5")
    await wait_counts(page, clusters="0", watchers="0")
    walk = await tab_walk(page, 6)
    assert [(f.tag, f.text) for f in walk[:4]] == [
        ("a", "Skip to the counts"),
        ("button", "Pause updates"),
        ("a", "/stats (JSON)"),
        ("a", "/healthz"),
    ], [str(f) for f in walk]
    assert all(f.visible_indicator for f in walk[:4]), [str(f) for f in walk]

    # The skip link moves focus to the counts; the pause button works from the keyboard.
    await tab_walk(page, 1)
    await page.keyboard.press("Enter")
    assert await page.evaluate("() => document.activeElement.id") == "counts"
    await page.keyboard.press("Tab")
    assert await page.evaluate("() => document.activeElement.id") == "pause"
    await page.keyboard.press("Enter")
    assert await page.locator("#pause").get_attribute("aria-pressed") == "true"
    assert await text(page, "#pause") == "Resume updates"
    await shot(page, "paused-with-focus")
    await page.keyboard.press("Space")
    assert await page.locator("#pause").get_attribute("aria-pressed") == "false"
