"""The dashboard's pure view model: matrix from peer statuses, stale marking, unreachable nodes kept,
node list fields, topology groups and edges, endpoint history; and the listen-address rules."""

from __future__ import annotations

import pytest

from machined.spanctl.dashboard import model
from machined.spanctl.dashboard.model import HistoryEntry, NodeInput, build_view, observe
from machined.spanctl.dashboard.server import ListenError, check_listen, parse_listen

NOW = 1_800_000_000.0
T = "2027-01-15T08:00:00Z"  # = NOW


def peer(label: str, state: str = "up", **extra) -> dict:
    spec = {
        "label": label,
        "state": state,
        "endpoint": f"10.0.0.{ord(label[-1]) % 250}:51820",
        "path": "direct" if state == "up" else "none",
        "relayVia": "",
        "whyNotDirect": "",
        "lastHandshakeTime": T,
        "receiveBytes": 1024,
        "transmitBytes": 2048,
        "connectTime": 0.25,
    }
    spec.update(extra)
    return spec


def node(name: str, peers: list[dict], **kw) -> NodeInput:
    res = {
        "peers": {p["label"]: p for p in peers},
        "members": {
            name: {"hostname": name, "machineType": kw.pop("role", "worker"), "addresses": ["10.9.0.1"]}
        },
    }
    res.update(kw.pop("resources", {}))
    return NodeInput(
        target=kw.pop("target", f"t-{name}"), name=name, reach=kw.pop("reach", "ok"), resources=res, **kw
    )


def full(names: list[str]) -> list[NodeInput]:
    return [node(n, [peer(o) for o in names if o != n]) for n in names]


def test_matrix_from_statuses_every_pair_up_and_self_on_the_diagonal() -> None:
    v = build_view(full(["a", "b", "c"]), {}, NOW)
    assert v["names"] == ["a", "b", "c"]
    for r in v["names"]:
        for c in v["names"]:
            want = "self" if r == c else "up"
            assert v["matrix"][r][c]["state"] == want, (r, c)
    c = v["matrix"]["a"]["b"]
    assert c["path"] == "direct" and c["handshake"] == NOW and c["rx"] == 1024 and c["tx"] == 2048
    assert c["connectTime"] == 0.25 and c["stale"] is False
    assert v["summary"] == {"nodes": 3, "reachable": 3, "pairsUp": 6, "pairs": 6}
    assert {(e["a"], e["b"], e["state"], e["path"]) for e in v["edges"]} == {
        ("a", "b", "up", "direct"),
        ("a", "c", "up", "direct"),
        ("b", "c", "up", "direct"),
    }


def test_down_peer_relay_path_and_absent_status() -> None:
    nodes = [
        node(
            "a",
            [
                peer("b", "down"),
                peer("c", path="relay", relayVia="b", whyNotDirect="both behind symmetric NAT"),
            ],
        ),
        node("b", [peer("a")]),  # b has no status for c
        node("c", [peer("a", path="relay", relayVia="b"), peer("b")]),
    ]
    v = build_view(nodes, {}, NOW)
    m = v["matrix"]
    assert m["a"]["b"]["state"] == "down"
    assert m["a"]["c"]["path"] == "relay" and m["a"]["c"]["relayVia"] == "b"
    assert m["a"]["c"]["whyNotDirect"] == "both behind symmetric NAT"
    assert m["b"]["c"]["state"] == "absent"
    edges = {(e["a"], e["b"]): e for e in v["edges"]}
    assert edges[("a", "b")]["state"] == "down"
    assert edges[("a", "c")]["path"] == "relay" and edges[("a", "c")]["relayVia"] == "b"
    assert v["summary"]["pairsUp"] == 4


def test_cell_round_trip_passes_through_and_is_absent_without_one_never_zero() -> None:
    nodes = [
        node("a", [peer("b", rtt=0.0123), peer("c", rtt=None)]),
        node("b", [peer("a")]),  # a status from before the rtt key: none
        node("c", [peer("a", rtt="fast"), peer("b", rtt=True)]),  # garbage: none
    ]
    m = build_view(nodes, {}, NOW)["matrix"]
    assert m["a"]["b"]["rtt"] == 0.0123
    for r, c in (("a", "c"), ("b", "a"), ("c", "a"), ("c", "b")):
        assert "rtt" not in m[r][c], (r, c)  # the page shows a dash for a missing rtt
    assert model.cell({"state": "up", "rtt": 0}, stale=False)["rtt"] == 0.0, "a measured 0 is kept"


