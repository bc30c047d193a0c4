"""spanctl dashboard --web in a real browser against a real 4-node lab (root: network namespaces).

Lab (tests/integration/machined_lab.py): discovery on the lab internet; cloud a (behind nat-a) holds n1
(control plane) and n2, cloud b (behind nat-b) n3 and n4. Every node runs machined and apid as real
processes (real WireGuard mesh); the operator host on the internet runs ``spanctl dashboard --web
127.0.0.1:0`` with the generated talosconfig, pointed at n1's apid (a port forward on nat-a), no -n:
it finds the nodes from n1's Members. The browser (on the host) reaches the operator's loopback
through ``browserlab.tcp_forward``, whose connections are made inside the operator's namespace.

Checked from the DOM: every pair up; n4 killed -> its row unreachable with stale cells; n4 restarted ->
its row fresh and up again; n1's apid (the dashboard's endpoint) killed -> a banner and every row
unreachable, nothing dropped; apid back -> every pair up again without a reload; a keyboard-only walk (skip link, one tab stop for the matrix, arrows,
Enter opens the pair, focus visible throughout); no console errors. Screenshots at each step.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from browserlab import REPO, tab_walk, tcp_forward

sys.path.insert(0, str(REPO / "tests" / "integration"))
from machined_lab import CLOUDS, PY, Agent, build, full_mesh, kill_node, wait

from machined import gen, pki
from netns.lab import Lab, Node
from netns.nat import PortForward

pytestmark = pytest.mark.root

Shot = Callable[[Any, str], Awaitable[Path]]
PUBLIC_A = CLOUDS["a"][1]
OPERATOR = f"{PUBLIC_A.rsplit('.', 1)[0]}.3"
DISC = f"{PUBLIC_A.rsplit('.', 1)[0]}.2"
NAMES = ["n1", "n2", "n3", "n4"]


@dataclass
class DashLab:
    lab: Lab
    agents: list[Agent]
    op: Node
    port: int  # the dashboard's port inside the operator's namespace

    def agent(self, name: str) -> Agent:
        return next(a for a in self.agents if a.name == name)


def _configs(agents: list[Agent], lab: Lab) -> Path:
    g = gen.gen_config(
        "lab",
        f"https://{PUBLIC_A}:6443",
        gen.gen_secrets(),
        discovery=[f"http://{DISC}:3000"],
        endpoints=[PUBLIC_A],
        cert_sans=[PUBLIC_A],
    )
    for a in agents:
        docs = list(yaml.safe_load_all(g.controlplane if a.index == 1 else g.worker))
        a.cluster_id = docs[0]["cluster"]["id"]
        pki.write_secret_file(a.config, yaml.safe_dump_all([*docs, a.agent_config()], sort_keys=False))
    tc = lab.dir / "talosconfig"
    pki.write_secret_file(tc, g.talosconfig)
    return tc


def _start(a: Agent) -> None:
    a.start()
    _start_apid(a)


def _start_apid(a: Agent) -> None:
    a.node.popen(
        PY, "-m", "machined.apid.main", "--config", str(a.config), "--machined-socket", str(a.socket),
        "--hostname", a.name, "--trustd-wait", "240",
        log=a.node.lab.dir / f"apid-{a.name}.log",
    )  # fmt: skip


def _setup(lab: Lab) -> DashLab:
    agents = build(lab, {"a": ["n1", "n2"], "b": ["n3", "n4"]},
                   forwards={"a": [PortForward(50000, "10.1.0.11:50000", "tcp")]})  # fmt: skip
    op = lab.node("op")
    lab.attach(op, lab.internet(), [f"{OPERATOR}/24"])
    tc = _configs(agents, lab)
    for a in agents:
        _start(a)
    wait("full mesh", lambda: full_mesh(agents), 180, agents)
    log = lab.dir / "dashboard.log"
    op.popen(
        PY, "-m", "machined.spanctl.main", "--talosconfig", str(tc), "-e", PUBLIC_A,
        "dashboard", "--web", "127.0.0.1:0",
        log=log, private_run=False,
    )  # fmt: skip

    def url() -> int | None:
        m = re.search(r"dashboard: http://127\.0\.0\.1:(\d+)/", log.read_text(errors="replace"))
        return int(m.group(1)) if m else None

    port = wait("dashboard listening", url, 30, agents)
    return DashLab(lab, agents, op, port)


def _kill_apid(a: Agent) -> None:
    """SIGKILL ``a``'s apid only (machined and the mesh stay up)."""
    for pid in a.node.pids():
        with contextlib.suppress(OSError):
            if b"machined.apid.main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest_asyncio.fixture(loop_scope="session")
async def dash() -> AsyncIterator[DashLab]:
    lab = Lab()
    await asyncio.to_thread(lab.__enter__)
    try:
        yield await asyncio.to_thread(_setup, lab)
    finally:
        await asyncio.to_thread(lab.__exit__, None, None, None)


RING = """() => {
  const cs = getComputedStyle(document.activeElement);
  return cs.outlineStyle !== "none" && parseFloat(cs.outlineWidth) > 0;
}"""

ALL_UP = """names => names.every(r => {
  const tr = document.querySelector(`#matrix tr[data-node="${r}"]`);
  return tr && tr.dataset.reach === "ok" && names.every(c => {
    const td = tr.querySelector(`td[data-col="${c}"]`);
    return td && (r === c ? td.dataset.state === "self" : td.dataset.state === "up" && td.dataset.stale === "0");
  });
})"""


