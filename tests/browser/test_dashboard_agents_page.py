"""``spanctl dashboard --web --agent URL ...`` in a real browser against two real ``kubespan run`` agents
in network namespaces (real discovery-service, wireguard-go, nftables; root needed, skipped otherwise),
no machined or apid: the source ``make demo DEMO_ARGS=--keep`` serves its dashboard from.

Each agent's HTTP page (127.0.0.1 inside its namespace) is forwarded to the host; the dashboard runs as a
real process with one ``--agent`` per forward. Checked from the DOM: both directions up, the node list
without services (a dash); n2 killed -> its row unreachable within a few seconds with its cells kept and
stale; n2 restarted -> every pair up and fresh again. No console errors; screenshots at each step.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from browserlab import tcp_forward

from netns.mesh import STATUS_PORT, MeshLab, MeshNode, lan_pair, stop_agents

pytestmark = pytest.mark.root

Shot = Callable[[Any, str], Awaitable[Path]]
NAMES = ["n1", "n2"]
ALL_UP = """names => names.every(r => {
  const tr = document.querySelector(`#matrix tr[data-node="${r}"]`);
  return tr && tr.dataset.reach === "ok" && names.every(c => {
    const td = tr.querySelector(`td[data-col="${c}"]`);
    return td && (r === c ? td.dataset.state === "self" : td.dataset.state === "up" && td.dataset.stale === "0");
  });
})"""


@pytest_asyncio.fixture(loop_scope="session")
async def pair() -> AsyncIterator[tuple[MeshLab, list[MeshNode]]]:
    lab, ml, nodes = await asyncio.to_thread(lan_pair, "10.61.0")
    try:
        yield ml, nodes
    finally:
        await asyncio.to_thread(stop_agents, lab, 15)
        await asyncio.to_thread(lab.__exit__, None, None, None)


@pytest_asyncio.fixture(loop_scope="session")
async def dashboard(pair: tuple[MeshLab, list[MeshNode]]) -> AsyncIterator[str]:
    """The agents' pages forwarded to the host and ``spanctl dashboard --web 127.0.0.1:0 --agent ...``
    running as a process on them; the page's URL."""
    _, (n1, n2) = pair
    async with (
        tcp_forward(lambda: n1.node.connect_tcp("127.0.0.1", STATUS_PORT)) as p1,
        tcp_forward(lambda: n2.node.connect_tcp("127.0.0.1", STATUS_PORT)) as p2,
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "machined.spanctl.main",
            "dashboard",
            "--web",
            "127.0.0.1:0",
            "--agent",
            f"http://127.0.0.1:{p1}",
            "--agent",
            f"http://127.0.0.1:{p2}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            m = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/)", line)
            assert m, line
            yield m[1]
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


@pytest.mark.timeout(300)
async def test_agent_dashboard_matrix_through_agent_loss_and_restart(
    page: Any, shot: Shot, pair: tuple[MeshLab, list[MeshNode]], dashboard: str
) -> None:
    ml, (_, n2) = pair
    await page.goto(dashboard)
    await page.wait_for_function(ALL_UP, arg=NAMES, timeout=30_000)
    row = await page.locator('#nodes tr[data-node="n1"]').inner_text()
    assert "✓ reachable" in row and "1/1" in row, row
    cells = await page.locator('#nodes tr[data-node="n1"] td').all_inner_texts()
    assert cells[-2] == "\u2013", cells  # services: /status has none
    assert await page.locator("#banner").is_hidden()
    await shot(page, "agents-up")

    # n2 dies (its agent and wireguard-go SIGKILLed): its row unreachable, its cells kept and stale
    t0 = time.monotonic()
    for pid in await asyncio.to_thread(n2.node.pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await page.wait_for_function(
        """() => {
          const tr = document.querySelector('#matrix tr[data-node="n2"]');
          return tr && tr.dataset.reach === "unreachable";
        }""",
        timeout=10_000,
    )
    print(f"n2's row unreachable {time.monotonic() - t0:.2f}s after the kill")
    stale = await page.locator('#matrix tr[data-node="n2"] td[data-col="n1"]').get_attribute("data-stale")
    assert stale == "1"
    assert "unreachable" in await page.locator('#nodes tr[data-node="n2"]').inner_text()
    await shot(page, "n2-killed")

    await asyncio.to_thread(ml.start_node, n2.node)
    await page.wait_for_function(ALL_UP, arg=NAMES, timeout=90_000)
    await shot(page, "n2-back")
