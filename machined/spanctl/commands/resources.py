"""spanctl get: resources, listed or watched (-w)."""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc

from machined.state.definitions import ResourceDefinition
from spanapi.talos.cosi import state_pb2

from ..app import App, UsageError
from ..client import describe_rpc_error
from ..jsonpath import JSONPathError
from ..output import ResourceWriter, check_format, display_type


def _add(app: App, writer: ResourceWriter, label: str, res: Any, event: int | None = None) -> None:
    """One resource to the writer; a JSONPath template that does not fit it is that node's error."""
    try:
        writer.add(label, res, event)
    except JSONPathError as e:
        app.errors.add(label, f"{display_type(res.metadata.type)} {res.metadata.id}: {e}")


def cmd_get(app: App) -> None:
    ns = app.ns
    try:
        check_format(ns.output)
    except ValueError as e:
        raise UsageError(str(e)) from None
    defn = app.resolve_type(ns.type)
    if defn is None:
        return
    namespace = ns.namespace or defn.default_namespace
    writer = ResourceWriter(app.out, ns.output, defn, watch=ns.watch)
    if ns.watch:
        _watch(app, writer, defn, namespace)
        return
    t = app.target
    st = app.state()
    for node in t.each_node():
        label = app.label(node)
        md = t.node_metadata(node)
        try:
            if ns.id:
                r = st.Get(
                    state_pb2.GetRequest(namespace=namespace, type=defn.type, id=ns.id),
                    metadata=md,
                    timeout=t.timeout,
                )
                _add(app, writer, label, r.resource)
            else:
                for r in st.List(
                    state_pb2.ListRequest(namespace=namespace, type=defn.type), metadata=md, timeout=t.timeout
                ):
                    _add(app, writer, label, r.resource)
        except grpc.RpcError as e:
            app.errors.rpc(label, e, t.where)
    writer.flush()


def _watch(app: App, writer: ResourceWriter, defn: ResourceDefinition, namespace: str) -> None:
    t = app.target
    st = app.state()
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    nodes = t.each_node()
    calls = []

    labels = {n: app.label(n) for n in nodes}  # before the threads start: label() may call Hostname

    def pump(node: str | None, call: Any) -> None:
        label = labels[node]
        try:
            for resp in call:
                for ev in resp.event:
                    events.put((label, ev))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                events.put((label, describe_rpc_error(e, t.where)))
        events.put((label, None))

    for node in nodes:
        req = state_pb2.WatchRequest(
            namespace=namespace,
            type=defn.type,
            id=app.ns.id or "",
            options=state_pb2.WatchOptions(bootstrap_contents=True),
            api_version=1,
        )
        call = st.Watch(req, metadata=t.node_metadata(node))
        calls.append(call)
        threading.Thread(target=pump, args=(node, call), daemon=True).start()
    pending = set(labels.values())
    live = 0
    bootstrapped = False
    try:
        while live < len(nodes):
            label, ev = events.get()
            if ev is None:
                live += 1
                pending.discard(label)
                continue
            if isinstance(ev, str):
                app.errors.add(label, ev)
                continue
            if ev.event_type == state_pb2.BOOTSTRAPPED:
                pending.discard(label)
                if not pending:
                    bootstrapped = True
                    writer.flush()
                continue
            if ev.event_type == state_pb2.ERRORED:
                app.errors.add(label, ev.error or "watch failed")
                continue
            _add(app, writer, label, ev.resource, ev.event_type)
            if bootstrapped:
                writer.flush()
        writer.flush()
    finally:
        for c in calls:
            c.cancel()
