"""``spanctl dashboard --web [ADDR]``: serve the live mesh page for this client config's cluster."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from ..app import App, UsageError
from ..client import CLUSTER_METADATA
from .agents import AgentCollector, AgentURLError, parse_agent_url
from .collector import Collector, aio_channel
from .server import ListenError, check_listen, is_loopback, parse_listen, serve


def cmd_dashboard(app: App) -> None:
    ns = app.ns
    if ns.web is None:
        raise UsageError(
            "dashboard: only the web dashboard exists: spanctl dashboard --web [ADDR] (default 127.0.0.1:50080)"
        )
    try:
        host, port = parse_listen(ns.web or None)
        check_listen(host, ns.allow_remote)
    except ListenError as e:
        raise UsageError(str(e)) from None
    if ns.agent:
        serve_agents(app, host, port, ns.agent)
        return
    t = app.target
    explicit = list(ns.nodes) if ns.nodes else None
    seed = None if explicit else (t.nodes[0] if t.nodes and not t.direct else None)

    @contextlib.asynccontextmanager
    async def through_apid() -> AsyncIterator[Collector]:
        channel = aio_channel(t)
        cluster = getattr(t, "cluster", "")
        try:
            yield Collector(
                channel,
                direct=t.direct,
                targets=explicit,
                seed=seed,
                where=t.where,
                metadata=((CLUSTER_METADATA, cluster),) if cluster else (),
            )
        finally:
            await channel.close()

    _serve_page(app, host, port, sees="what your certificate can read", note="", collectors=through_apid)


def serve_agents(app: App, host: str, port: int, agents: list[str]) -> None:
    """``--agent URL ...``: the page from plain agents' ``/status`` (no client config, no apid); the
    apid flags are refused rather than ignored, so a mixed command line does not show something else
    than asked for."""
    ns = app.ns
    clash = [
        flag
        for flag, value in (
            ("-n/--nodes", ns.nodes),
            ("-e/--endpoints", ns.endpoints),
            ("--socket", ns.socket),
        )
        if value
    ]
    if ns.cluster:
        clash.append("-c/--cluster")
    if clash:
        raise UsageError(
            f"dashboard: --agent reads the agents' HTTP /status directly; it cannot be combined with "
            f"{', '.join(clash)} (those select nodes through apid)"
        )
    try:
        urls = [parse_agent_url(u) for u in agents]
    except AgentURLError as e:
        raise UsageError(f"dashboard: {e}") from None

    @contextlib.asynccontextmanager
    async def from_agents() -> AsyncIterator[AgentCollector]:
        yield AgentCollector(urls)

    _serve_page(
        app, host, port, sees="the agents' status", note=f"{len(urls)} agents; ", collectors=from_agents
    )


def _serve_page(
    app: App,
    host: str,
    port: int,
    *,
    sees: str,
    note: str,
    collectors: Callable[[], AbstractAsyncContextManager[Any]],
) -> None:
    """Serve the page from the collector ``collectors()`` opens until SIGINT/SIGTERM; warn first when
    the address is beyond loopback (the page has no login)."""
    if not is_loopback(host):
        print(
            "spanctl: warning: the dashboard listens beyond loopback and has no login: anyone who reaches "
            f"{host or 'this host'}:{port} sees {sees}",
            file=app.err,
            flush=True,
        )

    def ready(url: str) -> None:
        app.out.write(f"dashboard: {url} ({note}Ctrl-C to stop)\n")
        app.out.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        async with collectors() as collector:
            await serve(collector, host, port, loopback_only=is_loopback(host), stop=stop, ready=ready)

    asyncio.run(main())
