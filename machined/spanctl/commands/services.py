"""spanctl service, logs, dmesg, events."""

from __future__ import annotations

from typing import IO, Any

from google.protobuf import empty_pb2

from spanapi.talos.common import common_pb2
from spanapi.talos.machine import machine_pb2

from ..app import App, age
from ..client import node_of
from ..output import format_row, table, widths


def _health_cell(h: machine_pb2.ServiceHealth) -> str:
    if h.unknown:
        return "?"
    return "OK" if h.healthy else "Fail"


def cmd_service(app: App) -> None:
    ns = app.ns
    action = ns.action or "status"
    if ns.id is None:
        rows = []
        for item in app.unary(app.machine().ServiceList, empty_pb2.Empty()):
            node = node_of(item, app.label(None))
            for s in item.services:
                last = s.events.events[-1] if s.events.events else None
                rows.append(
                    [
                        node,
                        s.id,
                        s.state,
                        _health_cell(s.health),
                        age(last.ts.seconds) if last is not None and last.ts.seconds else "",
                        last.msg if last is not None else "",
                    ]
                )
        app.out.write(table(["NODE", "SERVICE", "STATE", "HEALTH", "LAST CHANGE", "LAST EVENT"], rows))
        return
    if action == "status":
        for item in app.unary(app.machine().ServiceList, empty_pb2.Empty()):
            node = node_of(item, app.label(None))
            found = [s for s in item.services if s.id == ns.id]
            if not found:
                app.errors.add(node, f'service "{ns.id}" not found')
                continue
            s = found[0]
            lines = [["NODE", node], ["ID", s.id], ["STATE", s.state], ["HEALTH", _health_cell(s.health)]]
            if s.health.last_message:
                lines.append(["LAST HEALTH MESSAGE", s.health.last_message])
            for i, e in enumerate(s.events.events):
                lines.append(["EVENTS" if i == 0 else "", f"[{e.state}]: {e.msg} ({age(e.ts.seconds)})"])
            w = max(len(k) for k, _ in lines) + 3
            app.out.write("".join(f"{k.ljust(w)}{v}\n" for k, v in lines))
        return
    m = app.machine()
    method, req = {
        "start": (m.ServiceStart, machine_pb2.ServiceStartRequest),
        "stop": (m.ServiceStop, machine_pb2.ServiceStopRequest),
        "restart": (m.ServiceRestart, machine_pb2.ServiceRestartRequest),
    }[action]
    rows = [[node_of(i, app.label(None)), i.resp] for i in app.unary(method, req(id=ns.id))]
    if rows:
        app.out.write(table(["NODE", "RESPONSE"], rows))


class LinePrinter:
    """Joins streamed chunks into whole lines per node and prints them ``<node>: <line>``."""

    def __init__(self, out: IO[str], default: str) -> None:
        self.out = out
        self.default = default
        self.partial: dict[str, str] = {}

    def __call__(self, item: Any) -> None:
        node = node_of(item, self.default)
        text = self.partial.pop(node, "") + item.bytes.decode(errors="replace")
        *lines, rest = text.split("\n")
        for line in lines:
            self.out.write(f"{node}: {line}\n")
        if rest:
            self.partial[node] = rest
        self.out.flush()

    def close(self) -> None:
        for node, rest in self.partial.items():
            self.out.write(f"{node}: {rest}\n")
        self.partial.clear()


SYSTEM_NAMESPACE = "system"  # Talos's containerd namespace of system services (our services' logs)
K8S_NAMESPACE = "k8s.io"  # Talos's containerd namespace of Kubernetes containers (logs -k)


def cmd_logs(app: App) -> None:
    """A service's logs; ``-k`` asks for a Kubernetes container's instead, as talosctl does (namespace
    k8s.io, CRI driver): our nodes run no Kubernetes containers, so machined answers not found."""
    ns = app.ns
    printer = LinePrinter(app.out, app.label(None))
    if ns.kubernetes:
        namespace, driver = K8S_NAMESPACE, common_pb2.CRI
    else:
        namespace, driver = SYSTEM_NAMESPACE, common_pb2.CONTAINERD
    req = machine_pb2.LogsRequest(
        namespace=namespace, driver=driver, id=ns.id, follow=ns.follow, tail_lines=ns.tail
    )
    app.stream(app.machine().Logs, req, printer)
    printer.close()


def cmd_dmesg(app: App) -> None:
    printer = LinePrinter(app.out, app.label(None))
    app.stream(app.machine().Dmesg, machine_pb2.DmesgRequest(follow=app.ns.follow, tail=app.ns.tail), printer)
    printer.close()


def describe_event(ev: machine_pb2.Event) -> tuple[str, str, str]:
    """(type, source, message) of an event's payload."""
    type_name = ev.data.type_url.rsplit("/", 1)[-1]
    short = type_name.rsplit(".", 1)[-1]
    try:
        if short == "ServiceStateEvent":
            m = machine_pb2.ServiceStateEvent.FromString(ev.data.value)
            action = machine_pb2.ServiceStateEvent.Action.Name(m.action)
            return short, m.service, f"{action}: {m.message}"
        if short == "MachineStatusEvent":
            m2 = machine_pb2.MachineStatusEvent.FromString(ev.data.value)
            stage = machine_pb2.MachineStatusEvent.MachineStage.Name(m2.stage)
            ready = "ready" if m2.status.ready else "not ready"
            unmet = ", ".join(f"{c.name}: {c.reason}" for c in m2.status.unmet_conditions)
            return short, "machine", f"{stage} ({ready}{'; ' + unmet if unmet else ''})"
        if short == "ConfigLoadErrorEvent":
            return short, "config", machine_pb2.ConfigLoadErrorEvent.FromString(ev.data.value).error
        if short == "ConfigValidationErrorEvent":
            return short, "config", machine_pb2.ConfigValidationErrorEvent.FromString(ev.data.value).error
    except Exception:
        pass
    return short, "", ""


def cmd_events(app: App) -> None:
    w = [0, 0, 0, 0, 0]
    headers = ["NODE", "ID", "EVENT", "ACTOR", "SOURCE", "MESSAGE"]
    printed = [False]

    def on_item(ev: Any) -> None:
        if not ev.data.type_url:
            return  # the stream's "hello"
        kind, source, message = describe_event(ev)
        row = [node_of(ev, app.label(None)), ev.id, kind, ev.actor_id, source, message]
        rows = [row] if printed[0] else [headers, row]
        nw = widths(rows, w)
        w[:] = nw[:5]
        for r in rows:
            app.out.write(format_row(r, nw) + "\n")
        printed[0] = True
        app.out.flush()

    req = machine_pb2.EventsRequest(
        tail_events=app.ns.tail,
        tail_id=app.ns.since or "",
        tail_seconds=int(app.ns.duration or 0),  # whole seconds, as talosctl
        with_actor_id=app.ns.actor_id or "",
    )
    app.stream(app.machine().Events, req, on_item)
