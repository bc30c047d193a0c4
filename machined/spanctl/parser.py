"""spanctl's argument parser: global flags, one subcommand per command, and their defaults."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from discovery.version import version_string
from spanutil.durations import parse_duration

from .app import APPLY_MODES, App, csv_items
from .commands.clientconfig import cmd_config
from .commands.gen import cmd_gen
from .commands.health import add_health_flags, cmd_health
from .commands.machineconfig import cmd_apply_config, cmd_patch
from .commands.mesh import cmd_mesh
from .commands.resources import cmd_get
from .commands.services import cmd_dmesg, cmd_events, cmd_logs, cmd_service
from .commands.version import cmd_version
from .dashboard.command import cmd_dashboard


def _globals() -> argparse.ArgumentParser:
    """Global flags, accepted before and after the command (as talosctl's persistent flags)."""
    g = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    g.add_argument(
        "--config",
        "--talosconfig",
        default=s,
        help="client config file (default: $SPANCTL_CONFIG, ~/.spanctl/config if it exists, $TALOSCONFIG, "
        "~/.talos/config if it exists, else ~/.spanctl/config)",
    )
    g.add_argument("--context", default=s, help="context of the client config to use")
    g.add_argument(
        "-c",
        "--cluster",
        default=s,
        help="cluster to connect to if a proxy endpoint is used (sent as 'context' metadata, as talosctl)",
    )
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
    "cluster": None,
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
    sp.add_argument("--short", action="store_true", help="the client version on one line")

    sp = add("get", "resources (by type alias): get TYPE [ID]", cmd_get, aliases=["g"])
    sp.add_argument("type")
    sp.add_argument("id", nargs="?")
    sp.add_argument(
        "-o", "--output", default="table", help="table, yaml, json or jsonpath=TEMPLATE (e.g. '{.spec.x}')"
    )
    sp.add_argument("-w", "--watch", action="store_true", help="watch for changes")
    sp.add_argument("--namespace", help="resource namespace (default: the type's)")

    sp = add("service", "list services, or status/start/stop/restart one", cmd_service, aliases=["services"])
    sp.add_argument("id", nargs="?")
    sp.add_argument("action", nargs="?", choices=["start", "stop", "restart", "status"])

    sp = add("logs", "a service's logs", cmd_logs)
    sp.add_argument("id")
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("--tail", type=int, default=-1, help="lines of history (-1: all)")
    sp.add_argument(
        "-k",
        "--kubernetes",
        action="store_true",
        help="a Kubernetes container's log (namespace k8s.io; our nodes run none: not found)",
    )

    sp = add("events", "stream runtime events", cmd_events)
    sp.add_argument("--tail", type=int, default=0, help="past events to show (-1: all)")
    sp.add_argument(
        "--duration", type=parse_duration, help="show events of this past interval (whole seconds, e.g. 10m)"
    )
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
    sp.add_argument(
        "-p",
        "--config-patch",
        action="append",
        help="patch the file before sending it (text or @file; repeatable, applied in order)",
    )
    sp.add_argument(
        "-i",
        "--insecure",
        action="store_true",
        help="refused: talosctl's maintenance mode; our nodes have none (machined starts only with a config)",
    )
    apply_flags(sp)

    sp = add("patch", "patch the machine config: patch machineconfig -p @patch.yaml", cmd_patch)
    sp.add_argument("resource")
    sp.add_argument("-p", "--patch", action="append", help="patch text (YAML or JSON), or @file; repeatable")
    sp.add_argument("--patch-file", help="a file holding a patch (applied after the -p patches)")
    sp.add_argument("--namespace", help="the resource's namespace (default: config)")
    apply_flags(sp)

    sp = add(
        "config",
        "client config: contexts, context, endpoint, node, info, add, remove, merge, new",
        cmd_config,
    )
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
    c = csub.add_parser("add", parents=[g], help="add a context (certificates from files), as talosctl")
    c.add_argument("name")
    c.add_argument("--ca", help="the path to the CA certificate")
    c.add_argument("--crt", help="the path to the client certificate")
    c.add_argument("--key", help="the path to the client key")
    c = csub.add_parser(
        "remove", parents=[g], help="remove the contexts matching a glob (not the current one)"
    )
    c.add_argument("name", metavar="PATTERN")
    c.add_argument("-y", "--noconfirm", action="store_true", help="do not ask for confirmation")
    c.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    c = csub.add_parser("merge", parents=[g], help="add the contexts of another client config")
    c.add_argument("file")
    c = csub.add_parser("new", parents=[g], help="generate a client config (GenerateClientConfiguration)")
    c.add_argument("path", nargs="?", default="talosconfig")
    c.add_argument("--roles", action="append", help="roles (comma-separated or repeated; default os:admin)")
    c.add_argument("--crt-ttl", type=parse_duration, help="certificate lifetime (e.g. 8760h)")

    sp = add("health", "check the nodes: answering, etcd, machined services, the mesh", cmd_health)
    add_health_flags(sp, cluster=True)

    sp = add("mesh", "every node's view of its peers, as one matrix; mesh health: wait for it", cmd_mesh)
    msub = sp.add_subparsers(dest="mesh_cmd", metavar="SUBCOMMAND")
    add_health_flags(
        msub.add_parser("health", parents=[g], help="every peer up, recent handshakes"), cluster=False
    )
    sp = add(
        "dashboard",
        "a live web view of the mesh: dashboard --web [ADDR] (default 127.0.0.1:50080)",
        cmd_dashboard,
    )
    sp.add_argument(
        "--web",
        nargs="?",
        const="",
        metavar="ADDR",
        help="serve the web dashboard on ADDR (default 127.0.0.1:50080)",
    )
    sp.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback ADDR (the page has no login)"
    )
    sp.add_argument(
        "--agent",
        action="append",
        metavar="URL",
        help="read plain `kubespan run` agents instead of machined through apid: an agent's HTTP address "
        "(its --http-addr, e.g. http://127.0.0.1:51821), repeatable, polled every second at /status; "
        "plain HTTP without mTLS or login (agents bind it to loopback by default); not with -n/-e/--socket",
    )
    sp = add("gen", "generate secrets and configs: gen secrets | gen config NAME ENDPOINT", cmd_gen)
    gsub = sp.add_subparsers(dest="gen_cmd", metavar="SUBCOMMAND")
    c = gsub.add_parser("secrets", parents=[g], help="a secrets bundle (cluster id/secret, OS CA, token)")
    c.add_argument("-o", "--output-file", help="where to write it (default secrets.yaml)")
    c.add_argument("--force", action="store_true", help="overwrite an existing file")
    c = gsub.add_parser("config", parents=[g], help="controlplane.yaml, worker.yaml and talosconfig")
    c.add_argument("name", help="cluster name")
    c.add_argument(
        "endpoint",
        help="the Kubernetes API endpoint, as talosctl: https://HOST:6443 (cluster.controlPlane.endpoint)",
    )
    c.add_argument(
        "--discovery",
        action="append",
        metavar="URL",
        help="discovery service URL, repeatable (one DiscoveryServiceConfig each); replicas of one "
        "registry as a host list (https://10.0.0.1:3000,10.0.0.2:3000); default "
        "https://discovery.talos.dev/ (Talos's public one, as talosctl)",
    )
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


def normalise(ns: argparse.Namespace) -> None:
    for k, v in GLOBAL_DEFAULTS.items():
        if not hasattr(ns, k):
            setattr(ns, k, v)
    for k in ("endpoints", "nodes"):
        v = getattr(ns, k)
        if v is not None:
            setattr(ns, k, [x for item in v for x in csv_items(item)])
    if getattr(ns, "command", None) == "config":
        ns.config_cmd = {"endpoints": "endpoint", "nodes": "node"}.get(ns.config_cmd, ns.config_cmd)
