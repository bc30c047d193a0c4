"""The mesh engine wired to its real adapters: what ``kubespan run`` and machined share.

:func:`build_mesh` picks the WireGuard backend, creates the discovery client and
the data-plane managers and hands them to :class:`~kubespan.engine.Mesh`;
:class:`MeshRunner` starts them in order (discovery first, then the engine) and
stops them, optionally leaving the cluster first. Tests and benchmarks pass
fakes through :class:`MeshDeps` for any adapter.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kubespan import constants as C
from kubespan.engine import Mesh, MeshOptions, load_node_id
from kubespan.hostinfo import HostInfo
from kubespan.ports import (
    ChangeWatcher,
    Closable,
    DiscoveryPort,
    Leaver,
    LinkPort,
    NftPort,
    PunchPort,
    RelayClientPort,
    RelayServerPort,
    Startable,
    StunPort,
)
from kubespan.probe import Prober
from kubespan.wireguard.backend import WireGuardBackend
from spanutil.logs import log_event

log = logging.getLogger("kubespan")

DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
LEAVE_TIMEOUT = 5.0
# wireguard-go's LOG_LEVEL (its log is <socket dir>/<link>.log): error by default; debug shows every
# handshake message sent and received (for a stalled first handshake: bench/mesh_join.py --wg-debug)
WG_LOG_LEVEL_ENV = "KUBESPAN_WIREGUARD_LOG_LEVEL"
WG_LOG_LEVELS = ("silent", "error", "verbose", "debug")


async def make_backend(
    kind: str,
    link_name: str,
    *,
    socket_dir: Path = DEFAULT_SOCKET_DIR,
    binary: str = "wireguard-go",
    on_restart: Callable[[], Awaitable[None]] | None = None,
) -> WireGuardBackend:
    """``kind`` is ``auto`` (kernel when ``ip link add type wireguard`` works), ``kernel`` or ``userspace``."""
    if kind == "auto":
        from kubespan.wireguard.kernel import kernel_available

        kind = "kernel" if await kernel_available() else "userspace"
    if kind == "kernel":
        from kubespan.wireguard.kernel import KernelBackend

        return KernelBackend(link_name)
    if kind != "userspace":
        raise ValueError(f"WireGuard backend must be auto, kernel or userspace, not {kind!r}")
    from kubespan.wireguard.userspace import UserspaceBackend

    level = os.environ.get(WG_LOG_LEVEL_ENV) or "error"
    if level not in WG_LOG_LEVELS:
        raise ValueError(f"{WG_LOG_LEVEL_ENV}: {level!r} must be one of {', '.join(WG_LOG_LEVELS)}")
    return UserspaceBackend(
        link_name, socket_dir=socket_dir, binary=binary, on_restart=on_restart, log_level=level
    )


@dataclass
class MeshDeps:
    """Adapters to use instead of the real ones (any subset; None = the real adapter)."""

    backend: WireGuardBackend | None = None
    links: LinkPort | None = None
    nft: NftPort | None = None
    host: HostInfo | None = None
    prober: Prober | None = None
    # replaces the DiscoveryClient; ``start``, ``close`` and ``delete_local_affiliate`` are called
    # when it has them (Startable, Closable, Leaver)
    discovery: DiscoveryPort | None = None
    stun: StunPort | None = None  # endpoint discovery (the real one runs only with STUN servers)
    punch: PunchPort | None = None  # hole punching (the real one runs only with STUN servers)
    relay_client: RelayClientPort | None = None  # with STUN servers or --relay
    relay_server: RelayServerPort | None = None  # with --relay
    # changes to the nftables table from outside; the real one runs with the real, in-process table
    nft_watch: ChangeWatcher | None = None


class MeshRunner:
    """A built mesh and its discovery client; ``await start()`` … ``await stop()``."""

    def __init__(self, mesh: Mesh, discovery: DiscoveryPort | None, backend: WireGuardBackend) -> None:
        self.mesh = mesh
        self.discovery = discovery
        self.backend = backend
        self.started = False

    async def start(self) -> None:
        """Start discovery, then the engine. On failure everything is closed again and the error raised."""
        if isinstance(self.discovery, Startable):
            await self.discovery.start()
        try:
            await self.mesh.start()
        except BaseException:
            await self._close_discovery()
            try:
                await self.backend.close(remove=True)
            except Exception as e:
                log_event(log, "backend close after a failed start failed", logging.WARNING, error=str(e))
            raise
        self.started = True

    async def stop(self, *, cleanup: bool = True, leave: bool | None = None) -> None:
        """Stop the engine. ``leave`` (default: ``cleanup``) deletes our discovery entry first so peers
        drop us at once; ``cleanup`` removes the link, routes, rules and nftables table."""
        leave = cleanup if leave is None else leave
        if leave and self.started:
            if isinstance(self.discovery, Leaver):
                try:
                    async with asyncio.timeout(LEAVE_TIMEOUT):
                        await self.discovery.delete_local_affiliate()
                except TimeoutError:
                    log_event(
                        log,
                        "discovery delete timed out; peers drop this node when its TTL expires",
                        logging.WARNING,
                    )
                except Exception as e:
                    log_event(log, "discovery delete failed", logging.WARNING, error=str(e))
        try:
            if self.started:
                await self.mesh.stop(cleanup=cleanup)
        finally:  # the discovery sessions and watches stop even when the engine's stop raises
            self.started = False
            await self._close_discovery()

    async def _close_discovery(self) -> None:
        if isinstance(self.discovery, Closable):
            try:
                await self.discovery.close()
            except Exception as e:
                log_event(log, "discovery close failed", logging.WARNING, error=str(e))


async def build_mesh(
    opts: MeshOptions,
    *,
    discovery_urls: Sequence[str],
    discovery_ca: Path | None = None,
    backend: str = "auto",
    wireguard_go: str = "wireguard-go",
    socket_dir: Path = DEFAULT_SOCKET_DIR,
    deps: MeshDeps | None = None,
) -> MeshRunner:
    """The engine with its adapters, not started. The discovery client wakes the engine on every
    change of the affiliates and of our public IP."""
    deps = deps or MeshDeps()
    cfg = opts.config
    opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ref: list[Mesh] = []

    def wake(*_: object) -> None:
        if ref:
            ref[0].wake()

    async def on_restart() -> None:
        log_event(log, "wireguard-go restarted; re-applying", logging.WARNING)
        if ref:
            ref[0].wake(dataplane=True)

    wg = deps.backend or await make_backend(
        backend, cfg.link_name, socket_dir=socket_dir, binary=wireguard_go, on_restart=on_restart
    )
    discovery = deps.discovery
    if discovery is None and discovery_urls:
        from discovery.client import DiscoveryClient

        discovery = DiscoveryClient(
            list(discovery_urls),
            cluster_id=opts.cluster_id,
            secret=opts.cluster_secret,
            affiliate_id=load_node_id(opts.state_dir),
            tls_ca=discovery_ca,
            on_change=wake,
            on_public_ip=wake,
        )
    links = deps.links
    if links is None:
        from kubespan.dataplane.links import LinkManager

        links = LinkManager.from_config(cfg)
    nft, nft_watch = deps.nft, deps.nft_watch
    if nft is None:
        from kubespan.dataplane.nft import NftManager

        nft = NftManager.from_config(cfg)
        if nft_watch is None and nft.in_process:  # our own writes are known by our thread ids
            from kubespan.dataplane.nftwatch import NftWatch

            nft_watch = NftWatch(cfg.nft_table)
    if cfg.steering == C.STEERING_ROUTES:
        from kubespan.dataplane.steering import RouteSteering

        nft = RouteSteering(links, nft)  # the target sets become routes; the table only clamps
    host = deps.host
    if host is None:
        from kubespan.hostinfo import NetlinkHost

        host = NetlinkHost()
    stun = deps.stun
    if stun is None and opts.stun_servers:
        from kubespan.nat.stunclient import RawStun

        stun = RawStun(fwmark=cfg.fwmark_wireguard)  # probes skip the mesh's routing, like WireGuard's
    # NAT traversal needs the NAT classes STUN finds; without STUN servers the mesh works as before
    punch, relay_client, relay_server = deps.punch, deps.relay_client, deps.relay_server
    if punch is None and opts.stun_servers:
        from kubespan.nat.opener import RawPunch
        from kubespan.nat.probemsg import probe_key

        punch = RawPunch(probe_key(opts.cluster_secret), fwmark=cfg.fwmark_wireguard)
    if relay_client is None and (opts.stun_servers or opts.relay):
        from kubespan.relay.agent import MeshRelayClient

        relay_client = MeshRelayClient()
    if relay_server is None and opts.relay:
        from kubespan.relay.agent import MeshRelayServer

        relay_server = MeshRelayServer()
    mesh = Mesh(
        opts,
        backend=wg,
        links=links,
        nft=nft,
        host=host,
        discovery=discovery,
        prober=deps.prober or Prober(),
        stun=stun,
        punch=punch,
        relay_client=relay_client,
        relay_server=relay_server,
        nft_watch=nft_watch,
    )
    ref.append(mesh)
    return MeshRunner(mesh, discovery, wg)
