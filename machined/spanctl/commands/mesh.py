"""spanctl mesh and mesh health: every node's view of the mesh (``health`` checks more: commands/health.py)."""

from __future__ import annotations

import datetime as dt
import time

import grpc
from google.protobuf import empty_pb2

from .. import mesh as meshmod
from ..app import App
from ..client import describe_rpc_error, split_messages


def _hostname(app: App, node: str | None) -> str:
    t = app.target
    resp = app.machine().Hostname(empty_pb2.Empty(), metadata=t.node_metadata(node), timeout=t.timeout)
    good, _ = split_messages(resp.messages, app.label(node))
    return good[0].hostname if good else ""


def collect_views(app: App, *, with_hostname: bool) -> tuple[list[meshmod.NodeMesh], dict[str, str]]:
    t = app.target
    views: list[meshmod.NodeMesh] = []
    failures: dict[str, str] = {}
    for node in t.each_node():
        label = app.label(node)
        try:
            hostname = _hostname(app, node) if with_hostname else ""
            views.append(meshmod.NodeMesh(label, tuple(app.peers(node)), hostname))
        except grpc.RpcError as e:
            failures[label] = describe_rpc_error(e, t.where)
    return views, failures


def cmd_mesh(app: App) -> None:
    if getattr(app.ns, "mesh_cmd", None) == "health":
        cmd_mesh_health(app)
        return
    views, failures = collect_views(app, with_hostname=True)
    if views:
        app.out.write(meshmod.render_matrix(views))
    for label, msg in failures.items():
        app.errors.add(label, msg)


def cmd_mesh_health(app: App) -> None:
    """Wait until every node's peers are all up with a recent handshake; one summary line per node."""
    ns = app.ns
    deadline = time.monotonic() + ns.wait_timeout
    last_progress = ""
    while True:
        views, failures = collect_views(app, with_hostname=False)
        now = dt.datetime.now(dt.UTC)
        bad: dict[str, list[str]] = dict((k, [v]) for k, v in failures.items())
        for v in views:
            p = meshmod.problems(v, now, ns.handshake_max_age, min_peers=ns.min_peers)
            if p:
                bad[v.node] = p
        if not bad:
            for v in views:
                app.out.write(f"{v.node}: mesh OK ({meshmod.summary(v)})\n")
            return
        if time.monotonic() >= deadline:
            for v in views:
                if v.node not in bad:
                    app.out.write(f"{v.node}: mesh OK ({meshmod.summary(v)})\n")
            for node, probs in bad.items():
                app.errors.add(node, "mesh not healthy: " + "; ".join(probs))
            return
        progress = "waiting for the mesh: " + "; ".join(f"{n}: {', '.join(p)}" for n, p in bad.items())
        if progress != last_progress:
            print(progress, file=app.err, flush=True)
            last_progress = progress
        time.sleep(min(ns.interval, max(0.0, deadline - time.monotonic())))
