"""spanctl gen: secrets and machine configurations."""

from __future__ import annotations

from pathlib import Path

from ..app import App, UsageError, csv_items
from .machineconfig import load_patch_arg, read_file


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
            secrets = gen.Secrets.from_yaml(read_file(ns.with_secrets))
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
            roles=[r for v in ns.roles for r in csv_items(v)] if ns.roles else gen.ADMIN_ROLES,
            cert_sans=[x for v in ns.additional_sans or () for x in csv_items(v)],
        )
        for path in generated.write(ns.output_dir, overwrite=ns.force):
            app.out.write(f"generated {path}\n")
    except errors as e:
        raise UsageError(str(e)) from None
