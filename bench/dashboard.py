"""spanctl dashboard with 50 nodes: first render <= 1 s, an update shown <= 2 s (issue 17).

Fake data plane: 50 nodes' KubeSpanPeerStatuses (a mix of lan, direct and relayed pairs, a few down,
one node unreachable with stale data) go through the real view model (``model.build_view``) and the
real web server (``server.make_app``: the page, ``/events`` SSE) into Debian's chromium, headless,
driven by Playwright. Measured in the browser:

* render: from navigation start to the first frame painted after the page rendered the first SSE view
  (every one of the 2,500 cells filled): page load, SSE connect, JSON parse, DOM, layout and paint;
  the first of six loads warms the browser and is not counted (an operator's browser is running);
* update: from the server taking a change (one pair goes down, and 5 nodes' rows of counters, as 50
  nodes flushing theirs every 5 s give per 0.5 s view) to the page showing it, with the
  server's default coalescing (one view per 0.5 s at most), wall time on one clock, over ``--updates``
  changes 0.7 s apart (a change right after a sent view waits for the next slot, as in real use).

Prints medians and ``RESULT`` lines (worst figures against the targets); exit status 1 on a MISS.

    .venv/bin/python bench/dashboard.py [--nodes 50] [--updates 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

from aiohttp import web

from machined.spanctl.dashboard import model
from machined.spanctl.dashboard.server import make_app

CHROMIUM = "/usr/bin/chromium"
RENDER_TARGET = 1.0
# the time of the first frame painted after the page's first render (its <body data-version> appears)
PAINTED = """
new MutationObserver((_, obs) => {
  if (!document.body || !document.body.dataset.version) return;
  obs.disconnect();
  requestAnimationFrame(() => setTimeout(() => { window.__painted = performance.now(); }, 0));
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-version"]});
"""
UPDATE_TARGET = 2.0


def fake_nodes(
    n: int, start: float, down: set[tuple[int, int]], flushes: dict[int, int]
) -> list[model.NodeInput]:
    """``n`` nodes in 5 sites; pairs in one site go lan, across sites direct, every 7th relayed;
    node n-1 unreachable (stale data kept). ``flushes[i]``: how often node i wrote its counters (each
    time its whole row changes: bytes and handshake time, as machined's every 5 s)."""
    names = [f"node-{i:02d}" for i in range(n)]
    out = []
    for i, name in enumerate(names):
        peers = {}
        for j, other in enumerate(names):
            if i == j:
                continue
            path = "lan" if i % 5 == j % 5 else ("relay" if (i + j) % 7 == 0 else "direct")
            state = "down" if (i, j) in down else "up"
            peers[f"key-{j}"] = {
                "label": other,
                "state": state,
                "path": path if state == "up" else "none",
                "relayVia": names[(i + j) % n] if path == "relay" else "",
                "whyNotDirect": "both behind symmetric NAT" if path == "relay" else "",
                "endpoint": f"10.{j % 5}.0.{j + 10}:51820",
                "lastHandshakeTime": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + 5 * flushes.get(i, 0))
                ),
                "receiveBytes": 1000 * j + 148 * flushes.get(i, 0),
                "transmitBytes": 2000 * j + 148 * flushes.get(i, 0),
                "connectTime": 0.3,
            }
        res = {
            "peers": peers,
            "members": {
                name: {"hostname": name, "machineType": "worker", "addresses": [f"10.{i % 5}.0.{i + 10}"]}
            },
            "nat": {"local": {"natClass": "easy", "mappedEndpoint": f"198.51.100.{i % 5 + 10}:4000"}},
            "services": {
                "machined": {"running": True, "healthy": True},
                "apid": {"running": True, "healthy": True},
            },
        }
        reach = model.REACH_UNREACHABLE if i == n - 1 else model.REACH_OK
        out.append(
            model.NodeInput(f"10.{i % 5}.0.{i + 10}", name, reach, "", start, reach != "ok", "v0.1.0", res)
        )
    return out


class FakeSource:
    """What ``make_app`` reads from a collector: ``version``, ``event``, ``current()``, ``view_json()``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.down: set[tuple[int, int]] = set()
        self.flushes: dict[int, int] = {}
        self.start = time.time()
        self.version = 0
        self.event = asyncio.Event()
        self._view: dict = {}
        self._json = ""
        self._build()

    def _build(self) -> None:
        now = time.time()
        self._view = model.build_view(fake_nodes(self.n, self.start, self.down, self.flushes), {}, now)
        self._json = json.dumps(self._view, separators=(",", ":"))

    def current(self) -> tuple[int, dict, str]:
        return self.version, self._view, self._json

    def view_json(self) -> str:
        return self._json

    def change(self, pair: tuple[int, int], k: int) -> None:
        """``pair`` goes down; 5 nodes (a tenth: each flushes every 5 s, a view goes every 0.5 s) wrote
        their counters meanwhile: ~250 cells change."""
        self.down.add(pair)
        for i in range(5 * k, 5 * k + 5):
            self.flushes[i % self.n] = self.flushes.get(i % self.n, 0) + 1
        self._build()
        self.version += 1
        old, self.event = self.event, asyncio.Event()
        old.set()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--updates", type=int, default=10)
    args = ap.parse_args()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        async_playwright = None
    if async_playwright is None or not os.access(CHROMIUM, os.X_OK):
        print(
            f"RESULT dashboard render{args.nodes}_worst_s=nan target<={RENDER_TARGET:g} SKIP (no playwright or {CHROMIUM})"
        )
        return 0

    src = FakeSource(args.nodes)
    t0 = time.perf_counter()
    src._build()
    model_ms = (time.perf_counter() - t0) * 1000
    runner = web.AppRunner(make_app(src), access_log=None)  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cells = args.nodes * args.nodes
    renders: list[float] = []
    updates: list[float] = []
    render_ms: list[float] = []
    try:
        async with async_playwright() as pw:
            b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            for k in range(6):  # the first load warms the browser (not counted): an operator's is running
                page = await b.new_page(viewport={"width": 1600, "height": 1000})
                await page.add_init_script(PAINTED)
                await page.goto(f"http://127.0.0.1:{port}/", wait_until="commit")
                await page.wait_for_function("() => window.__painted !== undefined", timeout=10_000)
                assert await page.locator("#matrix td[data-state]").count() == cells
                took = await page.evaluate("() => window.__painted") / 1000
                if k:
                    renders.append(took)
                await page.close()
            page = await b.new_page(viewport={"width": 1600, "height": 1000})
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.wait_for_function(
                "n => document.querySelectorAll('#matrix td[data-state]').length === n", arg=cells
            )
            for k in range(args.updates):
                i, j = k % args.nodes, (k * 7 + 1) % args.nodes
                if i == j:
                    j = (j + 1) % args.nodes
                sel = f'#matrix td[data-row="node-{i:02d}"][data-col="node-{j:02d}"]'
                await asyncio.sleep(0.7)
                t = time.perf_counter()
                src.change((i, j), k)
                await page.wait_for_function(
                    "s => document.querySelector(s).dataset.state === 'down'",
                    arg=sel,
                    timeout=10_000,
                    polling=10,
                )
                updates.append(time.perf_counter() - t)
                render_ms.append(float(await page.evaluate("() => document.body.dataset.renderMs")))
            await b.close()
    finally:
        await runner.cleanup()
    r_med, r_max = statistics.median(renders), max(renders)
    u_med, u_max = statistics.median(updates), max(updates)
    size = len(src.view_json()) / 1024
    print(
        f"dashboard, {args.nodes} nodes ({cells} cells), view {size:.0f} KiB, model build {model_ms:.0f} ms"
    )
    print(
        f"  page's render() per update: median {statistics.median(render_ms):.0f} ms, worst {max(render_ms):.0f} ms"
    )
    ok_r, ok_u = r_max <= RENDER_TARGET, u_max <= UPDATE_TARGET
    print(f"  first render: median {r_med:.2f}s over {len(renders)} loads (target <= {RENDER_TARGET:g} s)")
    print(f"  update shown: median {u_med:.2f}s over {len(updates)} changes (target <= {UPDATE_TARGET:g} s)")
    print(
        f"RESULT dashboard render{args.nodes}_worst_s={r_max:.2f} target<={RENDER_TARGET:g} {'PASS' if ok_r else 'MISS'}"
    )
    print(
        f"RESULT dashboard update{args.nodes}_worst_s={u_max:.2f} target<={UPDATE_TARGET:g} {'PASS' if ok_u else 'MISS'}"
    )
    return 0 if ok_r and ok_u else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