def test_unreachable_node_is_kept_with_its_last_data_marked_stale() -> None:
    nodes = full(["a", "b", "c"])
    nodes[2] = NodeInput("t-c", "c", "unreachable", "cannot connect", NOW - 5, True, "", nodes[2].resources)
    v = build_view(nodes, {}, NOW)
    row = next(n for n in v["nodes"] if n["name"] == "c")
    assert row["reach"] == "unreachable" and row["error"] == "cannot connect" and row["stale"] is True
    assert row["since"] == NOW - 5
    assert v["matrix"]["c"]["a"]["state"] == "up" and v["matrix"]["c"]["a"]["stale"] is True
    assert v["matrix"]["a"]["c"]["stale"] is False  # what a reports is fresh
    edges = {(e["a"], e["b"]): e for e in v["edges"]}
    assert edges[("a", "c")]["state"] == "up"  # judged by the fresh direction only
    assert v["summary"]["reachable"] == 2
    assert v["summary"]["pairsUp"] == 4  # c's two stale "up"s are not counted


def test_node_never_reached_and_peers_only_known_by_label_are_rows() -> None:
    nodes = [
        node("a", [peer("b"), peer("ghost", "down")]),
        NodeInput("10.0.0.9", "", "unreachable", "no route"),
    ]
    v = build_view(nodes, {}, NOW)
    assert v["names"] == ["10.0.0.9", "a", "b", "ghost"]
    reach = {n["name"]: n["reach"] for n in v["nodes"]}
    assert reach == {"10.0.0.9": "unreachable", "a": "ok", "b": "unwatched", "ghost": "unwatched"}
    assert v["matrix"]["10.0.0.9"]["a"]["state"] == "nodata"
    assert v["matrix"]["b"]["a"]["state"] == "nodata"
    assert v["matrix"]["a"]["ghost"]["state"] == "down"


def test_node_list_fields() -> None:
    res = {
        "addresses": {"current": {"addresses": ["10.1.0.11/24", "fd00::1/128"]}},
        "nat": {"local": {"natClass": "easy", "mappedEndpoint": "198.51.100.11:40000"}},
        "services": {
            "machined": {"running": True, "healthy": True, "unknown": False},
            "apid": {"running": True, "healthy": False, "unknown": False},
            "kubespan": {"running": False, "healthy": False, "unknown": True},
        },
        "affiliates": {"id1": {"nodename": "a", "kubespan": {"address": "fd7a::1"}}},
    }
    n = node("a", [], role="controlplane", resources=res, version="v0.1.0")
    row = build_view([n], {}, NOW)["nodes"][0]
    assert row["role"] == "controlplane" and row["version"] == "v0.1.0"
    assert row["addresses"] == ["10.1.0.11/24", "fd00::1/128"]
    assert row["meshAddress"] == "fd7a::1" and row["natClass"] == "easy"
    assert row["site"] == "public 198.51.100.11"
    assert row["services"] == {"total": 3, "unhealthy": ["apid"], "stopped": ["kubespan"]}


def test_groups_by_site_public_address_else_lan() -> None:
    nat = {"nat": {"local": {"natClass": "easy", "mappedEndpoint": "198.51.100.11:4000"}}}
    nodes = [
        node("a", [], resources=nat),
        node("b", [], resources=nat),
        node("c", [], resources={"addresses": {"current": {"addresses": ["10.2.0.11/24"]}}}),
    ]
    groups = build_view(nodes, {}, NOW)["groups"]
    assert groups == [
        {"key": "lan 10.2.0.0/24", "natClasses": [], "nodes": ["c"]},
        {"key": "public 198.51.100.11", "natClasses": ["easy"], "nodes": ["a", "b"]},
    ]


def test_observe_appends_only_changes_and_caps_history() -> None:
    h = observe({}, "a", [peer("b")], 1.0)
    h = observe(h, "a", [peer("b", receiveBytes=99)], 2.0)  # counters only: no entry
    assert [e.time for e in h[("a", "b")]] == [1.0]
    h = observe(h, "a", [peer("b", endpoint="1.2.3.4:5")], 3.0)
    h = observe(h, "a", [peer("b", "down", endpoint="1.2.3.4:5")], 4.0)
    assert [(e.time, e.endpoint, e.state) for e in h[("a", "b")]][1:] == [
        (3.0, "1.2.3.4:5", "up"),
        (4.0, "1.2.3.4:5", "down"),
    ]
    for i in range(30):
        h = observe(h, "a", [peer("b", endpoint=f"1.1.1.{i}:1")], 10.0 + i, limit=5)
    assert len(h[("a", "b")]) == 5 and h[("a", "b")][-1].endpoint == "1.1.1.29:1"
    v = build_view(full(["a", "b"]), h, NOW)
    assert v["history"]["a|b"][-1]["endpoint"] == "1.1.1.29:1"


