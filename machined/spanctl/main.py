"""``spanctl``: the operator CLI (talosctl's conventions).

    spanctl [--config F] [--context C] [-e EP,...] [-n NODE,...] [--socket PATH] COMMAND ...

Output goes to stdout; per-node errors are printed after it on stderr (``error from node X: ...``)
and make the exit status 1. Connection problems are one clear line, never a stack trace.
"""

from __future__ import annotations

import argparse
import datetime as dt
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from google.protobuf import duration_pb2, empty_pb2

from discovery.version import version_string
from machined.state.definitions import RESOURCE_DEFINITION_TYPE, ResourceDefinition, resolve
from machined.state.errors import AmbiguousTypeError, UnknownTypeError
from spanapi.talos.cosi import state_pb2, state_pb2_grpc
from spanapi.talos.machine import machine_pb2, machine_pb2_grpc
from spanutil.durations import parse_duration

from . import mesh as meshmod
from .client import ConnectionSetupError, Errors, Target, describe_rpc_error, node_of, split_messages
from .config import ClientConfig, ConfigError, Context, default_path, write_private
from .output import FORMATS, ResourceWriter, definition_from_spec, format_row, spec_data, table, widths

META_NAMESPACE = "meta"
MACHINE_CONFIG_TYPE = "MachineConfigs.config.talos.dev"
MACHINE_CONFIG_ID = "v1alpha1"
PEER_STATUS_TYPE = "KubeSpanPeerStatuses.kubespan.talos.dev"
PEER_STATUS_NAMESPACE = "kubespan"
APPLY_MODES = {
    "auto": machine_pb2.ApplyConfigurationRequest.AUTO,
    "no-reboot": machine_pb2.ApplyConfigurationRequest.NO_REBOOT,
    "reboot": machine_pb2.ApplyConfigurationRequest.REBOOT,
    "staged": machine_pb2.ApplyConfigurationRequest.STAGED,
    "try": machine_pb2.ApplyConfigurationRequest.TRY,
}


