"""spanctl health's mesh check and the mesh matrix (pure functions)."""

from __future__ import annotations

import datetime as dt

from machined.spanctl.mesh import NodeMesh, Peer, matrix, parse_time, problems, render_matrix

NOW = dt.datetime(2026, 11, 25, 20, 0, tzinfo=dt.UTC)


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def test_parse_time_handles_rfc3339_and_zero() -> None:
    assert parse_time("2026-11-25T19:59:00Z") == ago(60)
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("") is None
    assert parse_time("garbage") is None


def test_peer_from_spec() -> None:
    p = Peer.from_spec({"label": "n2", "state": "up", "lastHandshakeTime": "2026-11-25T19:59:30Z"}, "KEY=")
    assert p == Peer("n2", "up", "", ago(30))
    assert Peer.from_spec({}, "KEY=").label == "KEY="


def test_healthy_when_every_peer_up_with_recent_handshake() -> None:
    v = NodeMesh("n1", (Peer("n2", "up", last_handshake=ago(10)), Peer("n3", "up", last_handshake=ago(100))))
    assert problems(v, NOW, 300) == []


def test_problems_name_each_peer() -> None:
    v = NodeMesh(
        "n1",
        (
            Peer("n4", "up", last_handshake=ago(900)),
            Peer("n2", "down", last_handshake=ago(10)),
            Peer("n3", "up"),
        ),
    )
    assert problems(v, NOW, 300) == [
        "peer n2 is down",
        "peer n3: no handshake yet",
        "peer n4: last handshake 900s ago (limit 300s)",
    ]


def test_no_peers_is_a_problem_unless_allowed() -> None:
    assert problems(NodeMesh("n1", ()), NOW, 300) == ["0 peers (expected at least 1)"]
    assert problems(NodeMesh("n1", ()), NOW, 300, min_peers=0) == []


def test_matrix_rows_are_nodes_columns_are_peers() -> None:
    views = [
        NodeMesh("10.0.0.1", (Peer("n2", "up"), Peer("n3", "down")), hostname="n1"),
        NodeMesh("10.0.0.2", (Peer("n1", "up"), Peer("n3", "up")), hostname="n2"),
        NodeMesh("10.0.0.3", (Peer("n1", "up"),), hostname="n3"),
    ]
    headers, rows = matrix(views)
    assert headers == ["NODE", "n1", "n2", "n3"]
    assert rows == [
        ["10.0.0.1", "-", "up", "down"],
        ["10.0.0.2", "up", "-", "up"],
        ["10.0.0.3", "up", "?", "-"],
    ]
    assert render_matrix(views).splitlines() == [
        "NODE       n1   n2   n3",
        "10.0.0.1   -    up   down",
        "10.0.0.2   up   -    up",
        "10.0.0.3   up   ?    -",
    ]