def test_history_of_unknown_names_is_left_out() -> None:
    h = {("x", "y"): [HistoryEntry(1.0, "e", "direct", "up")]}
    assert build_view(full(["a", "b"]), h, NOW)["history"] == {}


def test_bad_specs_do_not_break_the_view() -> None:
    n = NodeInput(
        "t", "a", "ok", resources={"peers": {"k": None, "j": {"label": "b", "lastHandshakeTime": "garbage"}}}
    )
    v = build_view([n], {}, NOW)
    assert v["matrix"]["a"]["b"]["state"] == "unknown" and "handshake" not in v["matrix"]["a"]["b"]
    assert model.epoch("0001-01-01T00:00:00Z") is None


@pytest.mark.parametrize(
    ("addr", "want"),
    [
        (None, ("127.0.0.1", 50080)),
        ("", ("127.0.0.1", 50080)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost", ("localhost", 50080)),
        (":9000", ("", 9000)),
        ("[::1]:7000", ("::1", 7000)),
        ("[::1]", ("::1", 50080)),
        ("::1", ("::1", 50080)),
        ("127.0.0.2:0", ("127.0.0.2", 0)),
    ],
)
def test_parse_listen(addr, want) -> None:
    assert parse_listen(addr) == want


@pytest.mark.parametrize("addr", ["127.0.0.1:http", "127.0.0.1:70000", "[::1", "[::1]x"])
def test_parse_listen_refuses_garbage_naming_the_flag(addr) -> None:
    with pytest.raises(ListenError, match="--web"):
        parse_listen(addr)


def test_non_loopback_needs_allow_remote() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.1.2.3"):
        check_listen(host, allow_remote=False)
    for host in ("0.0.0.0", "", "10.0.0.1", "example.org", "::"):
        with pytest.raises(ListenError, match="--allow-remote"):
            check_listen(host, allow_remote=False)
        check_listen(host, allow_remote=True)


async def test_collector_routes_by_node_and_keeps_the_cluster_metadata() -> None:
    import grpc

    from machined.spanctl.dashboard.collector import Collector

    ch = grpc.aio.insecure_channel("unix:/nonexistent.sock")
    try:
        c = Collector(ch, targets=[], metadata=(("context", "prod"),))
        assert c._md("10.0.0.1") == [("node", "10.0.0.1"), ("context", "prod")]
        assert c._md("") == [("context", "prod")]  # the endpoint's own node: no routing
        d = Collector(ch, direct=True)
        assert d._md("10.0.0.1") == []  # a unix socket reaches one machined: never routed
    finally:
        await ch.close()


def apply_patch(view: dict, patch: dict) -> dict:
    """What the page does with a ``patch`` event (app.js), in Python."""
    out = {**view, **patch["set"]}
    out["matrix"] = {r: dict(row) for r, row in view["matrix"].items()}
    for r, c, cell in patch["cells"]:
        out["matrix"][r][c] = cell
    out["history"] = {**view["history"], **patch["history"]}
    return out


def test_diff_view_carries_only_changes_and_rebuilds_the_view() -> None:
    names = [f"n{i}" for i in range(6)]
    old = build_view(full(names), {}, NOW)
    nodes = full(names)
    nodes[2] = node("n2", [peer(o, "down" if o == "n4" else "up") for o in names if o != "n2"])
    h = observe({}, "n2", [peer("n4", "down")], NOW + 1)
    new = build_view(nodes, h, NOW + 1)
    patch = model.diff_view(old, new)
    assert patch is not None
    assert patch["cells"] == [["n2", "n4", new["matrix"]["n2"]["n4"]]]
    assert set(patch["set"]) == {"now", "nodes", "edges", "summary"}
    assert list(patch["history"]) == ["n2|n4"]
    assert apply_patch(old, patch) == new
    assert model.diff_view(new, new) == {"set": {}, "cells": [], "history": {}}


def test_diff_view_none_when_the_nodes_change() -> None:
    old = build_view(full(["a", "b"]), {}, NOW)
    new = build_view(full(["a", "b", "c"]), {}, NOW)
    assert model.diff_view(old, new) is None
