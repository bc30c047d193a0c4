"""The agent: config, then the mesh, then the resources, then the services, then the API.

:meth:`Agent.start` brings these up in that order, :meth:`Agent.stop` takes them down in reverse,
and config changes are applied one at a time per :class:`ChangeEffects`. Each step and why it comes
where it does: docs/design/machined-agent.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubespan.perms import warn_permissions
from machined.config import (
    ChangeEffects,
    ConfigEvent,
    ConfigManager,
    ConfigStore,
    ConfigValidationError,
    MachineConfig,
    MeshSettings,
    Timer,
)
from machined.controllers import (
    MACHINE_STATUS_ID,
    MACHINED_SERVICE,
    AffiliateController,
    KubeSpanConfigController,
    KubeSpanEndpointController,
    KubeSpanIdentityController,
    KubeSpanNATStatusController,
    KubeSpanPeerSpecController,
    KubeSpanPeerStatusController,
    MachineConfigController,
    MachineStatusController,
    MemberController,
    NetworkStatusController,
    NodeAddressController,
    NodeIdentityController,
    ServiceController,
)
from machined.runtime import Runtime
from machined.services import (
    Clock,
    EventKind,
    EventRing,
    LogRing,
    ServiceEvent,
    ServiceState,
    Spawner,
    Supervisor,
    poll_mesh,
)
from machined.state import DEFINITIONS, EventType, State, register_all
from machined.state.catalog import MACHINE_STATUS, NS_RUNTIME
from spanutil.logs import log_event

from . import logcapture
from .events import MachineEvents
from .meshhost import MeshFactory, MeshHost
from .netinfo import NetInfo, NetlinkInfo

log = logging.getLogger("machined")

SOCKET_NAME = "machined.sock"
MESH_POLL = 1.0
NETLINK_SPACING = 3.0  # seconds between network status refreshes caused by netlink notifications

_MESH_CONTROLLERS = (
    KubeSpanIdentityController.name,
    KubeSpanPeerSpecController.name,
    KubeSpanPeerStatusController.name,
    KubeSpanNATStatusController.name,
    AffiliateController.name,
)  # woken on mesh start/stop; after a pass only those whose source moved


_UNSEEN = object()


def _same(a: Any, b: Any) -> bool:
    """Element-wise identity for tuples (of snapshots), plain identity otherwise."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
    return a is b


class RateLimitedWake:
    """Wake a controller at most once per ``spacing`` seconds; a wake inside the window is deferred to
    its end (so the last change is always read). For noisy sources such as netlink notifications."""

    def __init__(self, wake: Callable[[], None], spacing: float) -> None:
        self._wake = wake
        self.spacing = spacing
        self._last = -1e9
        self._pending: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        delay = self._last + self.spacing - loop.time()
        if delay <= 0:
            self._fire()
        else:
            self._pending = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._last = asyncio.get_running_loop().time()
        self._wake()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


class AgentError(Exception):
    """The agent cannot start (no usable config, socket in use, ...); the message says why."""


@dataclass
class AgentOptions:
    state_dir: Path
    config_path: Path | None = None
    socket_path: Path | None = None  # default: <state_dir>/machined.sock
    socket_group: str | int | None = None  # group owning the socket (default: machined's)
    socket_mode: int = 0o660
    keep_on_exit: bool = False  # keep the mesh's kernel state and discovery entry on exit
    hostname: str | None = None  # default: AgentConfig nodename, else the system hostname
    serve_api: bool = True
    serve_http: bool = True  # AgentConfig httpStatusAddr

    @property
    def socket(self) -> Path:
        return self.socket_path or (self.state_dir / SOCKET_NAME)


