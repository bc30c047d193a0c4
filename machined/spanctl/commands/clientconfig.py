"""spanctl config: the client configuration (contexts, endpoints, nodes, new)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import duration_pb2

from spanapi.talos.machine import machine_pb2

from ..app import App, UsageError, csv_items
from ..config import ClientConfig, Context, write_private
from ..output import table


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
        ctx.endpoints = [e for v in ns.values for e in csv_items(v)]
        _save(app, cfg)
    elif sub == "node":
        ctx.nodes = [n for v in ns.values for n in csv_items(v)]
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
    roles = [r for v in ns.roles for r in csv_items(v)] if ns.roles else ["os:admin"]
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