class UsageError(Exception):
    pass


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def age(ts_seconds: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    d = max(0, int(now - ts_seconds))
    h, rem = divmod(d, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s ago"
    if m:
        return f"{m}m{s}s ago"
    return f"{s}s ago"


# -- the application ----------------------------------------------------------------------------


class App:
    def __init__(self, ns: argparse.Namespace, out: IO[str], err: IO[str]) -> None:
        self.ns = ns
        self.out = out
        self.err = err
        self.errors = Errors()
        self.config_path = default_path(ns.config)
        self._target: Target | None = None
        self._hostname: str | None = None

    # connection ---------------------------------------------------------------------------------

    def client_config(self) -> ClientConfig:
        return ClientConfig.load(self.config_path)

    @property
    def target(self) -> Target:
        if self._target is None:
            t = Target.from_args(
                self.client_config(),
                context=self.ns.context,
                endpoints=self.ns.endpoints,
                nodes=self.ns.nodes,
                socket=self.ns.socket,
            )
            t.check()
            self._target = t
        return self._target

    def label(self, node: str | None) -> str:
        """The NODE cell: the node as given, or the hostname of the socket's machined (talosctl shows
        the peer address; a socket path says less than the node's name)."""
        t = self.target
        node = node or (t.nodes[0] if t.direct and t.nodes else None)
        if node or not t.direct:
            return t.label(node)
        if self._hostname is None:
            self._hostname = ""
            try:
                resp = self.machine().Hostname(empty_pb2.Empty(), timeout=t.timeout)
                good, _ = split_messages(resp.messages, "")
                self._hostname = good[0].hostname if good else ""
            except grpc.RpcError:
                pass
        return self._hostname or t.label(None)

    def machine(self) -> Any:
        return machine_pb2_grpc.MachineServiceStub(self.target.channel())

    def state(self) -> Any:
        return state_pb2_grpc.StateStub(self.target.channel())

    def all_label(self) -> str:
        t = self.target
        return ", ".join(t.nodes) if t.nodes and not t.direct else self.label(t.nodes[0] if t.nodes else None)

    def unary(self, method: Callable[..., Any], request: Any) -> list[Any]:
        """A fanned-out unary call: good items (apid's error entries go to the per-node errors)."""
        t = self.target
        try:
            resp = method(request, metadata=t.fanout_metadata(), timeout=t.timeout)
        except grpc.RpcError as e:
            self.errors.rpc(self.all_label(), e, t.where)
            return []
        good, errs = split_messages(resp.messages, self.label(None))
        self.errors.extend(errs)
        return good

    def stream(self, method: Callable[..., Any], request: Any, on_item: Callable[[Any], None]) -> None:
        t = self.target
        try:
            for item in method(request, metadata=t.fanout_metadata()):
                md = item.metadata
                if md.error:
                    self.errors.add(md.hostname or self.label(None), md.error)
                    continue
                on_item(item)
        except grpc.RpcError as e:
            self.errors.rpc(self.all_label(), e, t.where)

    # resource definitions -------------------------------------------------------------------------

    def definitions(self, node: str | None) -> list[ResourceDefinition]:
        t = self.target
        defs = []
        for r in self.state().List(
            state_pb2.ListRequest(namespace=META_NAMESPACE, type=RESOURCE_DEFINITION_TYPE),
            metadata=t.node_metadata(node),
            timeout=t.timeout,
        ):
            defs.append(definition_from_spec(spec_data(r.resource)))
        return defs

    def resolve_type(self, arg: str) -> ResourceDefinition | None:
        node = self.target.each_node()[0]
        try:
            return resolve(arg, self.definitions(node))
        except (UnknownTypeError, AmbiguousTypeError) as e:
            raise UsageError(str(e)) from None
        except grpc.RpcError as e:
            self.errors.rpc(self.label(node), e, self.target.where)
            return None

    def peers(self, node: str | None) -> list[meshmod.Peer]:
        t = self.target
        return [
            meshmod.Peer.from_spec(spec_data(r.resource), r.resource.metadata.id)
            for r in self.state().List(
                state_pb2.ListRequest(namespace=PEER_STATUS_NAMESPACE, type=PEER_STATUS_TYPE),
                metadata=t.node_metadata(node),
                timeout=t.timeout,
            )
        ]


# -- commands -----------------------------------------------------------------------------------


def cmd_version(app: App) -> None:
    try:
        from importlib.metadata import version

        tag = version("kubespan-mesh")
    except Exception:
        tag = "unknown"
    app.out.write(f"Client:\n\tTag:         {tag}\n")
    if app.ns.client:
        return
    items = app.unary(app.machine().Version, empty_pb2.Empty())
    if items:
        app.out.write("Server:\n")
    for v in items:
        app.out.write(
            f"\tNODE:        {node_of(v, app.label(None))}\n"
            f"\tTag:         {v.version.tag}\n"
            f"\tSHA:         {v.version.sha}\n"
            f"\tBuilt:       {v.version.built}\n"
            f"\tOS/Arch:     {v.version.os}/{v.version.arch}\n"
            f"\tPlatform:    {v.platform.name}" + (f" ({v.platform.mode})" if v.platform.mode else "") + "\n"
            f"\tEnabled:     {'RBAC' if v.features.rbac else ''}\n"
        )


def cmd_get(app: App) -> None:
    ns = app.ns
    if ns.output not in FORMATS:
        raise UsageError(f"output format {ns.output!r}: must be one of {', '.join(FORMATS)}")
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
                writer.add(label, r.resource)
            else:
                for r in st.List(
                    state_pb2.ListRequest(namespace=namespace, type=defn.type), metadata=md, timeout=t.timeout
                ):
                    writer.add(label, r.resource)
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
            writer.add(label, ev.resource, ev.event_type)
            if bootstrapped:
                writer.flush()
        writer.flush()
    finally:
        for c in calls:
            c.cancel()


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


def cmd_logs(app: App) -> None:
    ns = app.ns
    printer = LinePrinter(app.out, app.label(None))
    req = machine_pb2.LogsRequest(namespace="system", id=ns.id, follow=ns.follow, tail_lines=ns.tail)
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
        tail_events=app.ns.tail, tail_id=app.ns.since or "", with_actor_id=app.ns.actor_id or ""
    )
    app.stream(app.machine().Events, req, on_item)


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def _apply_request(data: bytes, ns: argparse.Namespace) -> machine_pb2.ApplyConfigurationRequest:
    req = machine_pb2.ApplyConfigurationRequest(data=data, mode=APPLY_MODES[ns.mode], dry_run=ns.dry_run)
    if ns.timeout is not None:
        req.try_mode_timeout.CopyFrom(
            duration_pb2.Duration(seconds=int(ns.timeout), nanos=int(ns.timeout % 1 * 1e9))
        )
    return req


def _print_apply(app: App, items: list[Any], several: bool) -> None:
    for item in items:
        node = node_of(item, app.label(None))
        for w in item.warnings:
            print(f"warning from node {node}: {w}", file=app.err)
        details = item.mode_details.rstrip("\n")
        if app.ns.dry_run and not details:
            details = "No changes."
        app.out.write((f"{node}:\n{details}\n" if several else f"{details}\n") if details else "")


def cmd_apply_config(app: App) -> None:
    data = _read_file(app.ns.file)
    items = app.unary(app.machine().ApplyConfiguration, _apply_request(data, app.ns))
    _print_apply(app, items, len(items) > 1)


def load_patch_arg(text: str) -> str:
    if text.startswith("@"):
        return _read_file(text[1:]).decode()
    return text


def cmd_patch(app: App) -> None:
    from machined.config.patch import apply_patches

    if app.ns.resource.lower() not in ("machineconfig", "mc", "machineconfigs", MACHINE_CONFIG_TYPE.lower()):
        raise UsageError(f'patch: only "machineconfig" can be patched (got "{app.ns.resource}")')
    if not app.ns.patch:
        raise UsageError("patch: at least one --patch/-p is required")
    patches = [load_patch_arg(p) for p in app.ns.patch]
    t = app.target
    nodes = t.each_node()
    for node in nodes:
        label = app.label(node)
        md = t.node_metadata(node)
        try:
            r = app.state().Get(
                state_pb2.GetRequest(namespace="config", type=MACHINE_CONFIG_TYPE, id=MACHINE_CONFIG_ID),
                metadata=md,
                timeout=t.timeout,
            )
        except grpc.RpcError as e:
            app.errors.add(label, "reading the machine config: " + describe_rpc_error(e, t.where))
            continue
        try:
            docs = [d for d in yaml.safe_load_all(r.resource.spec.yaml_spec) if d is not None]
            new_docs = apply_patches(docs, patches)
        except Exception as e:
            app.errors.add(label, f"patching: {e}")
            continue
        data = yaml.safe_dump_all(new_docs, sort_keys=False).encode()
        try:
            resp = app.machine().ApplyConfiguration(
                _apply_request(data, app.ns), metadata=md, timeout=t.timeout
            )
        except grpc.RpcError as e:
            app.errors.rpc(label, e, t.where)
            continue
        good, errs = split_messages(resp.messages, label)
        app.errors.extend(errs)
        for item in good:
            item.metadata.hostname = item.metadata.hostname or label
        _print_apply(app, good, len(nodes) > 1)


# config ----------------------------------------------------------------------------------------


def _save(app: App, cfg: ClientConfig) -> None:
    write_private(app.config_path, cfg.to_yaml())


def cmd_config(app: App) -> None:
    ns = app.ns
    sub = ns.config_cmd
    if sub is None:
        raise UsageError(
            "config: a subcommand is required (contexts, context, endpoint, node, info, merge, new)"
        )
    if sub == "new":
        _config_new(app)
        return
    cfg = app.client_config()
    if sub == "contexts":
        rows = [
            ["*" if name == cfg.context else "", name, ",".join(c.endpoints), ",".join(c.nodes)]
            for name, c in sorted(cfg.contexts.items())
        ]
        app.out.write(table(["CURRENT", "NAME", "ENDPOINTS", "NODES"], rows))
        return
    if sub == "context":
        if ns.name not in cfg.contexts:
            raise UsageError(f'context "{ns.name}" is not defined in {app.config_path}')
        cfg.context = ns.name
        _save(app, cfg)
        return
    if sub == "merge":
        other = ClientConfig.load(Path(ns.file), missing_ok=False)
        name = cfg.merge(other)
        _save(app, cfg)
        app.out.write(f"merged; current context is now {name!r}\n")
        return
    name, ctx = _current_for_edit(app, cfg)
    if sub == "endpoint":
        ctx.endpoints = [e for v in ns.values for e in _csv(v)]
        _save(app, cfg)
    elif sub == "node":
        ctx.nodes = [n for v in ns.values for n in _csv(v)]
        _save(app, cfg)
    elif sub == "info":
        rows = [
            ["Current context:", name],
            ["Nodes:", ", ".join(ctx.nodes) or "not defined"],
            ["Endpoints:", ", ".join(ctx.endpoints) or "not defined"],
        ]
        roles, expires = _cert_info(ctx)
        rows += [["Roles:", roles], ["Certificate expires:", expires]]
        app.out.write("".join(f"{k:<22}{v}\n" for k, v in rows))


def _current_for_edit(app: App, cfg: ClientConfig) -> tuple[str, Context]:
    name = app.ns.context or cfg.context
    if not name or name not in cfg.contexts:
        raise UsageError(f"no current context in {app.config_path} (use 'spanctl config context NAME')")
    return name, cfg.contexts[name]


def _cert_info(ctx: Context) -> tuple[str, str]:
    if not ctx.crt:
        return "not defined", "not defined"
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(ctx.crt)
        roles = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        return ", ".join(str(r) for r in roles) or "none", cert.not_valid_after_utc.isoformat()
    except Exception:
        return "unreadable certificate", "unknown"


def _config_new(app: App) -> None:
    ns = app.ns
    roles = [r for v in ns.roles for r in _csv(v)] if ns.roles else ["os:admin"]
    req = machine_pb2.GenerateClientConfigurationRequest(roles=roles)
    if ns.crt_ttl is not None:
        req.crt_ttl.CopyFrom(duration_pb2.Duration(seconds=int(ns.crt_ttl)))
    items = app.unary(app.machine().GenerateClientConfiguration, req)
    if not items:
        return
    item = items[0]
    if item.talosconfig:
        data = item.talosconfig
    else:
        t = app.target
        ctx = Context(
            endpoints=[t.endpoint] if not t.direct else [],
            nodes=list(t.nodes),
            ca=item.ca,
            crt=item.crt,
            key=item.key,
        )
        data = ClientConfig("default", {"default": ctx}).to_yaml().encode()
    path = Path(ns.path)
    write_private(path, data)
    app.out.write(f"client config with roles {', '.join(roles)} written to {path}\n")


# mesh ------------------------------------------------------------------------------------------


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
    views, failures = collect_views(app, with_hostname=True)
    if views:
        app.out.write(meshmod.render_matrix(views))
    for label, msg in failures.items():
        app.errors.add(label, msg)


def cmd_health(app: App) -> None:
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


# gen -------------------------------------------------------------------------------------------


def _gen_error_types() -> tuple[type[BaseException], ...]:
    from machined.config import ConfigValidationError
    from machined.gen import GenError

    return (GenError, ConfigValidationError)


def cmd_gen(app: App) -> None:
    ns = app.ns
    if ns.gen_cmd is None:
        raise UsageError("gen: a subcommand is required (secrets, config)")
    from machined import gen

    errors = _gen_error_types()
    try:
        if ns.gen_cmd == "secrets":
            path = Path(ns.output_file or "secrets.yaml")
            if path.exists() and not ns.force:
                raise UsageError(f"refusing to overwrite {path} (use --force)")
            secrets = gen.gen_secrets()
            path.parent.mkdir(parents=True, exist_ok=True)
            secrets.write(path)
            for w in secrets.warnings:
                print(f"warning: {w}", file=app.err)
            app.out.write(f"secrets written to {path}\n")
            return
        secrets = None
        if ns.with_secrets:
            secrets = gen.Secrets.from_yaml(_read_file(ns.with_secrets))
            for w in secrets.warnings:
                print(f"warning: {w}", file=app.err)
        generated = gen.gen_config(
            ns.name,
            ns.discovery_endpoint,
            secrets,
            [load_patch_arg(p) for p in ns.config_patch or ()],
            controlplane_patches=[load_patch_arg(p) for p in ns.config_patch_control_plane or ()],
            worker_patches=[load_patch_arg(p) for p in ns.config_patch_worker or ()],
            endpoints=ns.endpoints or ("127.0.0.1",),
            nodes=ns.nodes or (),
            roles=[r for v in ns.roles for r in _csv(v)] if ns.roles else gen.ADMIN_ROLES,
            cert_sans=[x for v in ns.additional_sans or () for x in _csv(v)],
        )
        for path in generated.write(ns.output_dir, overwrite=ns.force):
            app.out.write(f"generated {path}\n")
    except errors as e:
        raise UsageError(str(e)) from None


# -- argument parsing ---------------------------------------------------------------------------


def _globals() -> argparse.ArgumentParser:
    """Global flags, accepted before and after the command (as talosctl's persistent flags)."""
    g = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    g.add_argument(
        "--config",
        "--talosconfig",
        default=s,
        help="client config file (env SPANCTL_CONFIG; default ~/.spanctl/config)",
    )
    g.add_argument("--context", default=s, help="context of the client config to use")
    g.add_argument(
        "-e",
        "--endpoints",
        action="append",
        default=s,
        help="apid endpoints (comma-separated or repeated), or unix:///path",
    )
    g.add_argument(
        "-n", "--nodes", action="append", default=s, help="target nodes (comma-separated or repeated)"
    )
    g.add_argument(
        "--socket", default=s, help="talk to machined directly on this unix socket (no TLS, one node)"
    )
    return g


GLOBAL_DEFAULTS: dict[str, Any] = {
    "config": None,
    "context": None,
    "endpoints": None,
    "nodes": None,
    "socket": None,
}


def build_parser() -> argparse.ArgumentParser:
    g = _globals()
    p = argparse.ArgumentParser(
        prog="spanctl", description="Operator CLI for machined/apid (talosctl's conventions).", parents=[g]
    )
    p.add_argument("--version", action="version", version=version_string("spanctl"))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(
        name: str, help: str, fn: Callable[[App], None], aliases: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, parents=[g], aliases=list(aliases))
        sp.set_defaults(fn=fn)
        return sp

    sp = add("version", "client and server versions", cmd_version)
    sp.add_argument("--client", action="store_true", help="only the client version")

    sp = add("get", "resources (by type alias): get TYPE [ID]", cmd_get)
    sp.add_argument("type")
    sp.add_argument("id", nargs="?")
    sp.add_argument("-o", "--output", default="table", help="table, yaml or json")
    sp.add_argument("-w", "--watch", action="store_true", help="watch for changes")
    sp.add_argument("--namespace", help="resource namespace (default: the type's)")

    sp = add("service", "list services, or status/start/stop/restart one", cmd_service, aliases=["services"])
    sp.add_argument("id", nargs="?")
    sp.add_argument("action", nargs="?", choices=["start", "stop", "restart", "status"])

    sp = add("logs", "a service's logs", cmd_logs)
    sp.add_argument("id")
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("--tail", type=int, default=-1, help="lines of history (-1: all)")

    sp = add("events", "stream runtime events", cmd_events)
    sp.add_argument("--tail", type=int, default=0, help="past events to show (-1: all)")
    sp.add_argument("--since", help="show events after this event id")
    sp.add_argument("--actor-id", help="only events of this actor")

    sp = add("dmesg", "kernel messages", cmd_dmesg)
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("--tail", action="store_true", help="only new messages")

    def apply_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-m", "--mode", choices=list(APPLY_MODES), default="auto")
        sp.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
        sp.add_argument(
            "--timeout", type=parse_duration, help="try mode: roll back after this long (default 1m)"
        )

    sp = add("apply-config", "apply a machine config", cmd_apply_config, aliases=["apply"])
    sp.add_argument("-f", "--file", required=True)
    apply_flags(sp)

    sp = add("patch", "patch the machine config: patch machineconfig -p @patch.yaml", cmd_patch)
    sp.add_argument("resource")
    sp.add_argument("-p", "--patch", action="append", help="patch text (YAML or JSON), or @file; repeatable")
    apply_flags(sp)

    sp = add("config", "client config: contexts, context, endpoint, node, info, merge, new", cmd_config)
    csub = sp.add_subparsers(dest="config_cmd", metavar="SUBCOMMAND")
    csub.add_parser("contexts", parents=[g], help="list contexts")
    c = csub.add_parser("context", parents=[g], help="switch the current context")
    c.add_argument("name")
    c = csub.add_parser(
        "endpoint", parents=[g], aliases=["endpoints"], help="set the current context's endpoints"
    )
    c.add_argument("values", nargs="*")
    c = csub.add_parser("node", parents=[g], aliases=["nodes"], help="set the current context's nodes")
    c.add_argument("values", nargs="*")
    csub.add_parser("info", parents=[g], help="show the current context")
    c = csub.add_parser("merge", parents=[g], help="add the contexts of another client config")
    c.add_argument("file")
    c = csub.add_parser("new", parents=[g], help="generate a client config (GenerateClientConfiguration)")
    c.add_argument("path", nargs="?", default="talosconfig")
    c.add_argument("--roles", action="append", help="roles (comma-separated or repeated; default os:admin)")
    c.add_argument("--crt-ttl", type=parse_duration, help="certificate lifetime (e.g. 8760h)")

    sp = add("health", "check the mesh: every peer up with a recent handshake", cmd_health)
    sp.add_argument(
        "--wait-timeout", type=parse_duration, default=300.0, help="how long to wait (default 5m)"
    )
    sp.add_argument(
        "--handshake-max-age",
        type=parse_duration,
        default=300.0,
        help="a handshake older than this fails (default 5m)",
    )
    sp.add_argument("--min-peers", type=int, default=1, help="peers each node must have (default 1)")
    sp.add_argument("--interval", type=parse_duration, default=1.0, help=argparse.SUPPRESS)

    add("mesh", "every node's view of its peers, as one matrix", cmd_mesh)
    sp = add("gen", "generate secrets and configs: gen secrets | gen config NAME DISCOVERY-ENDPOINT", cmd_gen)
    gsub = sp.add_subparsers(dest="gen_cmd", metavar="SUBCOMMAND")
    c = gsub.add_parser("secrets", parents=[g], help="a secrets bundle (cluster id/secret, OS CA, token)")
    c.add_argument("-o", "--output-file", help="where to write it (default secrets.yaml)")
    c.add_argument("--force", action="store_true", help="overwrite an existing file")
    c = gsub.add_parser("config", parents=[g], help="controlplane.yaml, worker.yaml and talosconfig")
    c.add_argument("name", help="cluster name")
    c.add_argument("discovery_endpoint", help="discovery service URL")
    c.add_argument("--with-secrets", help="use this secrets bundle (from gen secrets)")
    c.add_argument("--config-patch", action="append", help="patch for both configs (text or @file)")
    c.add_argument("--config-patch-control-plane", action="append", help="patch for controlplane.yaml")
    c.add_argument("--config-patch-worker", action="append", help="patch for worker.yaml")
    c.add_argument(
        "--roles", action="append", help="roles of the talosconfig's certificate (default os:admin)"
    )
    c.add_argument("--additional-sans", action="append", help="extra certificate SANs")
    c.add_argument("-o", "--output-dir", default=".", help="directory for the three files (default .)")
    c.add_argument("--force", action="store_true", help="overwrite existing files")
    return p


def _normalise(ns: argparse.Namespace) -> None:
    for k, v in GLOBAL_DEFAULTS.items():
        if not hasattr(ns, k):
            setattr(ns, k, v)
    for k in ("endpoints", "nodes"):
        v = getattr(ns, k)
        if v is not None:
            setattr(ns, k, [x for item in v for x in _csv(item)])
    if getattr(ns, "command", None) == "config":
        ns.config_cmd = {"endpoints": "endpoint", "nodes": "node"}.get(ns.config_cmd, ns.config_cmd)


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    ns = parser.parse_args(argv)
    _normalise(ns)
    if not getattr(ns, "fn", None):
        parser.print_help(err)
        return 2
    app = App(ns, out, err)
    try:
        ns.fn(app)
    except (ConnectionSetupError, ConfigError, UsageError) as e:
        out.flush()
        print(f"spanctl: {e}", file=err)
        return 1
    except grpc.RpcError as e:
        out.flush()
        print(f"spanctl: {describe_rpc_error(e, app.target.where if app._target else '?')}", file=err)
        return 1
    except OSError as e:
        out.flush()
        print(f"spanctl: {e}", file=err)
        return 1
    except KeyboardInterrupt:
        out.flush()
        return 130 if not app.errors else app.errors.report(err)
    except BrokenPipeError:
        return 0
    finally:
        if app._target is not None:
            app._target.close()
    out.flush()
    return app.errors.report(err)


if __name__ == "__main__":
    sys.exit(main())
