"""The mesh check behind ``spanctl health`` and the matrix behind ``spanctl mesh`` (pure: values in,
values out). Input is each node's KubeSpanPeerStatuses specs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .output import format_row, widths

SELF = "-"
ABSENT = "?"


def parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not value or not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    if t.year <= 1:  # Go's zero time
        return None
    return t


@dataclass(frozen=True)
class Peer:
    label: str
    state: str
    endpoint: str = ""
    last_handshake: dt.datetime | None = None

    @classmethod
    def from_spec(cls, spec: Any, fallback_id: str = "") -> Peer:
        spec = spec if isinstance(spec, dict) else {}
        return cls(
            label=str(spec.get("label") or fallback_id),
            state=str(spec.get("state") or "unknown"),
            endpoint=str(spec.get("endpoint") or ""),
            last_handshake=parse_time(spec.get("lastHandshakeTime")),
        )


@dataclass(frozen=True)
class NodeMesh:
    """One node's view: ``hostname`` (its own label, to mark itself in the matrix) and its peers."""

    node: str
    peers: tuple[Peer, ...]
    hostname: str = ""


def problems(view: NodeMesh, now: dt.datetime, max_age: float, *, min_peers: int = 1) -> list[str]:
    """Why ``view`` is not healthy (empty: healthy): every peer up with a handshake within ``max_age`` s."""
    out: list[str] = []
    if len(view.peers) < min_peers:
        out.append(f"{len(view.peers)} peers (expected at least {min_peers})")
    for p in sorted(view.peers, key=lambda p: p.label):
        if p.state != "up":
            out.append(f"peer {p.label} is {p.state}")
        elif p.last_handshake is None:
            out.append(f"peer {p.label}: no handshake yet")
        else:
            age = (now - p.last_handshake).total_seconds()
            if age > max_age:
                out.append(f"peer {p.label}: last handshake {age:.0f}s ago (limit {max_age:.0f}s)")
    return out


def summary(view: NodeMesh) -> str:
    up = sum(1 for p in view.peers if p.state == "up")
    return f"{up}/{len(view.peers)} peers up"


def matrix(views: Sequence[NodeMesh]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per node, one column per peer label seen anywhere; a cell is that
    peer's state as the row's node sees it, ``-`` for the node itself, ``?`` when it does not know it."""
    labels: dict[str, None] = {}
    for v in views:
        if v.hostname:
            labels.setdefault(v.hostname, None)
    for v in views:
        for p in v.peers:
            labels.setdefault(p.label, None)
    cols = sorted(labels)
    rows = []
    for v in views:
        states = {p.label: p.state for p in v.peers}
        cells = [SELF if c == v.hostname else states.get(c, ABSENT) for c in cols]
        rows.append([v.node, *cells])
    return ["NODE", *cols], rows


def render_matrix(views: Iterable[NodeMesh]) -> str:
    headers, rows = matrix(list(views))
    # peer labels are names: keep their case in the header (only NODE is ours)
    all_rows = [headers, *rows]
    w = widths(all_rows)
    return "\n".join(format_row(r, w) for r in all_rows) + "\n"
