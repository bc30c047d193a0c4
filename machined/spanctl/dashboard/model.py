"""The dashboard's view model (pure: what the collector holds in, one JSON-able dict out).

Input is one :class:`NodeInput` per node the dashboard watches (or knows of: a member it cannot reach
is still a node), each holding the specs of the resources its watches delivered, keyed by a short kind
(:data:`KINDS`), and the endpoint history the collector kept (:func:`observe`). Output is what the page
renders: the NxN matrix (row: the node that reports, column: the peer it reports on), the node list,
the topology (groups and edges) and the per-pair history.

Nothing here reads a clock or the network: ``now`` is an argument, so tests pin every output.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..mesh import parse_time

#: Short kinds of the resources the collector watches on each node (namespace, type).
KINDS: dict[str, tuple[str, str]] = {
    "peers": ("kubespan", "KubeSpanPeerStatuses.kubespan.talos.dev"),
    "nat": ("kubespan", "KubeSpanNATStatuses.kubespan.talos.dev"),
    "members": ("cluster", "Members.cluster.talos.dev"),
    "affiliates": ("cluster", "Affiliates.cluster.talos.dev"),
    "addresses": ("network", "NodeAddresses.net.talos.dev"),
    "services": ("runtime", "Services.v1alpha1.talos.dev"),
}

# how the dashboard reaches a node
REACH_OK = "ok"
REACH_CONNECTING = "connecting"
REACH_UNREACHABLE = "unreachable"
REACH_UNWATCHED = "unwatched"  # known (a member or a peer label) but not among the nodes watched

# cell states beyond KubeSpanPeerStatus's own (up, down, unknown)
CELL_SELF = "self"
CELL_ABSENT = "absent"  # the row's node has no status for this peer
CELL_NODATA = "nodata"  # the row's node never answered

HISTORY_LIMIT = 20


@dataclass(frozen=True)
class NodeInput:
    """What the collector knows of one node.

    ``target``: the address apid routes to (``node`` metadata; empty for the endpoint's own node);
    ``name``: its hostname once known (peer labels are hostnames); ``reach``: one of the REACH_*
    values, ``since`` when it last changed; ``stale``: ``resources`` are from before a lost watch;
    ``resources``: kind -> resource id -> spec; a kind missing altogether is unknown rather than empty
    (a plain agent's ``/status`` has no services: the node list shows none, not "0/0 healthy")."""

    target: str
    name: str = ""
    reach: str = REACH_CONNECTING
    error: str = ""
    since: float | None = None
    stale: bool = False
    version: str = ""
    resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.target or "(endpoint)"

    def specs(self, kind: str) -> Mapping[str, Any]:
        return self.resources.get(kind) or {}


@dataclass(frozen=True)
class HistoryEntry:
    """A change of what ``node`` sees of ``peer``: endpoint, path, state or relay."""

    time: float
    endpoint: str
    path: str
    state: str
    relay_via: str = ""
    why_not_direct: str = ""

    def key(self) -> tuple[str, str, str, str]:
        return (self.endpoint, self.path, self.state, self.relay_via)

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.time,
            "endpoint": self.endpoint,
            "path": self.path,
            "state": self.state,
            "relayVia": self.relay_via,
            "whyNotDirect": self.why_not_direct,
        }


History = Mapping[tuple[str, str], Sequence[HistoryEntry]]


def epoch(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (None for empty, Go's zero time or garbage)."""
    t = parse_time(value) if isinstance(value, str) else None
    return None if t is None else t.timestamp()


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    return None


def observe(
    history: History, node: str, peers: Iterable[Mapping[str, Any]], now: float, limit: int = HISTORY_LIMIT
) -> dict[tuple[str, str], list[HistoryEntry]]:
    """``history`` with an entry appended for each of ``node``'s peers whose endpoint, path, state or
    relay differs from its last entry (at most ``limit`` entries per pair, oldest dropped)."""
    out = {k: list(v) for k, v in history.items()}
    for spec in peers:
        label = str(spec.get("label") or "")
        if not label:
            continue
        e = HistoryEntry(
            now,
            str(spec.get("endpoint") or ""),
            str(spec.get("path") or ""),
            str(spec.get("state") or "unknown"),
            str(spec.get("relayVia") or ""),
            str(spec.get("whyNotDirect") or ""),
        )
        entries = out.setdefault((node, label), [])
        if not entries or entries[-1].key() != e.key():
            entries.append(e)
            del entries[:-limit]
    return out


STATUS_STATES = ("up", "down", "unknown")  # a cell with these holds a KubeSpanPeerStatus


def cell(spec: Mapping[str, Any], stale: bool) -> dict[str, Any]:
    """A matrix cell from a KubeSpanPeerStatus spec; fields without a value (empty, null) are left out:
    50 nodes make 2,450 cells in every view the page receives."""
    full = {
        "state": str(spec.get("state") or "unknown"),
        "path": str(spec.get("path") or ""),
        "relayVia": str(spec.get("relayVia") or ""),
        "whyNotDirect": str(spec.get("whyNotDirect") or ""),
        "endpoint": str(spec.get("endpoint") or ""),
        "lastUsedEndpoint": str(spec.get("lastUsedEndpoint") or ""),
        "lastEndpointChange": epoch(spec.get("lastEndpointChange")),
        "handshake": epoch(spec.get("lastHandshakeTime")),
        "rx": _num(spec.get("receiveBytes")),
        "tx": _num(spec.get("transmitBytes")),
        "rtt": _num(spec.get("rtt")),
        "connectTime": _num(spec.get("connectTime")),
        "natClass": str(spec.get("natClass") or ""),
    }
    out = {k: v for k, v in full.items() if v not in ("", None)}
    out["state"] = full["state"]
    out["stale"] = stale
    return out


def _site(addresses: Sequence[str], mapped: str) -> str:
    """Where a node sits: behind the public address its NAT maps it to, else its first address's
    network (/24 or /64)."""
    if mapped:
        host = mapped.rsplit(":", 1)[0].strip("[]") if ":" in mapped else mapped
        return f"public {host}"
    for a in addresses:
        try:
            iface = ipaddress.ip_interface(a if "/" not in a else a.split("/")[0])
        except ValueError:
            continue
        net = ipaddress.ip_network(f"{iface.ip}/{24 if iface.version == 4 else 64}", strict=False)
        return f"lan {net}"
    return "unknown"


def _services(specs: Mapping[str, Any]) -> dict[str, Any]:
    bad = sorted(
        sid
        for sid, s in specs.items()
        if isinstance(s, Mapping) and s.get("running") and not s.get("healthy") and not s.get("unknown")
    )
    stopped = sorted(sid for sid, s in specs.items() if isinstance(s, Mapping) and not s.get("running"))
    return {"total": len(specs), "unhealthy": bad, "stopped": stopped}


def _edge_state(states: Sequence[str]) -> str:
    if not states:
        return "unknown"
    if all(s == "up" for s in states):
        return "up"
    if any(s == "down" for s in states):
        return "down"
    return "unknown"


def _edge_path(cells: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    paths = [c.get("path", "") for c in cells]
    for p in ("relay", "direct", "lan"):
        if p in paths:
            relay = next((c["relayVia"] for c in cells if c.get("relayVia")), "")
            return p, relay if p == "relay" else ""
    return "none", ""


def build_view(
    nodes: Sequence[NodeInput],
    history: History,
    now: float,
    *,
    link: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The page's whole view model (see the module doc); ``link``: the apid connection's state."""
    by_name: dict[str, NodeInput] = {}
    for n in nodes:
        by_name.setdefault(n.label, n)
    members: dict[str, Mapping[str, Any]] = {}
    affiliates: dict[str, Mapping[str, Any]] = {}
    peer_nat: dict[str, str] = {}
    for n in nodes:
        for spec in n.specs("members").values():
            if isinstance(spec, Mapping) and spec.get("hostname"):
                members.setdefault(str(spec["hostname"]), spec)
        for aid, spec in n.specs("affiliates").items():
            if isinstance(spec, Mapping):
                key = str(spec.get("nodename") or spec.get("hostname") or aid)
                affiliates.setdefault(key, spec)
        for spec in n.specs("peers").values():
            if isinstance(spec, Mapping) and spec.get("label") and spec.get("natClass"):
                peer_nat.setdefault(str(spec["label"]), str(spec["natClass"]))
    # every name anyone reports, so nothing known is dropped: watched nodes, members, peer labels
    names: dict[str, None] = dict.fromkeys(by_name)
    for name in members:
        names.setdefault(name, None)
    for n in nodes:
        for spec in n.specs("peers").values():
            if isinstance(spec, Mapping) and spec.get("label"):
                names.setdefault(str(spec["label"]), None)
    order = sorted(names)

    node_rows: list[dict[str, Any]] = []
    for name in order:
        n = by_name.get(name)
        member = members.get(name) or {}
        aff = affiliates.get(name) or {}
        own_addresses: list[str] = []
        nat_class, mapped = "", ""
        if n is not None:
            cur = n.specs("addresses").get("current") or {}
            own_addresses = [str(a) for a in cur.get("addresses") or ()] if isinstance(cur, Mapping) else []
            for spec in n.specs("nat").values():
                if isinstance(spec, Mapping):
                    nat_class = str(spec.get("natClass") or "")
                    mapped = str(spec.get("mappedEndpoint") or "")
        addresses = own_addresses or [str(a) for a in member.get("addresses") or ()]
        kubespan = aff.get("kubespan") if isinstance(aff.get("kubespan"), Mapping) else {}
        nat_class = nat_class or peer_nat.get(name, "")
        peers = [s for s in (n.specs("peers").values() if n else ()) if isinstance(s, Mapping)]
        node_rows.append(
            {
                "name": name,
                "target": n.target if n else "",
                "reach": n.reach if n else REACH_UNWATCHED,
                "error": n.error if n else "",
                "since": n.since if n else None,
                "stale": n.stale if n else False,
                "version": n.version if n else "",
                "role": str(member.get("machineType") or aff.get("machineType") or ""),
                "os": str(member.get("operatingSystem") or ""),
                "addresses": addresses,
                "meshAddress": str(kubespan.get("address") or ""),
                "natClass": nat_class,
                "site": _site(addresses, mapped),
                "services": _services(n.specs("services")) if n and "services" in n.resources else None,
                "peersUp": sum(1 for s in peers if s.get("state") == "up"),
                "peers": len(peers),
            }
        )

    matrix: dict[str, dict[str, dict[str, Any]]] = {}
    for row in order:
        n = by_name.get(row)
        cells: dict[str, dict[str, Any]] = {}
        statuses = {
            str(s.get("label")): s
            for s in (n.specs("peers").values() if n else ())
            if isinstance(s, Mapping) and s.get("label")
        }
        for col in order:
            if col == row:
                cells[col] = {"state": CELL_SELF}
            elif col in statuses:
                cells[col] = cell(statuses[col], stale=bool(n and (n.stale or n.reach != REACH_OK)))
            elif n is None or (n.reach != REACH_OK and not n.resources):
                cells[col] = {"state": CELL_NODATA, "stale": True}
            else:
                cells[col] = {"state": CELL_ABSENT, "stale": n.stale or n.reach != REACH_OK}
        matrix[row] = cells

    edges: list[dict[str, Any]] = []
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            pair = [c for c in (matrix[a][b], matrix[b][a]) if c["state"] in STATUS_STATES]
            if not pair:
                continue
            fresh = [c for c in pair if not c.get("stale")]
            path, relay = _edge_path(pair)
            edges.append(
                {
                    "a": a,
                    "b": b,
                    "state": _edge_state([c["state"] for c in fresh]) if fresh else "stale",
                    "path": path,
                    "relayVia": relay,
                }
            )

    groups: dict[str, list[str]] = {}
    for r in node_rows:
        groups.setdefault(r["site"], []).append(r["name"])
    group_list = []
    for key in sorted(groups):
        classes = sorted(
            {r["natClass"] for r in node_rows if r["site"] == key and r["natClass"] not in ("", "unknown")}
        )
        group_list.append({"key": key, "natClasses": classes, "nodes": groups[key]})

    up = sum(
        1
        for a in order
        for b in order
        if a != b and matrix[a][b].get("state") == "up" and not matrix[a][b].get("stale")
    )
    return {
        "now": now,
        "link": dict(link or {"ok": True, "error": ""}),
        "names": order,
        "nodes": node_rows,
        "matrix": matrix,
        "edges": edges,
        "groups": group_list,
        "history": {
            f"{a}|{b}": [e.to_json() for e in entries]
            for (a, b), entries in sorted(history.items())
            if a in names and b in names
        },
        "summary": {
            "nodes": len(order),
            "reachable": sum(1 for r in node_rows if r["reach"] == REACH_OK),
            "pairsUp": up,  # fresh ones only: a stale "up" is not known to be up
            "pairs": len(order) * (len(order) - 1),
        },
    }


#: View keys a patch replaces whole when they changed (``matrix`` and ``history`` go by cell and pair).
_WHOLE_KEYS = ("now", "link", "nodes", "edges", "groups", "summary")


def diff_view(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """What turns view ``old`` into ``new`` for a page that holds ``old``: ``set`` (top-level keys
    replaced), ``cells`` ([row, column, cell] changed), ``history`` (pair key -> entries, changed pairs).
    None when the nodes themselves changed (``names``): the page then gets the whole view. With 50 nodes a
    view is ~0.5 MB and one pair going down changes one cell: the page parses and redraws that much."""
    if old.get("names") != new.get("names"):
        return None
    patch: dict[str, Any] = {"set": {k: new[k] for k in _WHOLE_KEYS if old.get(k) != new.get(k)}}
    om, nm = old["matrix"], new["matrix"]
    patch["cells"] = [
        [r, c, cell] for r, row in nm.items() for c, cell in row.items() if om.get(r, {}).get(c) != cell
    ]
    oh, nh = old.get("history", {}), new.get("history", {})
    patch["history"] = {k: v for k, v in nh.items() if oh.get(k) != v}
    return patch
