"""The mesh inside machined: built from the config's :class:`MeshSettings`, started first, rebuilt when
the config changes, observed by the controllers.

:class:`MeshHost` owns at most one running :class:`kubespan.wiring.MeshRunner`. It reads only the
engine's published :class:`~kubespan.snapshot.MeshSnapshot` (the controllers too), and calls its
listeners after every engine pass. A start that fails (no wireguard-go, a netlink
error, ...) is retried with backoff in the background until it succeeds or the settings change: the
agent keeps serving its API meanwhile, and services that need the mesh keep waiting. An invalid
setting (:class:`~kubespan.constants.ConfigError`) fails at once: retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from kubespan.constants import ConfigError
from kubespan.engine import Mesh
from kubespan.snapshot import MeshSnapshot, MeshStatus, PeerStatus
from kubespan.wiring import MeshDeps, MeshRunner, build_mesh
from machined.config import MeshSettings
from machined.services.mesh import MeshHealth
from spanutil.logs import log_event

log = logging.getLogger("machined.mesh")

MeshFactory = Callable[[MeshSettings, str], Awaitable[MeshRunner]]
Listener = Callable[[str], None]  # reason: "pass", "started", "stopped"

RETRY_INITIAL = 1.0
RETRY_MAX = 30.0


def real_factory(deps: MeshDeps | None = None) -> MeshFactory:
    """Build the engine with the real adapters (``deps`` replaces any of them)."""

    async def build(settings: MeshSettings, hostname: str) -> MeshRunner:
        return await build_mesh(
            settings.options(hostname),
            discovery_urls=settings.discovery_urls,
            discovery_ca=settings.discovery_ca,
            backend=settings.backend,
            wireguard_go=settings.wireguard_go,
            socket_dir=settings.socket_dir,
            deps=deps,
        )

    return build


class MeshHost:
    def __init__(self, factory: MeshFactory | None = None, *, hostname: str | None = None) -> None:
        self.factory = factory or real_factory()
        self.hostname = hostname or socket.gethostname()
        self.settings: MeshSettings | None = None
        self.runner: MeshRunner | None = None
        self.generation = 0  # bumped on every (re)start and stop
        self.last_error: str | None = None
        self._listeners: list[Listener] = []
        self._retry: asyncio.Task[None] | None = None
        self._invalid = False  # the last start failed on an invalid setting: not retried
        self._lock = asyncio.Lock()

    # -- observation ---------------------------------------------------------------------------

    @property
    def mesh(self) -> Mesh | None:
        return self.runner.mesh if self.runner is not None else None

    @property
    def discovery(self) -> Any:
        return self.runner.discovery if self.runner is not None else None

    @property
    def running(self) -> bool:
        return self.runner is not None

    def snapshot(self) -> MeshSnapshot | None:
        """What the running engine published last (None without a started engine)."""
        mesh = self.mesh
        return mesh.snapshot if mesh is not None else None

    def peers(self) -> tuple[PeerStatus, ...] | None:
        """The peers after the engine's last pass (None before the first pass or without a mesh)."""
        snap = self.snapshot()
        return snap.peers if snap is not None and snap.at is not None else None

    def status(self) -> MeshStatus | None:
        """The engine's full status, from its snapshot (None while there is no running engine)."""
        snap = self.snapshot()
        return snap.status() if snap is not None else None

    def health(self) -> MeshHealth | None:
        """What the supervisor's mesh condition sees. ``ready`` means the engine runs (identity loaded,
        first pass done); whether the peers are up is counted separately (``up``/``peers``)."""
        snap = self.snapshot()
        if snap is None or snap.at is None:
            return None
        peers = snap.peers
        up = sum(1 for p in peers if p.state == "up")
        down = tuple(p.label for p in peers if p.state != "up")
        return MeshHealth(ready=snap.configured, peers=len(peers), up=up, down=down)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self, reason: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(reason)
            except Exception:
                log.exception("mesh listener failed")

    def _on_pass(self, mesh: Mesh) -> None:
        if self.mesh is mesh:
            self._notify("pass")

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, settings: MeshSettings) -> bool:
        """Start the mesh for ``settings`` (nothing when disabled). True when it runs (or is disabled);
        False when the first attempt failed: it is then retried in the background, unless a setting
        is invalid."""
        async with self._lock:
            self._cancel_retry()
            self.settings = settings
            if not settings.enabled:
                return True
            if await self._try_start(settings):
                return True
            if not self._invalid:
                self._retry = asyncio.create_task(self._retry_loop(settings), name="mesh-retry")
            return False

    @property
    def retrying(self) -> bool:
        """Whether a failed start is being retried in the background."""
        return self._retry is not None and not self._retry.done()

    async def stop(self, *, cleanup: bool = True) -> None:
        async with self._lock:
            self._cancel_retry()
            await self._stop_runner(cleanup)

    async def reconfigure(self, settings: MeshSettings, *, cleanup: bool) -> bool:
        """Stop the running mesh (``cleanup``: leave the cluster and remove the kernel objects, needed
        when they are renamed or the cluster changes) and start it with ``settings``."""
        async with self._lock:
            self._cancel_retry()
            await self._stop_runner(cleanup)
        return await self.start(settings)

    async def _stop_runner(self, cleanup: bool) -> None:
        runner, self.runner = self.runner, None
        if runner is None:
            return
        runner.mesh.on_pass = None
        self.generation += 1
        try:
            await runner.stop(cleanup=cleanup)
        except Exception as e:
            log_event(log, "mesh stop failed", logging.ERROR, error=str(e))
        log_event(log, "mesh stopped", cleanup=cleanup)
        self._notify("stopped")

    async def _try_start(self, settings: MeshSettings) -> bool:
        try:
            runner = await self.factory(settings, self.hostname)
            runner.mesh.on_pass = self._on_pass
            await runner.start()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            self._invalid = isinstance(e, ConfigError)
            log_event(
                log, "mesh failed to start", logging.ERROR, error=self.last_error, retry=not self._invalid
            )
            return False
        self.runner = runner
        self.last_error = None
        self._invalid = False
        self.generation += 1
        snap = runner.mesh.snapshot
        log_event(
            log,
            "mesh started",
            mesh_address=str(snap.identity.address.ip) if snap is not None else None,
            backend=snap.backend if snap is not None else "?",
            steering=snap.steering if snap is not None else "?",
            discovery=list(settings.discovery_urls),
        )
        self._notify("started")
        return True

    async def _retry_loop(self, settings: MeshSettings) -> None:
        delay = RETRY_INITIAL
        while True:
            await asyncio.sleep(delay)
            async with self._lock:
                if self.settings is not settings or self.runner is not None:
                    return
                if await self._try_start(settings) or self._invalid:
                    return
            delay = min(RETRY_MAX, delay * 2)

    def _cancel_retry(self) -> None:
        if self._retry is not None and not self._retry.done() and self._retry is not asyncio.current_task():
            self._retry.cancel()
        self._retry = None

    async def close(self, *, cleanup: bool = True) -> None:
        retry = self._retry
        await self.stop(cleanup=cleanup)
        if retry is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await retry
