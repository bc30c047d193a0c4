"""Each node's page in a real browser, against a real ``kubespan run`` pair in network namespaces
(real discovery-service, wireguard-go, nftables; root needed, skipped otherwise).

The page on n1 shows n2 up with its endpoint, a fresh handshake and byte counters (read from the DOM);
when n2 is killed the row turns down, and when n2 comes back it turns up again; screenshots at each
step. A keyboard-only walk reaches every control with a visible focus ring, opens a peer's details,
and focus survives the page's refreshes; an agent that cannot be reached is shown as such, its last data
kept as stale. No console errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from browserlab import tab_walk, tcp_forward

from netns.mesh import STATUS_PORT, MeshLab, MeshNode, lan_pair, stop_agents

pytestmark = pytest.mark.root

Shot = Callable[[Any, str], Awaitable[Path]]
DOWN_WITHIN_MS = 30_000  # probes declare a dead path in ~4 s; slack for a loaded machine
UP_WITHIN_MS = 60_000


@pytest_asyncio.fixture(loop_scope="session")
async def pair() -> AsyncIterator[tuple[MeshLab, list[MeshNode]]]:
    """Two ``kubespan run`` nodes on one LAN segment, up; agents stopped together at teardown."""
    lab, ml, nodes = await asyncio.to_thread(lan_pair, "10.60.0")
    try:
        yield ml, nodes
    finally:
        await asyncio.to_thread(stop_agents, lab, 15)
        await asyncio.to_thread(lab.__exit__, None, None, None)


@pytest_asyncio.fixture(loop_scope="session")
async def n1_page_url(pair: tuple[MeshLab, list[MeshNode]]) -> AsyncIterator[str]:
    """n1's agent serves on 127.0.0.1 inside its namespace; the browser reaches it through a forwarder."""
    n1 = pair[1][0]
    async with tcp_forward(lambda: n1.node.connect_tcp("127.0.0.1", STATUS_PORT)) as port:
        yield f"http://127.0.0.1:{port}/?refresh=0.5"


def kubespan_proc(mn: MeshNode) -> Any:
    for p in mn.node.procs:
        if p.poll() is None and "kubespan.cli" in " ".join(map(str, p.args)):
            return p
    raise AssertionError(f"no running kubespan on {mn.name}")


async def wait_state(page: Any, peer: str, state: str, timeout_ms: float) -> None:
    await page.wait_for_function(
        "([peer, state]) => { const r = document.querySelector(`tr[data-peer='${peer}']`);"
        " return r !== null && r.dataset.state === state; }",
        arg=[peer, state],
        timeout=timeout_ms,
    )


async def cell(page: Any, peer: str, col: str) -> str:
    return (await page.locator(f"tr[data-peer='{peer}'] [data-col='{col}']").inner_text()).strip()


async def test_node_page_follows_a_peer_down_and_back(
    page: Any, shot: Shot, pair: tuple[MeshLab, list[MeshNode]], n1_page_url: str
) -> None:
    ml, (n1, n2) = pair
    st = await asyncio.to_thread(n1.status)
    await page.goto(n1_page_url)
    await wait_state(page, "n2", "up", 10_000)
    assert (await page.locator("#nodename").inner_text()) == "n1"
    assert (await page.locator("#mesh-address").inner_text()) == st["mesh_address"]
    assert (await page.locator("#steering").inner_text()) == st["steering"] == "marks"
    assert (await cell(page, "n2", "state")) == "✓ up"
    assert (await cell(page, "n2", "endpoint")).startswith("10.60.0.12:")
    assert (await cell(page, "n2", "path")) == "lan"
    assert re.fullmatch(r"\d+ s ago", await cell(page, "n2", "handshake")), await cell(
        page, "n2", "handshake"
    )
    assert (await cell(page, "n2", "rx")) != "0 B"
    # n2 answers path probes: the smoothed round trip shows once one was answered (a dash before)
    assert re.fullmatch(r"\u2013|\d+\.\d ms", await cell(page, "n2", "rtt")), await cell(page, "n2", "rtt")
    await page.wait_for_function(
        "() => /^\\d+\\.\\d ms$/.test(document.querySelector(\"tr[data-peer='n2'] [data-col='rtt']\").textContent)",
        timeout=15_000,
    )
    assert "1 up, 0 down" in await page.locator("#peer-summary").inner_text()
    await shot(page, "n2-up")

    # n2 dies: every process in its namespace (the agent and its wireguard-go) gets SIGKILL, so it
    # says no goodbye and its affiliate stays in discovery.
    proc = kubespan_proc(n2)
    for pid in await asyncio.to_thread(n2.node.pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(proc.wait, 10)
    await wait_state(page, "n2", "down", DOWN_WITHIN_MS)
    assert (await cell(page, "n2", "state")) == "✗ down"
    assert (await page.locator("#ready").get_attribute("data-ready")) == "false"
    await shot(page, "n2-killed-down")

    await asyncio.to_thread(ml.start_node, n2.node)
    await wait_state(page, "n2", "up", UP_WITHIN_MS)
    assert (await page.locator("#ready").get_attribute("data-ready")) == "true"
    await shot(page, "n2-restarted-up")


async def test_node_page_keyboard_walk_and_lost_agent(
    page: Any, shot: Shot, pair: tuple[MeshLab, list[MeshNode]]
) -> None:
    n1 = pair[1][0]
    async with tcp_forward(lambda: n1.node.connect_tcp("127.0.0.1", STATUS_PORT)) as port:
        await page.goto(f"http://127.0.0.1:{port}/?refresh=0.5")
        await wait_state(page, "n2", "up", 10_000)
        walk = await tab_walk(page, 8)
        names = [(f.tag, f.text) for f in walk]
        assert names[:6] == [
            ("a", "Skip to the peers"),
            ("button", "Show"),
            ("button", "Pause updates"),
            ("a", "/status (JSON)"),
            ("a", "/metrics"),
            ("a", "/healthz"),
        ], [str(f) for f in walk]
        assert all(f.visible_indicator for f in walk[:6]), [str(f) for f in walk]

        # Open n2's details from the keyboard; the refreshes (every 0.5 s) keep focus and the open row.
        await tab_walk(page, 2)
        await page.keyboard.press("Enter")
        details = page.locator("tr.detail").first
        assert await details.is_visible()
        assert "10.60.0.12" in await details.inner_text()  # a candidate endpoint
        await page.wait_for_timeout(1500)
        assert (
            await page.evaluate("() => document.activeElement.getAttribute('aria-label')") == "Details of n2"
        )
        assert await details.is_visible()
        await shot(page, "details-open-with-focus")
        await page.keyboard.press("Enter")
        assert not await details.is_visible()

    # The agent cannot be reached any more: the page says so and keeps (dimmed) the last data.
    page.allow_console_errors("ERR_CONNECTION_REFUSED")
    await page.wait_for_function("() => document.body.dataset.stale === 'true'", timeout=5_000)
    assert (await page.locator("#status").inner_text()).startswith("Cannot read /status")
    assert (await cell(page, "n2", "state")) == "✓ up"
    await shot(page, "agent-unreachable-stale")
