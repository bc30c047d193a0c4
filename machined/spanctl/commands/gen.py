"""spanctl gen: secrets and machine configurations."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from ..app import App, UsageError, csv_items
from .machineconfig import load_patch_arg, read_file


def _gen_error_types() -> tuple[type[BaseException], ...]:
    from machined.config import ConfigValidationError
    from machined.gen import GenError

    return (GenError, ConfigValidationError)


DISCOVERY_PORT = 3000  # the discovery service's (and our registry's) default port


def looks_like_discovery(arg: str) -> bool:
    """Whether ``gen config``'s ENDPOINT is really a discovery service URL, as spanctl took it before it
    followed talosctl: a host list, an ``http://``/``grpc://`` URL, or port 3000."""
    if "," in arg or arg.startswith(("http://", "grpc://")):
        return True
    try:
        return urlsplit(arg if "://" in arg else "//" + arg).port == DISCOVERY_PORT
    except ValueError:
        return False


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
        if looks_like_discovery(ns.endpoint):
            raise UsageError(  # the URL is not quoted: it may carry credentials
                "gen config NAME ENDPOINT: ENDPOINT is the Kubernetes API endpoint (https://HOST:6443), as "
                "in talosctl, and this one looks like a discovery service URL (a host list, http:// or "
                "grpc://, or port 3000): pass it with --discovery URL and give the Kubernetes endpoint"
            )
        discovery = list(ns.discovery or ())  # gen_config refuses an empty one
        if not discovery:
            discovery = [gen.DEFAULT_DISCOVERY_ENDPOINT]
            print(
                f"note: discovery service {gen.DEFAULT_DISCOVERY_ENDPOINT} (Talos's public one, as talosctl); "
                "use --discovery URL for your own",
                file=app.err,
            )
        secrets = None
        if ns.with_secrets:
            secrets = gen.Secrets.from_yaml(read_file(ns.with_secrets))
            for w in secrets.warnings:
                print(f"warning: {w}", file=app.err)
        generated = gen.gen_config(
            ns.name,
            ns.endpoint,
            secrets,
            [load_patch_arg(p) for p in ns.config_patch or ()],
            controlplane_patches=[load_patch_arg(p) for p in ns.config_patch_control_plane or ()],
            worker_patches=[load_patch_arg(p) for p in ns.config_patch_worker or ()],
            discovery=discovery,
            endpoints=ns.endpoints or ("127.0.0.1",),
            nodes=ns.nodes or (),
            roles=[r for v in ns.roles for r in csv_items(v)] if ns.roles else gen.ADMIN_ROLES,
            cert_sans=[x for v in ns.additional_sans or () for x in csv_items(v)],
        )
        for path in generated.write(ns.output_dir, overwrite=ns.force):
            app.out.write(f"generated {path}\n")
    except errors as e:
        raise UsageError(str(e)) from None
