"""The dashboard's agent source: an agent's ``/status`` document (the shape ``MeshSnapshot.status()``
serves) turned into the view model's inputs, the poller's reachability semantics (unreachable at once,
data kept and stale, never dropped, back on the next answer), and ``--agent``'s command-line rules."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from aiohttp import web

from kubespan.snapshot import NatStatus, PeerStatus
from kubespan.testing import mesh_status, peer_status
from machined.spanctl.dashboard import model
from machined.spanctl.dashboard.agents import (
    AgentCollector,
    AgentURLError,
    parse_agent_url,
    status_resources,
)
from machined.spanctl.main import main

NOW = 1_800_000_000.0
NAMES = ("a1", "b1", "h1")


def peer(label: str, **kw: Any) -> PeerStatus:
    base: dict[str, Any] = {
        "node_id": f"id-{label}",
        "public_key": f"key-{label}=",
        "mesh_address": f"fd00::{label}",
        "endpoint": f"198.51.100.{len(label) + 10}:51820",
        "rx_bytes": 1000,
        "tx_bytes": 2000,
        "last_handshake": NOW - 5,
        "last_endpoint_change": NOW - 60,
        "endpoint_switches": 1,
        "nat_class": "eim",
        "path": "direct",
        "rtt": 0.0012,
        "connect_time": 0.4,
    }
    return peer_status(label, **(base | kw))


def status_doc(name: str, peers: list[PeerStatus], nat_class: str = "eim") -> dict[str, Any]:
    """A ``/status`` body as the agent serves it: ``MeshStatus.as_dict()`` through JSON."""
    st = mesh_status(
        *peers,
        node_id=f"id-{name}",
        nodename=name,
        public_key=f"key-{name}=",
        mesh_address=f"fd00::{name}",
        backend="wireguard-go",
        endpoints=("10.1.0.11:51820", "203.0.113.7:40001"),
        nat=NatStatus(nat_class=nat_class, mapped="203.0.113.7:40001", published="203.0.113.7:40001"),
    )
    return json.loads(json.dumps(st.as_dict()))


def full_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for n in NAMES:
        ps = []
        for o in NAMES:
            if o == n:
                continue
            relayed = "h1" in (n, o)
            ps.append(
                peer(
                    o,
                    path="relay" if relayed else "direct",
                    relay_via="relay" if relayed else None,
                    why_not_direct="both behind symmetric NAT" if relayed else None,
                )
            )
        docs[n] = status_doc(n, ps, "edm" if n == "h1" else "eim")
    return docs


def test_status_resources_map_every_field_the_model_reads() -> None:
    res = status_resources(full_docs()["h1"])
    spec = res["peers"]["key-a1="]
    assert spec["label"] == "a1" and spec["state"] == "up" and spec["endpoint"] == "198.51.100.12:51820"
    assert spec["path"] == "relay" and spec["relayVia"] == "relay"
    assert spec["whyNotDirect"] == "both behind symmetric NAT"
    assert spec["receiveBytes"] == 1000 and spec["transmitBytes"] == 2000 and spec["rtt"] == 0.0012
    assert model.epoch(spec["lastHandshakeTime"]) == pytest.approx(NOW - 5)
    assert model.epoch(spec["lastEndpointChange"]) == pytest.approx(NOW - 60)
    assert res["nat"]["identity"]["natClass"] == "edm"
    assert res["nat"]["identity"]["mappedEndpoint"] == "203.0.113.7:40001"
    assert res["addresses"]["current"]["addresses"] == ["10.1.0.11", "203.0.113.7"]
    assert res["affiliates"]["id-h1"] == {"nodename": "h1", "kubespan": {"address": "fd00::h1"}}
    assert res["affiliates"]["id-a1"]["kubespan"]["address"] == "fd00::a1"
    assert "services" not in res and "members" not in res


def test_view_from_agents_every_pair_up_cells_and_node_rows() -> None:
    nodes = [
        model.NodeInput(f"http://127.0.0.1:{i}", n, model.REACH_OK, resources=status_resources(d))
        for i, (n, d) in enumerate(full_docs().items())
    ]
    v = model.build_view(nodes, {}, NOW)
    assert v["names"] == list(NAMES)
    assert v["summary"] == {"nodes": 3, "reachable": 3, "pairsUp": 6, "pairs": 6}
    c = v["matrix"]["h1"]["a1"]
    assert c["state"] == "up" and c["path"] == "relay" and c["relayVia"] == "relay" and c["rtt"] == 0.0012
    assert c["handshake"] == pytest.approx(NOW - 5) and c["rx"] == 1000 and c["connectTime"] == 0.4
    assert v["matrix"]["a1"]["b1"]["path"] == "direct"
    row = {r["name"]: r for r in v["nodes"]}["h1"]
    assert row["meshAddress"] == "fd00::h1" and row["natClass"] == "edm" and row["peersUp"] == 2
    assert row["services"] is None  # /status has no services: the page shows a dash, not "0/0 healthy"
    assert row["site"] == "public 203.0.113.7"
    assert {(e["a"], e["b"]): e["path"] for e in v["edges"]} == {
        ("a1", "b1"): "direct",
        ("a1", "h1"): "relay",
        ("b1", "h1"): "relay",
    }


def test_malformed_status_parts_are_skipped_not_raised() -> None:
    res = status_resources({"nodename": "x", "peers": [None, {"label": "y", "rx_bytes": "many"}], "nat": 3})
    assert list(res["peers"].values()) == [
        {**res["peers"]["1"], "label": "y", "receiveBytes": None, "state": "unknown"}
    ]
    assert res["nat"] == {} and res["addresses"] == {"current": {"addresses": []}}
    assert status_resources({}) == {
        "peers": {},
        "nat": {},
        "affiliates": {},
        "addresses": {"current": {"addresses": []}},
    }


def test_unreachable_agent_is_kept_stale_and_comes_back() -> None:
    t = [NOW]
    col = AgentCollector(["http://127.0.0.1:1", "http://127.0.0.1:2"], clock=lambda: t[0])
    a, b = col.nodes.values()
    docs = full_docs()
    col.accept(a, docs["a1"])
    col.fail(b, "http://127.0.0.1:2: cannot connect")
    v = col.view()
    rows = {r["name"]: r for r in v["nodes"]}
    assert rows["a1"]["reach"] == "ok" and not rows["a1"]["stale"]
    # the agent that never answered is a row under its URL; a1's peers b1 and h1 are rows too
    assert rows["http://127.0.0.1:2"]["reach"] == "unreachable"
    assert "cannot connect" in rows["http://127.0.0.1:2"]["error"]
    assert rows["b1"]["reach"] == "unwatched"
    t[0] += 3
    before = col.version
    col.fail(a, "http://127.0.0.1:1: no answer in time")
    assert col.version == before + 1
    v = col.view()
    row = {r["name"]: r for r in v["nodes"]}["a1"]
    assert row["reach"] == "unreachable" and row["stale"] and row["since"] == NOW + 3
    assert v["matrix"]["a1"]["b1"]["state"] == "up" and v["matrix"]["a1"]["b1"]["stale"]
    assert v["summary"]["pairsUp"] == 0  # a stale "up" is not counted as up
    col.fail(a, "http://127.0.0.1:1: no answer in time")
    assert col.version == before + 1  # the same failure again changes nothing
    col.accept(a, docs["a1"])
    row = {r["name"]: r for r in col.view()["nodes"]}["a1"]
    assert row["reach"] == "ok" and not row["stale"]


def test_history_records_path_changes_once() -> None:
    t = [NOW]
    col = AgentCollector(["http://127.0.0.1:1"], clock=lambda: t[0])
    (st,) = col.nodes.values()
    col.accept(st, status_doc("a1", [peer("b1")]))
    col.accept(st, status_doc("a1", [peer("b1", rx_bytes=5000)]))  # counters alone: no entry
    t[0] += 1
    col.accept(st, status_doc("a1", [peer("b1", path="relay", relay_via="relay")]))
    hist = col.view()["history"]["a1|b1"]
    assert [(h["path"], h["relayVia"]) for h in hist] == [("direct", ""), ("relay", "relay")]


async def test_polls_a_served_status_and_marks_a_stopped_agent_unreachable() -> None:
    """Against an aiohttp server that serves a /status document (a stand-in agent in a unit test)."""
    doc = full_docs()["b1"]
    app = web.Application()

    async def status(_: web.Request) -> web.Response:
        return web.json_response(doc)

    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    col = AgentCollector([f"http://127.0.0.1:{port}"], interval=0.1, timeout=0.5)
    task = asyncio.create_task(col.run())
    try:
        async with asyncio.timeout(5):
            while col.view()["summary"]["reachable"] != 1:
                await col.event.wait()
        assert json.loads(col.view_json())["matrix"]["b1"]["a1"]["state"] == "up"
        await runner.cleanup()
        async with asyncio.timeout(5):
            while col.view()["summary"]["reachable"] != 0:
                await col.event.wait()
        row = {r["name"]: r for r in col.view()["nodes"]}["b1"]
        assert row["reach"] == "unreachable" and row["stale"] and str(port) in row["error"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await runner.cleanup()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("http://127.0.0.1:51821", "http://127.0.0.1:51821"),
        ("http://127.0.0.1:51821/", "http://127.0.0.1:51821"),
        ("http://127.0.0.1:51821/status", "http://127.0.0.1:51821"),
        ("https://[::1]:8443/agent/", "https://[::1]:8443/agent"),
    ],
)
def test_parse_agent_url(text: str, want: str) -> None:
    assert parse_agent_url(text) == want


@pytest.mark.parametrize(
    "text", ["127.0.0.1:51821", "ftp://h/", "http://", "http://h:99999", "http://h/?x=1"]
)
def test_parse_agent_url_refuses_naming_the_flag(text: str) -> None:
    with pytest.raises(AgentURLError, match="--agent"):
        parse_agent_url(text)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["-n", "10.5.0.2", "dashboard", "--web", "--agent", "http://127.0.0.1:1"], "-n/--nodes"),
        (["dashboard", "--web", "--agent", "http://127.0.0.1:1", "-e", "10.5.0.2"], "-e/--endpoints"),
        (["dashboard", "--web", "--agent", "http://127.0.0.1:1", "--socket", "/run/m.sock"], "--socket"),
    ],
)
def test_agent_with_apid_flags_is_refused(argv: list[str], flag: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, out, err) == 1
    assert "--agent" in err.getvalue() and flag in err.getvalue(), err.getvalue()
    assert out.getvalue() == ""


def test_bad_agent_url_is_refused_before_serving() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["dashboard", "--web", "127.0.0.1:0", "--agent", "localhost:51821"], out, err) == 1
    assert "--agent 'localhost:51821'" in err.getvalue() and out.getvalue() == ""
