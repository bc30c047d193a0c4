"""The service supervisor: runs each service's state machine as an asyncio task.

One run loop per started service::

    Initialized ─start→ Starting ─┬→ Skipped                       (disabled)
                                  └→ Waiting ⇄ (deps/mesh change)  (message: what it waits for)
    Waiting ─conditions hold→ Preparing ─┬→ Running                (process spawned)
                                         └→ Failed                 (could not spawn)
    Running ─exit 0→ Finished   ─exit≠0/signal→ Failed
    Running ─stop / mesh policy→ Stopping ─→ Finished (stop) | Waiting or Preparing (mesh policy)
    Finished|Failed ─restart policy→ Waiting ("Restarting in Ns") → (conditions) → Preparing → …
    Starting|Waiting|Preparing ─stop→ Finished

``up`` (what dependents wait for): Skipped, or Running and (no health check, or healthy) — as Talos.
Conditions are only checked before each start; losing them later produces notices
(``dependency-down``/``mesh-degraded`` events) and, for the mesh, the service's ``on_mesh_degraded``
policy.  ``stop(name)`` stops the service's running reverse dependencies first, as Talos does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from spanutil.logs import log_event

from .health import HealthStatus, probe
from .logs import LogRing
from .mesh import MeshHealth, mesh_condition
from .process import Clock, Command, Process, Spawner, SpawnError, SystemClock, SystemSpawner, describe_exit
from .spec import MeshMode, OnMeshDegraded, RestartPolicy, Service, ServiceConfigError
from .states import EVENT_RING_SIZE, EventBus, EventKind, EventRing, ServiceEvent, ServiceState, Subscription

log = logging.getLogger("machined.services")

S = ServiceState
KILL_GRACE = 10.0  # real seconds to wait for a SIGKILLed process to be reaped before giving up on it
DRAIN_GRACE = 1.0  # real seconds to let output pumps reach EOF after the process exited

MeshHook = Callable[[str, bool, MeshHealth | None], Awaitable[None] | None]
"""``hook(service, degraded, mesh)``: called when a running service's mesh condition flips."""


class UnknownService(KeyError):
    def __str__(self) -> str:
        return f"unknown service {self.args[0]!r}"


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    name: str
    state: ServiceState
    message: str  # the last event's message
    up: bool  # what dependents wait for
    health: HealthStatus
    has_health_check: bool
    pid: int | None
    restarts: int  # restarts by policy since the last start()
    last_exit: int | None  # the last exit code (negative: signal)
    events: tuple[ServiceEvent, ...]


# outcomes of one run of the process
_STOPPED = "stopped"
_MESH_STOP = "mesh-stop"
_MESH_RESTART = "mesh-restart"


