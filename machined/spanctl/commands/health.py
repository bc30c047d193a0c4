"""spanctl health: what our nodes run, checked the way ``talosctl health`` checks a Talos cluster.

talosctl waits for one condition after another (etcd, apid, kubelet, Kubernetes ...) and prints
``waiting for <condition>: OK`` (or ``SKIP``, or what is still wrong) on stderr. Our nodes run no
Kubernetes, so the conditions are what machined runs, in this order:

1. all nodes to answer (machined's ServiceList through apid or the socket);
2. etcd to be healthy: a service named ``etcd`` Running and not failing its health check, on every node
   that defines one and on every ``--control-plane-nodes`` node (SKIP when no node defines one);
3. machined services to be healthy: every service Running (healthy, or without a health check),
   Finished or Skipped;
4. the mesh to be healthy: every peer up with a recent handshake (``spanctl mesh health``'s check), on
   the nodes whose KubeSpan is enabled (SKIP when none).

The nodes are ``--control-plane-nodes``/``--init-node`` and ``--worker-nodes`` when given (as talosctl),
else the target nodes (``-n`` or the context's). ``--wait-timeout`` bounds the whole run; when it passes,
each node's remaining problems become per-node errors (exit status 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import empty_pb2

from spanapi.talos.cosi import state_pb2
from spanutil.durations import parse_duration

from .. import mesh as meshmod
from ..app import App, csv_items
from ..client import describe_rpc_error, split_messages
from ..output import spec_data

ETCD = "etcd"
KUBESPAN_CONFIG_TYPE = "KubeSpanConfigs.kubespan.talos.dev"
KUBESPAN_CONFIG_NAMESPACE = "config"
CONTROLPLANE = "controlplane"
WORKER = "worker"
OK_STATES = ("Finished", "Skipped")  # done, or disabled: nothing is wrong (Running is checked further)


def add_health_flags(sp: argparse.ArgumentParser, *, cluster: bool) -> None:
    """``health``'s flags (``cluster``: talosctl's node-list flags too) and ``mesh health``'s."""
    sp.add_argument(
        "--wait-timeout", type=parse_duration, default=300.0, help="how long to wait (default 5m)"
    )
    if cluster:
        sp.add_argument(
            "--control-plane-nodes",
            action="append",
            metavar="NODES",
            help="control plane nodes to check (comma-separated or repeated); etcd is required on them",
        )
        sp.add_argument("--worker-nodes", action="append", metavar="NODES", help="worker nodes to check")
        sp.add_argument("--init-node", help="an init node: checked as a control plane node (as talosctl)")
    sp.add_argument(
        "--handshake-max-age",
        type=parse_duration,
        default=300.0,
        help="a mesh handshake older than this fails (default 5m)",
    )
    sp.add_argument("--min-peers", type=int, default=1, help="mesh peers each node must have (default 1)")
    sp.add_argument("--interval", type=parse_duration, default=1.0, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class Node:
    """One node to check: ``target`` for routing metadata (None: the endpoint's or socket's own),
    ``label`` for messages, ``role`` from the flags (None when the flags did not say)."""

    target: str | None
    label: str
    role: str | None = None


@dataclass
class Result:
    skip: bool = False
    problems: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    name: str  # "waiting for <name>"
    failure: str  # the per-node error prefix when time is up
    check: Callable[[App, list[Node]], Result]


class _NodeDown(Exception):
    pass


def _services(app: App, node: Node) -> list[Any]:
    t = app.target
    try:
        resp = app.machine().ServiceList(
            empty_pb2.Empty(), metadata=t.node_metadata(node.target), timeout=t.timeout
        )
    except grpc.RpcError as e:
        raise _NodeDown(describe_rpc_error(e, t.where)) from None
    good, errs = split_messages(resp.messages, node.label)
    if errs:
        raise _NodeDown(errs[0].message)
    return [s for m in good for s in m.services]


def _service_problem(s: Any, *, running_only: bool = False) -> str | None:
    """Why service ``s`` is not fine, or None. A Running service with no health check is fine."""
    if s.state == "Running":
        if s.health.unknown or s.health.healthy:
            return None
        msg = s.health.last_message
        return f"{s.id} is unhealthy" + (f" ({msg})" if msg else "")
    if s.state in OK_STATES and not running_only:
        return None
    return f"{s.id} is {s.state or 'unknown'}"


def check_answer(app: App, nodes: list[Node]) -> Result:
    r = Result()
    for n in nodes:
        try:
            _services(app, n)
        except _NodeDown as e:
            r.problems[n.label] = [str(e)]
    return r


def check_etcd(app: App, nodes: list[Node]) -> Result:
    down: dict[str, list[str]] = {}
    found: dict[str, Any] = {}  # label -> the node's etcd service
    for n in nodes:
        try:
            services = _services(app, n)
        except _NodeDown as e:
            down[n.label] = [str(e)]
            continue
        etcd = next((s for s in services if s.id == ETCD), None)
        if etcd is not None:
            found[n.label] = etcd
    if not found and not down:
        return Result(skip=True)  # no node defines etcd (talosctl: etcd disabled)
    r = Result(problems=down)
    if not found:
        return r  # unknown until the nodes that are down answer
    for n in nodes:
        if n.label in down:
            continue
        etcd = found.get(n.label)
        if etcd is None:
            if n.role == CONTROLPLANE:
                r.problems[n.label] = ["no etcd service on this control plane node"]
        elif p := _service_problem(etcd, running_only=True):
            r.problems[n.label] = [p]
    return r


def check_services(app: App, nodes: list[Node]) -> Result:
    r = Result()
    for n in nodes:
        try:
            services = _services(app, n)
        except _NodeDown as e:
            r.problems[n.label] = [str(e)]
            continue
        probs = [p for s in sorted(services, key=lambda s: s.id) if (p := _service_problem(s))]
        if probs:
            r.problems[n.label] = probs
    return r


def _kubespan_enabled(app: App, node: Node) -> bool:
    """The node's KubeSpanConfig ``enabled`` (True when it cannot be read: the peers then tell)."""
    t = app.target
    try:
        for item in app.state().List(
            state_pb2.ListRequest(namespace=KUBESPAN_CONFIG_NAMESPACE, type=KUBESPAN_CONFIG_TYPE),
            metadata=t.node_metadata(node.target),
            timeout=t.timeout,
        ):
            spec = spec_data(item.resource)
            if isinstance(spec, dict) and spec.get("enabled") is False:
                return False
    except grpc.RpcError:
        pass
    return True


def check_mesh(app: App, nodes: list[Node]) -> Result:
    ns = app.ns
    r = Result()
    now = dt.datetime.now(dt.UTC)
    checked = 0
    for n in nodes:
        try:
            if not _kubespan_enabled(app, n):
                continue
            checked += 1
            view = meshmod.NodeMesh(n.label, tuple(app.peers(n.target)))
        except grpc.RpcError as e:
            r.problems[n.label] = [describe_rpc_error(e, app.target.where)]
            continue
        if p := meshmod.problems(view, now, ns.handshake_max_age, min_peers=ns.min_peers):
            r.problems[n.label] = p
    r.skip = checked == 0 and not r.problems
    return r


CONDITIONS = (
    Condition("all nodes to answer", "not answering", check_answer),
    Condition("etcd to be healthy", "etcd not healthy", check_etcd),
    Condition("machined services to be healthy", "services not healthy", check_services),
    Condition("the mesh to be healthy", "mesh not healthy", check_mesh),
)


def health_nodes(app: App) -> list[Node]:
    """The nodes to check: talosctl's cluster flags when given (routing to each), else the targets."""
    ns = app.ns
    cp = [x for v in ns.control_plane_nodes or () for x in csv_items(v)]
    if ns.init_node:
        cp.append(ns.init_node)
    workers = [x for v in ns.worker_nodes or () for x in csv_items(v)]
    t = app.target
    if cp or workers:
        t.nodes = [*cp, *workers]
        t.check()  # a unix socket reaches one machined
        if t.direct:
            return [Node(None, app.label(None), CONTROLPLANE if cp else WORKER)]
        return [Node(x, x, CONTROLPLANE) for x in cp] + [Node(x, x, WORKER) for x in workers]
    return [Node(x, app.label(x)) for x in t.each_node()]


def _describe(problems: dict[str, list[str]]) -> str:
    return "; ".join(f"{node}: {', '.join(p)}" for node, p in problems.items())


def cmd_health(app: App) -> None:
    ns = app.ns
    nodes = health_nodes(app)
    deadline = time.monotonic() + ns.wait_timeout
    for cond in CONDITIONS:
        last = ""
        while True:
            r = cond.check(app, nodes)
            if r.skip or not r.problems:
                print(f"waiting for {cond.name}: {'SKIP' if r.skip else 'OK'}", file=app.err, flush=True)
                break
            line = f"waiting for {cond.name}: {_describe(r.problems)}"
            if time.monotonic() >= deadline:
                for node, probs in r.problems.items():
                    app.errors.add(node, f"{cond.failure}: " + "; ".join(probs))
                return
            if line != last:
                print(line, file=app.err, flush=True)
                last = line
            time.sleep(min(ns.interval, max(0.0, deadline - time.monotonic())))
