"""spanctl config: the client configuration (contexts, endpoints, nodes, add, remove, merge, new)."""

from __future__ import annotations

import fnmatch
import sys
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
            "config: a subcommand is required (contexts, context, endpoint, node, info, add, remove, merge, new)"
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
    if sub == "add":
        _config_add(app, cfg)
        return
    if sub == "remove":
        _config_remove(app, cfg)
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


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the {what} {path}: {e.strerror}") from None


def _config_add(app: App, cfg: ClientConfig) -> None:
    """talosctl's ``config add NAME --ca --crt --key``: a context with those certificates (files read
    as PEM) and no endpoints; an existing context of that name is replaced; the current one is kept."""
    ns = app.ns
    if not ns.name:
        raise UsageError("config add: a context name is required")
    if bool(ns.crt) != bool(ns.key):
        raise UsageError("config add: --crt and --key go together (one given without the other)")
    ctx = Context()
    if ns.ca:
        ctx.ca = _read(ns.ca, "CA certificate")
    if ns.crt:
        ctx.crt = _read(ns.crt, "certificate")
        ctx.key = _read(ns.key, "key")
    cfg.contexts[ns.name] = ctx
    _save(app, cfg)


def _confirm(app: App, prompt: str) -> bool:
    """Ask on stderr, read a line from stdin: only y/yes confirms (end of input: no)."""
    print(f"{prompt} [y/N]: ", end="", file=app.err, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _config_remove(app: App, cfg: ClientConfig) -> None:
    """talosctl's ``config remove PATTERN``: every context matching the glob, except the current one
    (skipped with a note); each confirmed unless ``-y/--noconfirm``; ``--dry-run`` writes nothing."""
    ns = app.ns
    if not ns.name:
        raise UsageError("config remove: no context specified")
    if not cfg.contexts:
        raise UsageError(f"no contexts defined in {app.config_path}")
    matches = sorted(n for n in cfg.contexts if fnmatch.fnmatchcase(n, ns.name))
    if not matches:
        raise UsageError(f"no contexts matched {ns.name!r}")
    changed = False
    for name in matches:
        if name == cfg.context:
            print(
                f"skipping removal of current context {name!r}: switch to another one first",
                file=app.err,
            )
            continue
        if ns.noconfirm:
            print(f"removing context {name!r}", file=app.err)
        elif not _confirm(app, f"remove context {name!r}?"):
            continue
        del cfg.contexts[name]
        changed = True
    if changed and not ns.dry_run:
        _save(app, cfg)


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