class _Runner:
    def __init__(self, sup: Supervisor, svc: Service, ring_size: int) -> None:
        self.sup = sup
        self.svc = svc
        self.state = S.INITIALIZED
        self.message = ""
        self.events = EventRing(ring_size)
        self.logs = LogRing(svc.log_lines, path=svc.log_file, clock=sup.clock)
        self.health = HealthStatus()
        self.proc: Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_requested = asyncio.Event()
        self.restarts = 0
        self.last_exit: int | None = None
        self._action: str | None = None
        self._action_set = asyncio.Event()
        self._mesh_ok = True
        self._restart_on_recovery = False
        self._deps_up: dict[str, bool] = {}

    # -- observable state --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def up(self) -> bool:
        if self.state is S.SKIPPED:
            return True
        return self.state is S.RUNNING and (self.svc.health is None or self.health.healthy)

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            name=self.svc.name,
            state=self.state,
            message=self.message,
            up=self.up,
            health=self.health,
            has_health_check=self.svc.health is not None,
            pid=self.proc.pid if self.proc is not None and self.proc.returncode is None else None,
            restarts=self.restarts,
            last_exit=self.last_exit,
            events=self.events.tail(),
        )

    def _emit(self, kind: EventKind, message: str) -> None:
        self.message = message if kind is EventKind.STATE else self.message
        ev = ServiceEvent(
            self.sup._next_seq(), self.svc.name, self.state, message, self.sup.clock.time(), kind
        )
        self.events.append(ev)
        log_event(
            log,
            "service event",
            service=self.svc.name,
            state=str(self.state),
            kind=str(kind),
            message=message,
        )
        self.sup._bus.publish(ev)

    def _set(self, state: ServiceState, message: str) -> None:
        self.state = state
        self._emit(EventKind.STATE, message)
        self.sup._changed_state()

    # -- the run loop --------------------------------------------------------------------------------

    def begin(self) -> None:
        self.stop_requested = asyncio.Event()
        self.restarts = 0
        self._action = None
        self._action_set = asyncio.Event()
        self.task = asyncio.create_task(self._main(), name=f"service:{self.svc.name}")

    async def _main(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            self._kill_now()
            if self.state.active:
                self._set(S.FINISHED, "Service aborted")
            raise
        except Exception as e:  # a bug here must not take machined down; say so loudly
            log.exception("service run loop crashed", extra={"_fields": {"service": self.svc.name}})
            self._kill_now()
            self._set(S.FAILED, f"Supervisor error: {type(e).__name__}: {e}")

    def _kill_now(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.signal_group(signal.SIGKILL)

    async def _run(self) -> None:
        svc, clock = self.svc, self.sup.clock
        self._set(S.STARTING, "Starting service")
        if not svc.enabled:
            self._set(S.SKIPPED, "Service is disabled")
            return
        streak = 0
        while True:
            if not await self._wait_conditions():
                self._set(S.FINISHED, "Service stopped")
                return
            self._set(S.PREPARING, "Running pre state")
            started = clock.monotonic()
            outcome = await self._run_once()
            if outcome == _STOPPED:
                self._set(S.FINISHED, "Service stopped")
                return
            if outcome in (_MESH_STOP, _MESH_RESTART):
                continue  # not a failure: no back-off; the loop waits for the mesh if it must
            code, message = outcome
            failed = code != 0
            self._set(S.FAILED if failed else S.FINISHED, message)
            if svc.restart is RestartPolicy.NEVER or (svc.restart is RestartPolicy.ON_FAILURE and not failed):
                return
            streak = 1 if clock.monotonic() - started >= svc.backoff.reset_after else streak + 1
            delay = svc.backoff.delay(streak)
            self._set(S.WAITING, f"Restarting in {delay:g}s (restart {self.restarts + 1})")
            if not await self._race_stop(clock.sleep(delay)):
                self._set(S.FINISHED, "Service stopped")
                return
            self.restarts += 1

    async def _race_stop(self, aw: Awaitable[Any]) -> bool:
        """Await ``aw`` unless a stop is requested first; True when ``aw`` finished."""
        if self.stop_requested.is_set():
            if asyncio.iscoroutine(aw):
                aw.close()
            return False
        work = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait((work, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, stop):
                t.cancel()
        return work.done() and not work.cancelled() and not self.stop_requested.is_set()

    async def _wait_conditions(self) -> bool:
        while not self.stop_requested.is_set():
            changed = self.sup._changed
            ok, why = self.sup._conditions(self.svc)
            if ok:
                return True
            if self.state is not S.WAITING or self.message != why:
                self._set(S.WAITING, why)
                continue  # our own event may have changed the world; re-evaluate
            if not await self._race_stop(changed.wait()):
                return False
        return False

    async def _run_once(self) -> str | tuple[int, str]:
        svc = self.svc
        cmd = Command(svc.argv, svc.env, svc.cwd, svc.user)
        try:
            proc = await self.sup.spawner.spawn(cmd)
        except SpawnError as e:
            self.last_exit = None
            return -1, f"Failed to start: {e}"
        except Exception as e:
            self.last_exit = None
            return -1, f"Failed to start: {type(e).__name__}: {e}"
        self.proc = proc
        self.health = HealthStatus()
        pumps = [
            asyncio.create_task(self.logs.pump(s, n))
            for s, n in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
            if s is not None
        ]
        waiter = asyncio.ensure_future(proc.wait())
        health_task: asyncio.Task[None] | None = None
        self._mesh_ok = mesh_condition(svc.requires_mesh, self.sup.mesh)[0]
        self._restart_on_recovery = False
        self._deps_up = {d: True for d in svc.depends_on}
        try:
            self._set(S.RUNNING, f"Process {svc.argv[0]} started with PID {proc.pid}")
            if svc.health is not None:
                health_task = asyncio.create_task(self._health_loop(proc, cmd))
            while True:
                if self._action is not None and not waiter.done():
                    action, self._action = self._action, None
                    self._action_set.clear()
                    reason = "Mesh degraded" if action == "stop" else "Mesh recovered, restarting"
                    await self._terminate(proc, waiter, reason)
                    return _MESH_STOP if action == "stop" else _MESH_RESTART
                if self.stop_requested.is_set() and not waiter.done():
                    await self._terminate(proc, waiter, "Stop requested")
                    return _STOPPED
                if waiter.done():
                    code = waiter.result()
                    self.last_exit = code
                    return code, f"Process {describe_exit(code)}" if code else "Service finished successfully"
                act = asyncio.ensure_future(self._action_set.wait())
                stop = asyncio.ensure_future(self.stop_requested.wait())
                try:
                    await asyncio.wait((waiter, act, stop), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    act.cancel()
                    stop.cancel()
        finally:
            if health_task is not None:
                health_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await health_task
            # after a normal exit this reaches the group's stragglers (like systemd's
            # KillMode=control-group); on cancellation or a supervisor bug it kills the process itself
            proc.signal_group(signal.SIGKILL)
            if not waiter.done():
                waiter.cancel()
            if pumps:
                _, pending = await asyncio.wait(pumps, timeout=DRAIN_GRACE)
                for p in pending:  # someone outside the group holds the pipes open
                    p.cancel()
            if proc.returncode is not None:
                proc.close()
            self.proc = None
            self.health = HealthStatus()

    async def _terminate(self, proc: Process, waiter: asyncio.Future[int], reason: str) -> None:
        svc, clock = self.svc, self.sup.clock
        self._set(S.STOPPING, f"{reason}: sending SIGTERM to process group {proc.pid}")
        proc.signal_group(signal.SIGTERM)
        timer = asyncio.ensure_future(clock.sleep(svc.stop_timeout))
        try:
            await asyncio.wait((waiter, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if not waiter.done():
            self._emit(EventKind.STATE, f"Process did not exit within {svc.stop_timeout:g}s: sending SIGKILL")
            proc.signal_group(signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), KILL_GRACE)
            except TimeoutError:
                log_event(log, "process survived SIGKILL", logging.ERROR, service=svc.name, pid=proc.pid)
        if waiter.done():
            self.last_exit = waiter.result()

    async def _health_loop(self, proc: Process, cmd: Command) -> None:
        check, clock = self.svc.health, self.sup.clock
        assert check is not None
        await clock.sleep(check.initial_delay)
        while proc.returncode is None:
            ok, msg = await probe(check, spawner=self.sup.spawner, base=cmd)
            if proc.returncode is not None or self.state is not S.RUNNING:
                return
            self._set_health(ok, msg)
            await clock.sleep(check.interval)

    def _set_health(self, ok: bool, msg: str) -> None:
        prev = self.health
        changed = prev.unknown or prev.healthy != ok
        self.health = HealthStatus(
            unknown=False,
            healthy=ok,
            last_message=msg,
            last_change=self.sup.clock.time() if changed else prev.last_change,
        )
        if changed:
            self._emit(EventKind.HEALTH, "Health check successful" if ok else f"Health check failed: {msg}")
            self.sup._changed_state()

    # -- reacting to the world while running -----------------------------------------------------

    def reassess(self) -> None:
        if self.state is not S.RUNNING:
            return
        svc = self.svc
        if svc.requires_mesh.mode is not MeshMode.NONE:
            ok, why = mesh_condition(svc.requires_mesh, self.sup.mesh)
            if ok != self._mesh_ok:
                self._mesh_ok = ok
                policy = svc.on_mesh_degraded
                if not ok:
                    then = {
                        OnMeshDegraded.IGNORE: "still running",
                        OnMeshDegraded.STOP: "stopping until it recovers",
                        OnMeshDegraded.RESTART: "will restart when it recovers",
                    }[policy]
                    self._emit(EventKind.MESH_DEGRADED, f"Mesh degraded: {why}; {then}")
                    if policy is OnMeshDegraded.STOP:
                        self._request("stop")
                    elif policy is OnMeshDegraded.RESTART:
                        self._restart_on_recovery = True
                else:
                    self._emit(EventKind.MESH_RECOVERED, f"Mesh recovered: {why}")
                    if policy is OnMeshDegraded.RESTART and self._restart_on_recovery:
                        self._restart_on_recovery = False
                        self._request("restart")
                self.sup._call_hook(svc.name, not ok)
        for dep in svc.depends_on:
            r = self.sup._runners.get(dep)
            up = r is not None and r.up
            if up != self._deps_up.get(dep, True):
                self._deps_up[dep] = up
                if up:
                    self._emit(EventKind.DEPENDENCY_UP, f'Dependency "{dep}" is up again')
                else:
                    state = str(r.state) if r is not None else "removed"
                    self._emit(EventKind.DEPENDENCY_DOWN, f'Dependency "{dep}" is down ({state})')

    def _request(self, action: str) -> None:
        self._action = action
        self._action_set.set()


class Supervisor:
    """Supervises :class:`Service` s.  Use as ``async with Supervisor(...) as sup:`` (leaving stops all).

    ``mesh`` is an async iterable of :class:`MeshHealth` (None = unknown) consumed while the supervisor
    is open (for example ``poll_mesh(engine.status)``); :meth:`set_mesh` pushes a value directly.
    ``mesh_hook(service, degraded, mesh)`` is called when a running service's mesh condition flips.
    """

    def __init__(
        self,
        services: Iterable[Service] = (),
        *,
        spawner: Spawner | None = None,
        clock: Clock | None = None,
        mesh: AsyncIterable[MeshHealth | None] | None = None,
        mesh_hook: MeshHook | None = None,
        event_ring_size: int = EVENT_RING_SIZE,
    ) -> None:
        self.spawner: Spawner = spawner or SystemSpawner()
        self.clock: Clock = clock or SystemClock()
        self._mesh_source = mesh
        self._mesh_task: asyncio.Task[None] | None = None
        self._mesh: MeshHealth | None = None
        self.mesh_hook = mesh_hook
        self._ring_size = event_ring_size
        self._runners: dict[str, _Runner] = {}
        self._bus = EventBus()
        self._seq = 0
        self._changed = asyncio.Event()
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.add(*services)

    # -- definitions -----------------------------------------------------------------------------

    def add(self, *services: Service) -> None:
        """Add definitions; all-or-nothing. Names must be new; dependencies must exist (among the
        existing and the new ones) and form no cycle."""
        names = dict(self._runners.items())
        new: dict[str, Service] = {}
        for svc in services:
            if svc.name in names or svc.name in new:
                raise ServiceConfigError(
                    f"services[{svc.name}].name", "a service with this name already exists"
                )
            new[svc.name] = svc
        defs = {n: r.svc for n, r in self._runners.items()} | new
        for svc in new.values():
            for d in svc.depends_on:
                if d not in defs:
                    raise ServiceConfigError(f"services[{svc.name}].depends_on", f"unknown service {d!r}")
        cycle = _find_cycle(defs)
        if cycle:
            raise ServiceConfigError(
                f"services[{cycle[0]}].depends_on", "dependency cycle: " + " -> ".join(cycle)
            )
        for svc in new.values():
            self._runners[svc.name] = _Runner(self, svc, self._ring_size)

    def replace(self, svc: Service) -> None:
        """Swap the definition of a service that is not active (a changed config; start it again
        afterwards). Its event history is kept; its log ring too, unless ``log_lines`` or ``log_file``
        changed. Dependencies must exist and form no cycle."""
        r = self._runner(svc.name)
        if r.active:
            raise RuntimeError(f"service {svc.name!r} is {r.state}; stop it before replacing it")
        defs = {n: o.svc for n, o in self._runners.items()} | {svc.name: svc}
        for d in svc.depends_on:
            if d not in defs:
                raise ServiceConfigError(f"services[{svc.name}].depends_on", f"unknown service {d!r}")
        cycle = _find_cycle(defs)
        if cycle:
            raise ServiceConfigError(
                f"services[{cycle[0]}].depends_on", "dependency cycle: " + " -> ".join(cycle)
            )
        old = r.svc
        r.svc = svc
        if (old.log_lines, old.log_file) != (svc.log_lines, svc.log_file):
            r.logs.close()
            r.logs = LogRing(svc.log_lines, path=svc.log_file, clock=self.clock)

    def remove(self, name: str) -> None:
        """Forget a service that is not running and that nothing depends on."""
        r = self._runner(name)
        if r.active:
            raise RuntimeError(f"service {name!r} is {r.state}; stop it before removing it")
        users = [n for n, o in self._runners.items() if name in o.svc.depends_on]
        if users:
            raise RuntimeError(f"service {name!r} is a dependency of {', '.join(users)}")
        r.logs.close()
        del self._runners[name]

    def names(self) -> list[str]:
        return list(self._runners)

    def service(self, name: str) -> Service:
        return self._runner(name).svc

    def _runner(self, name: str) -> _Runner:
        try:
            return self._runners[name]
        except KeyError:
            raise UnknownService(name) from None

    # -- observation -----------------------------------------------------------------------------

    def status(self, name: str) -> ServiceStatus:
        return self._runner(name).status()

    def list(self) -> list[ServiceStatus]:
        return [r.status() for r in self._runners.values()]

    def logs(self, name: str) -> LogRing:
        return self._runner(name).logs

    def add_listener(self, fn: Callable[[ServiceEvent], None]) -> Callable[[], None]:
        """Call ``fn(event)`` synchronously for every event; returns a function that removes it."""
        return self._bus.add_listener(fn)

    def subscribe(self, tail: int | None = 0, *, maxsize: int = 4096) -> Subscription:
        """An async iterator of events: the last ``tail`` events across services (-1/None: all kept),
        then live ones.  Raises ``SubscriptionLagged`` if it falls ``maxsize`` events behind."""
        backlog: list[ServiceEvent] = []
        if tail is None or tail != 0:
            backlog = sorted((ev for r in self._runners.values() for ev in r.events), key=lambda e: e.seq)
            if tail is not None and tail > 0:
                backlog = backlog[-tail:]
        return self._bus.subscribe(backlog, maxsize=maxsize)

    async def wait_state(self, name: str, *states: ServiceState) -> ServiceStatus:
        """Wait until ``name`` is in one of ``states`` (bound it with ``asyncio.timeout``)."""
        r = self._runner(name)
        while r.state not in states:
            await self._changed.wait()
        return r.status()

    async def wait_for(self, predicate: Callable[[Supervisor], bool]) -> None:
        """Wait until ``predicate(self)`` holds; re-evaluated on every state, health or mesh change."""
        while not predicate(self):
            await self._changed.wait()

    # -- the mesh ----------------------------------------------------------------------------------

    @property
    def mesh(self) -> MeshHealth | None:
        return self._mesh

    def set_mesh(self, health: MeshHealth | None) -> None:
        if health == self._mesh:
            return
        self._mesh = health
        self._changed_state()

    async def _follow_mesh(self, source: AsyncIterable[MeshHealth | None]) -> None:
        try:
            async for health in source:
                self.set_mesh(health)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log_event(log, "mesh status feed failed; mesh now unknown", logging.ERROR, error=repr(e))
            self.set_mesh(None)

    def _call_hook(self, name: str, degraded: bool) -> None:
        if self.mesh_hook is None:
            return
        try:
            res = self.mesh_hook(name, degraded, self._mesh)
        except Exception as e:
            log_event(log, "mesh hook failed", logging.ERROR, service=name, error=repr(e))
            return
        if asyncio.iscoroutine(res) or isinstance(res, asyncio.Future):
            task = asyncio.ensure_future(res)
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Task[Any]) -> None:
        self._hook_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log_event(log, "mesh hook failed", logging.ERROR, error=repr(task.exception()))

    # -- internal plumbing -----------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _changed_state(self) -> None:
        for r in list(self._runners.values()):
            r.reassess()
        self._changed.set()
        self._changed = asyncio.Event()

    def _conditions(self, svc: Service) -> tuple[bool, str]:
        waits = []
        for d in svc.depends_on:
            r = self._runners.get(d)
            if r is None or not r.up:
                waits.append(f'service "{d}" to be "up"')
        ok, why = mesh_condition(svc.requires_mesh, self._mesh)
        if not ok:
            waits.append(f"the mesh ({why})")
        return (not waits), ("Waiting for " + " and ".join(waits) if waits else "")

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("supervisor is closed")
        if self._mesh_source is not None and self._mesh_task is None:
            self._mesh_task = asyncio.create_task(self._follow_mesh(self._mesh_source), name="services:mesh")

    # -- control ---------------------------------------------------------------------------------

    async def start(self, name: str) -> None:
        """Start the service's run loop (returns at once; the service may wait for its conditions).
        No-op if it is already active; waits for a stop in progress to finish first."""
        self._ensure_open()
        r = self._runner(name)
        if r.active:
            if not r.stop_requested.is_set():
                return
            await asyncio.shield(r.task)  # type: ignore[arg-type]
        r.begin()

    async def stop(self, name: str, *, dependents: bool = True) -> None:
        """Stop the service (SIGTERM, SIGKILL after its stop_timeout) and wait until it is stopped.
        With ``dependents``, its active reverse dependencies are stopped first (as Talos)."""
        self._runner(name)
        names = (self._reverse_closure(name) if dependents else set()) | {name}
        await self._stop_set(names)

    async def restart(self, name: str) -> None:
        """Stop (this service only; its dependents get a dependency-down notice) and start again."""
        await self.stop(name, dependents=False)
        await self.start(name)

    async def start_all(self) -> None:
        for name in _topo_order({n: r.svc for n, r in self._runners.items()}):
            await self.start(name)

    async def stop_all(self) -> None:
        await self._stop_set(set(self._runners))

    async def close(self) -> None:
        """Stop every service, end the mesh feed, close event subscriptions and log followers."""
        if self._closed:
            return
        try:
            await self.stop_all()
        finally:
            self._closed = True
            if self._mesh_task is not None:
                self._mesh_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._mesh_task
            for t in list(self._hook_tasks):
                t.cancel()
            self._bus.close()
            for r in self._runners.values():
                r.logs.close()

    async def __aenter__(self) -> Supervisor:
        self._ensure_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _reverse_closure(self, name: str) -> set[str]:
        out: set[str] = set()
        todo = [name]
        while todo:
            cur = todo.pop()
            for n, r in self._runners.items():
                if cur in r.svc.depends_on and n not in out:
                    out.add(n)
                    todo.append(n)
        return out

    async def _stop_set(self, names: set[str]) -> None:
        """Stop ``names``, each one only after its dependents within the set have stopped."""
        tasks: dict[str, asyncio.Task[None]] = {}

        async def stop_one(n: str) -> None:
            deps = [tasks[m] for m in names if n in self._runners[m].svc.depends_on]
            if deps:
                await asyncio.gather(*deps, return_exceptions=True)
            r = self._runners[n]
            if r.active and r.task is not None:
                r.stop_requested.set()
                await asyncio.shield(r.task)

        for n in names:
            tasks[n] = asyncio.ensure_future(stop_one(n))
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                log_event(log, "stopping a service failed", logging.ERROR, error=repr(res))


def _find_cycle(defs: dict[str, Service]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for d in defs[n].depends_on:
            if d not in defs:
                continue
            if color.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in color:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in defs:
        if n not in color:
            found = visit(n)
            if found:
                return found
    return None


def _topo_order(defs: dict[str, Service]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        for d in defs[n].depends_on:
            if d in defs:
                visit(d)
        out.append(n)

    for n in defs:
        visit(n)
    return out