class Agent:
    """One node agent. ``await start()`` … ``await stop()``; or ``await run(stop_event)``."""

    def __init__(
        self,
        opts: AgentOptions,
        *,
        mesh_factory: MeshFactory | None = None,
        spawner: Spawner | None = None,
        clock: Clock | None = None,
        netinfo: NetInfo | None = None,
        timer: Timer | None = None,
        mesh_poll: float = MESH_POLL,
    ) -> None:
        self.opts = opts
        self.state_dir = Path(opts.state_dir)
        self.store = ConfigStore(self.state_dir)
        self.config = ConfigManager(self.store, timer=timer)
        self.state = State()
        register_all(self.state, DEFINITIONS)
        self.runtime = Runtime(self.state)
        self.meshhost = MeshHost(mesh_factory, hostname=opts.hostname or socket.gethostname())
        self.netinfo: NetInfo = netinfo or NetlinkInfo()
        self._spawner = spawner
        self._clock = clock
        self._mesh_poll = mesh_poll
        self.supervisor: Supervisor | None = None
        self.events = MachineEvents()
        self.log_rings: dict[str, LogRing] = logcapture.make_rings()
        self.machined_events = EventRing()
        self._machined_seq = itertools.count(1)
        self.stage = "booting"
        self.started_at = time.time()
        self._changes: asyncio.Queue[ConfigEvent] = asyncio.Queue()
        self._change_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._unsubscribe: list[Callable[[], None]] = []
        self._log_handler: logcapture.RingHandler | None = None
        self._api: Any = None
        self._http: Any = None
        self._applying = asyncio.Event()
        self._applying.set()
        self._stopped = False
        self._mesh_ready: bool | None = None
        self._mesh_seen: dict[str, Any] = {}
        self._net_wake: RateLimitedWake | None = None

    # -- identity ------------------------------------------------------------------------------

    @property
    def hostname(self) -> str:
        """The node's name in replies (``metadata.hostname``) and in the mesh: AgentConfig
        ``nodename``, else ``--hostname``/the system hostname."""
        cfg = self.config.running
        if cfg is not None and cfg.agent.nodename:
            return cfg.agent.nodename
        return self.opts.hostname or socket.gethostname()

    def log_ring(self, id: str) -> LogRing | None:
        """The log ring of ``id``: ``machined``, ``controller-runtime`` or a service name."""
        if id in self.log_rings:
            return self.log_rings[id]
        if self.supervisor is not None and id in self.supervisor.names():
            return self.supervisor.logs(id)
        return None

    def mesh_settings(self, cfg: MachineConfig) -> MeshSettings:
        """The config's mesh settings with the agent's state directory (key and node id live there)."""
        return dataclasses.replace(cfg.mesh(), state_dir=self.state_dir)

    def _mesh_failed(self) -> str:
        retrying = ", retrying" if self.meshhost.retrying else ""
        return f"Mesh failed to start{retrying}: {self.meshhost.last_error}"

    def machined_event(self, message: str, state: ServiceState = ServiceState.RUNNING) -> None:
        """An event of the ``machined`` pseudo-service (config and mesh changes), also a machine event."""
        ev = ServiceEvent(next(self._machined_seq), MACHINED_SERVICE, state, message, time.time())
        self.machined_events.append(ev)
        from machined.api.convert import service_state_event

        self.events.publish(service_state_event(ev))

    # -- start -----------------------------------------------------------------------------------

    def _load_initial(self) -> MachineConfig | None:
        path = self.opts.config_path
        if path is None:
            return None
        try:
            text = path.read_bytes()
        except OSError as e:
            if self.store.active_path.exists():
                log_event(
                    log, "config file unreadable; using the persisted config", logging.WARNING, error=str(e)
                )
                return None
            raise AgentError(f"cannot read the config file {path}: {e.strerror or e}") from None
        try:
            return MachineConfig.parse(text)
        except ConfigValidationError as e:
            if self.store.active_path.exists():
                log_event(
                    log,
                    "config file does not validate; using the persisted config",
                    logging.WARNING,
                    path=str(path),
                    error=str(e),
                )
                from spanapi.talos.machine import machine_pb2

                self.events.publish(machine_pb2.ConfigLoadErrorEvent(error=f"{path}: {e}"))
                return None
            raise AgentError(f"config {path}: {e}") from None

    async def start(self) -> None:
        self._log_handler = logcapture.install(self.log_rings)
        log_event(log, "machined starting", state_dir=str(self.state_dir), pid=os.getpid())
        self.machined_event("Starting machined", ServiceState.STARTING)
        if self.opts.serve_api:  # refuse a --socket path holding something else before anything starts
            from machined.api.server import check_socket_path

            try:
                check_socket_path(self.opts.socket)
            except ValueError as e:
                raise AgentError(f"machine API socket: {e}") from None
        # the config file and the persisted configs hold the cluster secret
        secrets = (self.opts.config_path, self.store.active_path, self.store.staged_path)
        warn_permissions(log, secrets, self.state_dir)

        # 1. config
        initial = self._load_initial()
        try:
            cfg = self.config.boot(initial)
        except ConfigValidationError as e:
            raise AgentError(
                f"the persisted config {self.store.active_path} does not validate: {e}"
            ) from None
        for note in self.config.boot_notes:
            log_event(log, "config store", note=note)
        if cfg is None:
            raise AgentError(
                "no config: pass --config FILE (nothing is persisted in the state directory yet)"
            )
        if initial is not None and initial != cfg:
            log_event(
                log,
                "the persisted config differs from the config file and wins; apply changes with "
                "ApplyConfiguration",
                logging.WARNING,
                path=str(self.opts.config_path),
            )
        for w in cfg.warnings:
            log_event(log, "config warning", logging.WARNING, warning=str(w))
        self.meshhost.hostname = self.hostname

        # 2. the mesh, first
        self._unsubscribe.append(self.meshhost.subscribe(self._on_mesh))
        settings = self.mesh_settings(cfg)
        if settings.enabled:
            ok = await self.meshhost.start(settings)
            self.machined_event(
                "Mesh started" if ok else self._mesh_failed(),
                ServiceState.RUNNING if ok else ServiceState.WAITING,
            )
        else:
            await self.meshhost.start(settings)
            self.machined_event("KubeSpan disabled: no mesh")

        # 3. resources
        self._register_controllers(cfg)
        await self.runtime.start()
        self._tasks.append(asyncio.create_task(self._watch_machine_status(), name="machine-status-events"))
        watch = getattr(self.netinfo, "watch", None)
        if watch is not None:
            self._net_wake = RateLimitedWake(
                lambda: self._wake(NetworkStatusController.name), NETLINK_SPACING
            )
            self._tasks.append(asyncio.create_task(watch(self._net_wake), name="netlink-watch"))

        # 4. services, gated on the mesh
        self.supervisor = Supervisor(
            [s.to_service() for s in cfg.services()],
            spawner=self._spawner,
            clock=self._clock,
            mesh=poll_mesh(self.meshhost.health, self._mesh_poll),
        )
        self._unsubscribe.append(self.supervisor.add_listener(self._on_service_event))
        await self.supervisor.__aenter__()
        await self.supervisor.start_all()
        self.runtime.wake(ServiceController.name)

        # config changes from now on
        self._unsubscribe.append(self.config.subscribe(self._changes.put_nowait))
        self._change_task = asyncio.create_task(self._apply_changes(), name="config-changes")

        # 5. API and HTTP
        if self.opts.serve_api:
            from machined.api.server import serve

            try:
                self._api = await serve(
                    self, self.opts.socket, mode=self.opts.socket_mode, group=self.opts.socket_group
                )
            except (OSError, RuntimeError, ValueError) as e:
                raise AgentError(f"machine API socket {self.opts.socket}: {e}") from None
        if self.opts.serve_http and cfg.agent.http_status_addr is not None:
            await self._start_http(cfg.agent.http_status_addr)

        self.stage = "running"
        self.runtime.wake(MachineStatusController.name)
        self.machined_event("machined is running")
        log_event(log, "machined running", socket=str(self.opts.socket) if self.opts.serve_api else None)

    def _node_id(self) -> str:
        """The node id in the state directory (created on first use; the mesh reads the same file)."""
        from kubespan.engine import load_node_id

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return load_node_id(self.state_dir)

    def _register_controllers(self, cfg: MachineConfig) -> None:
        def machine_type() -> str:
            running = self.config.running
            return running.v1alpha1.machine_type if running is not None else ""

        for c in (
            MachineConfigController(lambda: self.config.running),
            KubeSpanConfigController(),
            KubeSpanIdentityController(self.meshhost),
            KubeSpanPeerSpecController(self.meshhost),
            KubeSpanPeerStatusController(self.meshhost),
            KubeSpanNATStatusController(self.meshhost),
            KubeSpanEndpointController(),
            NodeIdentityController(self._node_id),
            AffiliateController(self.meshhost, machine_type),
            MemberController(),
            NetworkStatusController(self.netinfo),
            NodeAddressController(),
            ServiceController(lambda: self.supervisor),
            MachineStatusController(lambda: self.stage),
        ):
            self.runtime.register(c)

    async def _start_http(self, addr: tuple[str, int]) -> None:
        from prometheus_client import CollectorRegistry

        from kubespan.metrics import DiscoveryCollector, MeshCollector

        from .http import StatusServer

        registry = CollectorRegistry()
        MeshCollector(self.meshhost.status, registry)
        DiscoveryCollector(lambda: self.meshhost.discovery, registry)
        server = StatusServer(
            self.meshhost.status, lambda: self.stage == "running" and self.meshhost.running, registry
        )
        try:
            await server.start(*addr)
        except OSError as e:
            log_event(
                log, "status endpoint not served", logging.WARNING, addr=f"{addr[0]}:{addr[1]}", error=str(e)
            )
            return
        self._http = server

    # -- reacting --------------------------------------------------------------------------------

    def _wake(self, *names: str) -> None:
        if not self.runtime.running:
            return
        for n in names:
            with contextlib.suppress(KeyError):
                self.runtime.wake(n)

    def _on_mesh(self, reason: str) -> None:
        if reason != "pass":
            self._wake(*_MESH_CONTROLLERS, NetworkStatusController.name)
            self._mesh_ready = None
            self._mesh_seen = {}
            return
        # after an engine pass, wake only the controllers whose part of the snapshot moved (identity)
        snap = self.meshhost.snapshot()
        seen = {
            KubeSpanPeerSpecController.name: snap.specs if snap is not None else None,
            KubeSpanPeerStatusController.name: self.meshhost.peers(),
            KubeSpanNATStatusController.name: snap.nat if snap is not None else None,
            AffiliateController.name: ((snap.published_local, snap.remotes) if snap is not None else None),
        }
        for name, value in seen.items():
            old = self._mesh_seen.get(name, _UNSEEN)
            if old is _UNSEEN or not _same(old, value):
                self._wake(name)
        self._mesh_seen = seen
        health = self.meshhost.health()
        ready = health is not None and health.ready and health.up >= health.peers
        if ready != self._mesh_ready:
            if self._mesh_ready is not None or ready:
                desc = health.describe() if health is not None else "mesh unknown"
                self.machined_event(f"Mesh {'ready' if ready else 'degraded'}: {desc}")
            self._mesh_ready = ready

    def _on_service_event(self, ev: ServiceEvent) -> None:
        from machined.api.convert import service_state_event

        health = None
        if self.supervisor is not None and ev.kind is EventKind.HEALTH:
            with contextlib.suppress(KeyError):
                health = self.supervisor.status(ev.service).health
        self.events.publish(service_state_event(ev, health))
        self._wake(ServiceController.name)

    async def _watch_machine_status(self) -> None:
        from machined.api.convert import machine_status_event

        async with self.state.watch(NS_RUNTIME, MACHINE_STATUS, MACHINE_STATUS_ID) as w:
            async for ev in w:
                if ev.type in (EventType.CREATED, EventType.UPDATED) and ev.resource is not None:
                    self.events.publish(machine_status_event(ev.resource.spec))

    async def _apply_changes(self) -> None:
        while True:
            event = await self._changes.get()
            self._applying.clear()
            try:
                await self.apply_effects(event)
            except Exception as e:
                log.exception("applying a config change failed")
                self.machined_event(f"Config change ({event.reason}) failed: {type(e).__name__}: {e}")
            finally:
                if self._changes.empty():
                    self._applying.set()

    async def settled(self) -> None:
        """Wait until every config change received so far has been applied."""
        await asyncio.sleep(0)
        await self._applying.wait()

    async def apply_effects(self, event: ConfigEvent) -> None:
        """Make the running agent match ``event.current`` (see the module docstring)."""
        eff: ChangeEffects = event.effects
        new, old = event.current, event.previous
        self._wake(MachineConfigController.name)
        self.machined_event(f"Config {event.reason}: {eff.describe()}")
        log_event(log, "config change", reason=event.reason, effects=eff.describe())
        if eff.mesh_restart:
            ok = await self.meshhost.reconfigure(self.mesh_settings(new), cleanup=eff.mesh_cleanup)
            self.machined_event("Mesh restarted" if ok else self._mesh_failed())
        sup = self.supervisor
        if sup is None:
            return
        if eff.services_removed:
            removed = set(eff.services_removed)
            order = [s.name for s in (old.services() if old is not None else ()) if s.name in removed]
            for name in reversed(order or list(removed)):
                with contextlib.suppress(KeyError):
                    await sup.stop(name)
            for name in reversed(order or list(removed)):
                with contextlib.suppress(KeyError):
                    sup.remove(name)
        added = [s for s in new.services() if s.name in set(eff.services_added)]
        if added:
            sup.add(*(s.to_service() for s in added))
        for s in new.services():
            if s.name in eff.services_changed:
                await sup.stop(s.name, dependents=False)
                sup.replace(s.to_service())
        touched = set(eff.services_added) | set(eff.services_changed)
        for s in new.services():  # dependencies first
            if s.name in touched:
                await sup.start(s.name)
        self._wake(ServiceController.name)

    # -- stop ------------------------------------------------------------------------------------

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stage = "shuttingDown"
        self._wake(MachineStatusController.name)
        log_event(log, "machined stopping", keep=self.opts.keep_on_exit)
        self.machined_event("Stopping machined", ServiceState.STOPPING)
        for unsub in self._unsubscribe:
            unsub()
        self._unsubscribe.clear()
        if self._change_task is not None:
            self._change_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._change_task
        self.config.close()
        if self.supervisor is not None:
            await self.supervisor.close()
        await self.meshhost.close(cleanup=not self.opts.keep_on_exit)
        await self.runtime.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._net_wake is not None:
            self._net_wake.cancel()
        self.events.close()
        if self._http is not None:
            await self._http.close()
        if self._api is not None:
            await self._api.stop(grace=0.5)
        with contextlib.suppress(Exception):
            await self.netinfo.close()
        for ring in self.log_rings.values():
            ring.close()
        log_event(log, "machined stopped")
        if self._log_handler is not None:
            logcapture.uninstall(self._log_handler)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()
