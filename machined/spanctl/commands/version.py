"""spanctl version: client and server versions."""

from __future__ import annotations

from google.protobuf import empty_pb2

from discovery.version import version, version_string

from ..app import App
from ..client import node_of


def cmd_version(app: App) -> None:
    """Client and server versions; ``--short`` shortens the client part to one line (name and tag),
    as talosctl's does, and leaves the server part as it is."""
    if app.ns.short:
        app.out.write(f"Client:\n{version_string('spanctl')}\n")
    else:
        app.out.write(f"Client:\n\tTag:         {version()}\n")
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
