"""``machined``: the node agent.

    machined --config FILE --state-dir DIR [--socket PATH] [--socket-group GROUP] [--keep-on-exit]
             [--config-lenient]

``--state-dir`` holds the persisted config (``config.yaml``; once written it wins over ``--config``
at later starts), the mesh key and node id, and by default the API socket ``machined.sock``.
Without ``--state-dir`` the ``stateDir`` of the config file's AgentConfig is used. SIGTERM/SIGINT stop
the services, then the mesh (leaving the cluster and removing the link, routes, rules and nftables
table unless ``--keep-on-exit``), and exit 0. Logs are JSON lines on stderr. ``--config-lenient``
accepts keys Talos does not know in Talos's documents with a warning (``machined.config.talos_keys``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from discovery.version import version_string
from spanutil.logs import log_event, setup

log = logging.getLogger("machined")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="machined", description="Node agent hosting the KubeSpan mesh.")
    p.add_argument("--version", action="version", version=version_string("machined"))
    p.add_argument(
        "--config", type=Path, help="machine config (multi-document YAML); used when none is persisted"
    )
    p.add_argument("--state-dir", type=Path, help="persisted config, mesh key and node id, API socket")
    p.add_argument("--socket", type=Path, help="machine API unix socket (default: <state-dir>/machined.sock)")
    p.add_argument("--socket-group", help="group that owns the socket (its members may call the API)")
    p.add_argument(
        "--socket-mode", type=lambda s: int(s, 8), default=0o660, help="socket permissions (octal)"
    )
    p.add_argument(
        "--keep-on-exit",
        "--keep",
        action="store_true",
        help="on exit keep the mesh link, routes, rules, nftables and the discovery entry (restart semantics)",
    )
    p.add_argument("--hostname", help="node name when the config sets no AgentConfig nodename")
    p.add_argument(
        "--config-lenient",
        action="store_true",
        help="accept keys Talos does not know in Talos's documents (v1alpha1, KubeSpanConfig, "
        "KubeSpanEndpointsConfig, DiscoveryServiceConfig, DiscoveryIdentityConfig) with a warning, instead of "
        "refusing the config as a Talos node does; for migrating configs (also: MACHINED_CONFIG_LENIENT=1)",
    )
    p.add_argument("--debug", action="store_true")
    return p


def _state_dir(ns: argparse.Namespace) -> Path:
    if ns.state_dir is not None:
        return ns.state_dir
    if ns.config is None:
        raise SystemExit("machined: --state-dir or --config is required")
    from machined.config import ConfigValidationError, MachineConfig

    try:
        return MachineConfig.parse(ns.config.read_bytes()).agent.state_dir
    except (OSError, ConfigValidationError) as e:
        raise SystemExit(f"machined: no --state-dir, and the config's stateDir cannot be read: {e}") from None


async def run(ns: argparse.Namespace) -> int:
    from machined.daemon import Agent, AgentError, AgentOptions

    opts = AgentOptions(
        state_dir=_state_dir(ns),
        config_path=ns.config,
        socket_path=ns.socket,
        socket_group=ns.socket_group,
        socket_mode=ns.socket_mode,
        keep_on_exit=ns.keep_on_exit,
        hostname=ns.hostname,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(opts)
    try:
        await agent.run(stop)
    except AgentError as e:
        log_event(log, "machined cannot start", logging.ERROR, error=str(e))
        print(f"machined: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup(debug=ns.debug)
    if ns.config_lenient:
        from machined.config import talos_keys

        talos_keys.set_strict_default(False)  # every parse in this process: file, persisted, applied
    if os.geteuid() != 0:
        log_event(log, "not running as root: the mesh needs CAP_NET_ADMIN", logging.WARNING)
    return asyncio.run(run(ns))


if __name__ == "__main__":
    sys.exit(main())
