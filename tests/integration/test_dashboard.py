"""spanctl dashboard's collector and web server against real apids (in this process) in front of real
machine API servers over small fake nodes whose resources the test writes: watches through apid with
mTLS, a change reaching the view and the SSE stream within 2 s, a node whose machined goes away
marked unreachable with its data kept as stale, and its recovery after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web

from machined.api.server import serve
from machined.apid.testing import Cluster, start_apid, start_fake_machined
from machined.spanctl.dashboard.collector import Collector
from machined.spanctl.dashboard.server import make_app
from machined.spanctl.main import main
from machined.state import Resource
from machined.state.errors import NotFoundError

PEERS = ("kubespan", "KubeSpanPeerStatuses.kubespan.talos.dev")


def status(label: str, state: str = "up") -> dict:
    return {
        "label": label,
        "state": state,
        "endpoint": "10.0.0.1:51820",
        "path": "direct" if state == "up" else "none",
        "lastHandshakeTime": "2027-01-01T00:00:00Z",
        "receiveBytes": 1,
        "transmitBytes": 2,
    }


async def put(node, label: str, state: str = "up") -> None:
    r = Resource.new(*PEERS, f"key-{label}", status(label, state))
    try:
        await node.state.get(*PEERS, f"key-{label}")
    except NotFoundError:
        await node.state.create(r, owner="test")
    else:
        await node.state.update(r, owner="test")


async def until(what: str, pred, limit: float):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        v = pred()
        if v:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {limit}s")


def cells(view: dict) -> dict:
    return {(r, c): cell["state"] for r, row in view["matrix"].items() for c, cell in row.items()}


async def test_collector_through_apid_live_changes_node_loss_and_recovery(tmp_path: Path) -> None:
    cluster = Cluster.create(tmp_path)
    names = ["n1", "n2", "n3"]
    fakes, servers, apids = {}, {}, {}
    try:
        for n in names:
            d = tmp_path / n
            d.mkdir()
            fakes[n], servers[n], sock = await start_fake_machined(n, d)
            for other in names:
                if other != n:
                    await put(fakes[n], other)
            apids[n] = await start_apid(cluster, sock, n)
        targets = [f"127.0.0.1:{apids[n].port}" for n in names]
        ch = cluster.channel(apids["n1"].port, cluster.client("os:reader"))
        col = Collector(ch, targets=targets, where="front", retry=0.3, heartbeat=0.5, timeout=3)
        task = asyncio.create_task(col.run())
        try:
            await until(
                "every pair up",
                lambda: (
                    (v := col.view())["names"] == names
                    and all(s in ("up", "self") for s in cells(v).values())
                    and all(n["reach"] == "ok" for n in v["nodes"])
                ),
                15,
            )
            v = col.view()
            assert {n["name"]: n["version"] != "" for n in v["nodes"]} == dict.fromkeys(names, True)
            assert v["link"]["ok"] is True

            # a change on n1 reaches the view within 2 s, with a history entry
            await put(fakes["n1"], "n2", "down")
            took = await until("n1 sees n2 down", lambda: cells(col.view())[("n1", "n2")] == "down", 2)
            print(f"change shown after {took:.2f}s")
            hist = col.view()["history"]["n1|n2"]
            assert [h["state"] for h in hist] == ["up", "down"]

            # n3's machined goes away: n3 unreachable, its row kept as stale, the others fresh
            sock3 = servers["n3"].path
            await servers["n3"].stop()
            await until("n3 unreachable", lambda: _reach(col.view(), "n3") == "unreachable", 5)
            v = col.view()
            row = next(n for n in v["nodes"] if n["name"] == "n3")
            assert row["stale"] is True and row["error"] and "internal error" not in row["error"], row
            print("n3 unreachable:", row["error"])
            assert v["matrix"]["n3"]["n1"] == {**v["matrix"]["n3"]["n1"], "state": "up", "stale": True}
            assert v["matrix"]["n1"]["n3"]["stale"] is False

            # back: fresh data again (the restarted node reports n1 down now)
            servers["n3"] = await serve(fakes["n3"], sock3)
            await put(fakes["n3"], "n1", "down")
            await until("n3 back", lambda: _reach(col.view(), "n3") == "ok", 10)
            await until("n3 fresh", lambda: cells(col.view())[("n3", "n1")] == "down", 2)
            assert col.view()["matrix"]["n3"]["n1"]["stale"] is False
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await ch.close()
    finally:
        for a in apids.values():
            await a.stop()
        for s in servers.values():
            await s.stop()


def _reach(view: dict, name: str) -> str:
    return next((n["reach"] for n in view["nodes"] if n["name"] == name), "")


async def test_web_server_page_view_events_and_host_guard(tmp_path: Path) -> None:
    cluster = Cluster.create(tmp_path)
    fake, srv, sock = await start_fake_machined("n1", tmp_path)
    await put(fake, "n2")
    apid = await start_apid(cluster, sock, "n1")
    ch = cluster.channel(apid.port, cluster.client("os:reader"))
    col = Collector(ch, targets=[f"127.0.0.1:{apid.port}"], retry=0.3, heartbeat=0.5)
    task = asyncio.create_task(col.run())
    runner = web.AppRunner(make_app(col, loopback_only=True, min_interval=0.05))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/") as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
                page = await r.text()
                assert '<table id="matrix"' in page and "http" not in page.replace("http-equiv", "")
            for name in ("app.js", "style.css"):
                async with s.get(f"{base}/static/{name}") as r:
                    assert r.status == 200 and len(await r.read()) > 1000
            async with s.get(base + "/static/../server.py") as r:
                assert r.status == 404
            async with s.get(base + "/", headers={"Host": "evil.example:80"}) as r:
                assert r.status == 421

            await until("n1 ok", lambda: _reach(col.view(), "n1") == "ok", 10)
            async with s.get(base + "/api/view") as r:
                v = await r.json()
                assert v["matrix"]["n1"]["n2"]["state"] == "up"

            async with s.get(base + "/events") as r:
                assert r.headers["Content-Type"] == "text/event-stream"
                first = await _next_view(r)
                assert first["matrix"]["n1"]["n2"]["state"] == "up"
                t0 = time.monotonic()
                await put(fake, "n2", "down")
                v, kinds = first, []
                while True:
                    v = await asyncio.wait_for(_next_view(r, v, kinds), 2)
                    if v["matrix"]["n1"]["n2"]["state"] == "down":
                        break
                assert kinds and set(kinds) == {"patch"}, kinds  # after the first view, changes only
                assert v == json.loads(col.view_json()) | {"now": v["now"], "link": v["link"]}
                assert time.monotonic() - t0 < 2
    finally:
        await runner.cleanup()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ch.close()
        await apid.stop()
        await srv.stop()


async def _next_event(resp: aiohttp.ClientResponse) -> tuple[str, dict]:
    event = None
    while True:
        line = (await resp.content.readline()).decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event in ("view", "patch"):
            return event, json.loads(line[6:])


async def _next_view(
    resp: aiohttp.ClientResponse, held: dict | None = None, kinds: list | None = None
) -> dict:
    """The next view the stream gives: a whole one, or ``held`` with a patch applied (as app.js does);
    the event's kind is appended to ``kinds``."""
    event, data = await _next_event(resp)
    if kinds is not None:
        kinds.append(event)
    if event == "view":
        return data
    assert held is not None, "a patch before any view"
    out = {**held, **data["set"]}
    out["matrix"] = {r: dict(row) for r, row in held["matrix"].items()}
    for r, c, cell in data["cells"]:
        out["matrix"][r][c] = cell
    out["history"] = {**held["history"], **data["history"]}
    return out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["dashboard"], "--web"),
        (["dashboard", "--web", "0.0.0.0:1"], "--allow-remote"),
        (["dashboard", "--web", "10.0.0.1"], "--allow-remote"),
        (["dashboard", "--web", "127.0.0.1:http"], "port 'http' is not a number"),
    ],
)
def test_command_refuses_without_web_or_a_remote_address(argv, says, tmp_path: Path) -> None:
    """Refused before any connection is tried (the config does not even exist)."""
    out, err = io.StringIO(), io.StringIO()
    rc = main(["--config", str(tmp_path / "none"), *argv], out, err)
    assert rc == 1 and says in err.getvalue(), err.getvalue()


async def test_collector_on_machined_socket_without_apid(tmp_path: Path) -> None:
    """``spanctl --socket PATH dashboard --web``: one node, no routing metadata, no TLS."""
    fake, srv, sock = await start_fake_machined("solo", tmp_path)
    await put(fake, "peer-x", "down")
    ch = grpc.aio.insecure_channel(f"unix:{sock}")
    col = Collector(ch, direct=True, where=str(sock), retry=0.3, heartbeat=0.5)
    task = asyncio.create_task(col.run())
    try:
        await until("solo ok", lambda: _reach(col.view(), "solo") == "ok", 10)
        v = col.view()
        assert v["names"] == ["peer-x", "solo"]
        assert v["matrix"]["solo"]["peer-x"]["state"] == "down"
        assert next(n for n in v["nodes"] if n["name"] == "peer-x")["reach"] == "unwatched"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ch.close()
        await srv.stop()