@pytest.mark.timeout(900)  # a 4-node lab, trustd certificates and a node restart: minutes on a loaded machine
async def test_dashboard_live_matrix_through_node_loss_and_restart(
    page: Any, shot: Shot, dash: DashLab
) -> None:
    async with tcp_forward(lambda: dash.op.connect_tcp("127.0.0.1", dash.port)) as port:
        await page.goto(f"http://127.0.0.1:{port}/")
        # the workers' apids get their certificates from n1's trustd: allow for that
        await page.wait_for_function(ALL_UP, arg=NAMES, timeout=240_000)
        assert await page.locator("#matrix tbody tr").count() == 4
        nodes = page.locator("#nodes tbody tr")
        assert await nodes.evaluate_all("rs => rs.map(r => r.dataset.node)") == NAMES
        n1 = await page.locator('#nodes tr[data-node="n1"]').inner_text()
        assert "controlplane" in n1 and "✓ reachable" in n1, n1
        assert await page.locator("#topology line.edge.e-up").count() == 6
        assert await page.locator("#banner").is_hidden()
        await shot(page, "all-up")

        # n4 goes away (machined, apid, wireguard-go SIGKILLed): its row turns unreachable, kept
        t0 = time.monotonic()
        await asyncio.to_thread(kill_node, dash.agent("n4").node)
        await page.wait_for_function(
            """() => {
              const tr = document.querySelector('#matrix tr[data-node="n4"]');
              return tr && tr.dataset.reach === "unreachable";
            }""",
            timeout=20_000,
        )
        print(f"n4's row unreachable {time.monotonic() - t0:.2f}s after the kill")
        row = page.locator('#matrix tr[data-node="n4"]')
        assert "unreachable" in await row.locator("th").inner_text()
        stale = await row.locator("td[data-col]").evaluate_all(
            "tds => tds.filter(t => t.dataset.col !== 'n4').map(t => t.dataset.stale)"
        )
        assert stale == ["1", "1", "1"], stale
        assert "unreachable" in await page.locator('#nodes tr[data-node="n4"]').inner_text()
        await shot(page, "n4-killed")

        # n4 back: fresh data, every pair up again
        t0 = time.monotonic()
        await asyncio.to_thread(_start, dash.agent("n4"))
        await page.wait_for_function(ALL_UP, arg=NAMES, timeout=240_000)
        print(f"every pair up again {time.monotonic() - t0:.1f}s after n4's restart")
        await shot(page, "n4-back")

        # the apid the dashboard goes through (n1's) goes away: a banner, every row unreachable and
        # stale, nothing dropped; back: every pair up and fresh again, without reloading the page
        await asyncio.to_thread(_kill_apid, dash.agent("n1"))
        await page.wait_for_function(
            """names => !document.getElementById("banner").hidden && names.every(n =>
                document.querySelector(`#matrix tr[data-node="${n}"]`).dataset.reach === "unreachable")""",
            arg=NAMES,
            timeout=20_000,
        )
        assert "stale" in await page.locator("#banner").inner_text()
        assert await page.locator("#matrix tbody tr").count() == 4
        await shot(page, "apid-lost")
        await asyncio.to_thread(_start_apid, dash.agent("n1"))
        await page.wait_for_function(ALL_UP, arg=NAMES, timeout=120_000)
        assert await page.locator("#banner").is_hidden()
        await shot(page, "apid-back")

        # keyboard only: skip link, then one tab stop for the whole matrix; focus visible on each
        walk = await tab_walk(page, 2)
        assert [f.tag for f in walk] == ["a", "td"], [str(f) for f in walk]
        assert walk[0].text == "Skip to the mesh matrix"
        assert all(f.visible_indicator for f in walk), [str(f) for f in walk]
        focused = "() => [document.activeElement.dataset.row, document.activeElement.dataset.col]"
        assert await page.evaluate(focused) == ["n1", "n1"]
        await page.keyboard.press("ArrowRight")
        await page.keyboard.press("ArrowDown")
        await page.keyboard.press("ArrowDown")
        assert await page.evaluate(focused) == ["n3", "n2"]
        await page.keyboard.press("Enter")
        detail = page.locator("#detail")
        await detail.locator("h3.pair").wait_for()
        text = await detail.inner_text()
        assert "n3 ↔ n2" in text and "n3 → n2" in text and "n2 → n3" in text, text
        assert "why not direct" in text and "Endpoint history" in text, text
        assert re.search(r"RTT\s+(\u2013|\d+\.\d ms)", text), text  # a value or a dash, never a 0 made up
        await page.keyboard.press("Tab")
        assert await page.evaluate("() => document.activeElement.textContent") == "Close details"
        assert await page.evaluate(RING), "no focus indicator on the close button"
        # live updates (counters every 5 s) redraw the details without taking the focus away
        seen = await page.evaluate("() => document.body.dataset.version")
        await page.wait_for_function("v => document.body.dataset.version !== v", arg=seen, timeout=30_000)
        assert await page.evaluate("() => document.activeElement.textContent") == "Close details"
        await shot(page, "keyboard-detail")
        await page.keyboard.press("Enter")
        assert await page.evaluate(focused) == ["n3", "n2"]
