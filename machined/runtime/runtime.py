"""The controller runtime: one task per controller, woken by input changes, isolated from the others.

- **Watches.** One watch per input ``(namespace, type)``, shared by every
  controller that reads it. An event wakes each controller whose input
  covers it (an input with an id only wakes for that id).
- **Coalescing.** The wake-up is a flag (capacity one, as COSI's channel): any
  number of changes before the controller gets to run make one run; changes
  during a run make exactly one more run afterwards.
- **Timers.** ``controller.interval`` makes the controller also run every
  ``interval`` seconds (ticks are not moved by input-triggered runs).
- **Crashes.** An exception from ``reconcile`` is logged with its traceback,
  counted, and the controller is run again after an exponential backoff
  (``Backoff``; reset by a successful run). The other controllers are not
  affected. ``asyncio.CancelledError`` is not caught.
- **Lost watches.** If the runtime's own watch falls behind (ERRORED), it
  watches again and wakes every dependent controller: being level-triggered,
  they re-read their inputs and nothing is lost.
- **Stats.** ``stats()`` gives per-controller runs, failures, the last error
  and timings, ready to publish as a status resource (``ControllerStats.to_data``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from machined.state import EventType, State, Watch

from .context import ControllerContext
from .controller import (
    ControllerLike,
    Input,
    InputKind,
    Output,
    OutputKind,
    RegistrationError,
    WakeReason,
)

log = logging.getLogger("controller-runtime")

Sleep = Callable[[float], Awaitable[Any]]


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th consecutive retry: ``initial * factor**(n-1)``, capped at ``maximum``."""

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        if failures < 1:
            return 0.0
        return min(self.maximum, self.initial * self.factor ** (failures - 1))


@dataclass
class ControllerStats:
    """Counters of one controller. ``runs`` counts every reconcile call, failed or not."""

    name: str
    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_reason: str = ""
    last_run: datetime | None = None
    last_success: datetime | None = None
    last_duration: float = 0.0
    state: str = "starting"  # starting | idle | running | backoff | stopped

    def to_data(self) -> dict[str, Any]:
        """camelCase plain data, for a status resource spec."""
        d = asdict(self)
        return {
            "name": d["name"],
            "runs": d["runs"],
            "failures": d["failures"],
            "consecutiveFailures": d["consecutive_failures"],
            "lastError": d["last_error"],
            "lastReason": d["last_reason"],
            "lastRun": None if self.last_run is None else self.last_run.isoformat(),
            "lastSuccess": None if self.last_success is None else self.last_success.isoformat(),
            "lastDurationSeconds": round(self.last_duration, 6),
            "state": d["state"],
        }


@dataclass(frozen=True)
class Dependency:
    """One edge of the controller graph (for an ``inspect dependencies`` view)."""

    controller: str
    direction: str  # "input" | "output"
    type: str
    namespace: str | None = None
    id: str | None = None
    kind: str = ""


@dataclass
class _Slot:
    controller: ControllerLike
    name: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    interval: float | None
    stats: ControllerStats
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    manual: bool = False
    task: asyncio.Task[None] | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Runtime:
    """Runs registered controllers against a :class:`State`."""

    def __init__(
        self,
        state: State,
        *,
        backoff: Backoff | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], datetime] = _utcnow,
        logger: logging.Logger | None = None,
        watch_queue_size: int = 8192,
    ) -> None:
        self.state = state
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        self._clock = clock
        self._log = logger or log
        self._queue_size = watch_queue_size
        self._slots: dict[str, _Slot] = {}
        self._writers: dict[str, list[tuple[str, OutputKind]]] = {}
        self._deps: dict[tuple[str, str], list[tuple[_Slot, str | None]]] = {}
        self._watches: dict[tuple[str, str], Watch] = {}
        self._pumps: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._running = False

    # ------------------------------------------------------------ registration

    def register(self, controller: ControllerLike) -> None:
        """Add a controller; validates its name and outputs. May be called while running."""
        name = getattr(controller, "name", "")
        if not name or not isinstance(name, str):
            raise RegistrationError(f"controller {controller!r} has no name")
        if name in self._slots:
            raise RegistrationError(f"controller {name!r} is already registered")
        if not callable(getattr(controller, "reconcile", None)):
            raise RegistrationError(f"controller {name!r} has no reconcile(ctx) method")
        inputs = tuple(controller.inputs)
        outputs = tuple(controller.outputs)
        for o in outputs:
            for other, kind in self._writers.get(o.type, ()):
                if o.kind is OutputKind.EXCLUSIVE or kind is OutputKind.EXCLUSIVE:
                    raise RegistrationError(
                        f"controller {name!r}: output {o.type} ({o.kind}) clashes with "
                        f"controller {other!r} ({kind}); an exclusive output has exactly one writer"
                    )
        interval = getattr(controller, "interval", None)
        if interval is not None and interval <= 0:
            raise RegistrationError(f"controller {name!r}: interval must be > 0, got {interval}")
        for o in outputs:
            self._writers.setdefault(o.type, []).append((name, o.kind))
        slot = _Slot(controller, name, inputs, outputs, interval, ControllerStats(name))
        self._slots[name] = slot
        for i in inputs:
            key = (i.namespace, i.type)
            self._deps.setdefault(key, []).append((slot, i.id))
        if self._running:
            self._start_watches()
            self._start_slot(slot)

    def dependencies(self) -> list[Dependency]:
        out = []
        for s in self._slots.values():
            out += [Dependency(s.name, "input", i.type, i.namespace, i.id, str(i.kind)) for i in s.inputs]
            out += [Dependency(s.name, "output", o.type, kind=str(o.kind)) for o in s.outputs]
        return out

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._start_watches()  # before any controller runs: no change can slip between
        for slot in self._slots.values():
            self._start_slot(slot)

    async def stop(self) -> None:
        self._running = False
        tasks = [t for t in self._pumps.values()]
        tasks += [s.task for s in self._slots.values() if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in self._watches.values():
            w.close()
        self._watches.clear()
        self._pumps.clear()
        for s in self._slots.values():
            s.task = None
            s.stats.state = "stopped"

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._running

    def wake(self, name: str) -> None:
        """Run a controller soon (e.g. after an out-of-band change it cannot watch)."""
        slot = self._slots[name]
        slot.manual = True
        slot.wake.set()

    def stats(self) -> dict[str, ControllerStats]:
        """A snapshot of every controller's counters."""
        return {n: replace(s.stats) for n, s in self._slots.items()}

    # ---------------------------------------------------------------- internals

    def _start_watches(self) -> None:
        for key in self._deps:
            if key not in self._watches:
                self._watches[key] = self.state.watch(*key, bootstrap=False, queue_size=self._queue_size)
                self._pumps[key] = asyncio.create_task(
                    self._pump(key), name=f"controller-runtime watch {key}"
                )

    def _start_slot(self, slot: _Slot) -> None:
        slot.task = asyncio.create_task(self._loop(slot), name=f"controller {slot.name}")

    async def _pump(self, key: tuple[str, str]) -> None:
        while self._running:
            w = self._watches[key]
            async for ev in w:
                if ev.type is EventType.ERRORED:
                    self._log.warning("watch of %s/%s fell behind; re-watching: %s", key[0], key[1], ev.error)
                    break
                id = ev.id
                for slot, want in self._deps[key]:
                    if want is None or want == id:
                        slot.wake.set()
            if not self._running:
                return
            self._watches[key] = self.state.watch(*key, bootstrap=False, queue_size=self._queue_size)
            for slot, _ in self._deps[key]:
                slot.wake.set()

    async def _wait(self, slot: _Slot, next_tick: float | None) -> WakeReason:
        loop = asyncio.get_running_loop()
        if next_tick is None:
            await slot.wake.wait()
        elif not slot.wake.is_set():
            timeout = next_tick - loop.time()
            if timeout > 0:
                try:
                    async with asyncio.timeout(timeout):
                        await slot.wake.wait()
                except TimeoutError:
                    pass
        if slot.manual:
            return WakeReason.MANUAL
        return WakeReason.INPUT if slot.wake.is_set() else WakeReason.TIMER

    async def _loop(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        stats = slot.stats
        interval = slot.interval
        next_tick = None if interval is None else loop.time() + interval
        reason: WakeReason | None = WakeReason.START
        while True:
            if reason is None:
                stats.state = "idle"
                reason = await self._wait(slot, next_tick)
            if next_tick is not None and interval is not None and loop.time() >= next_tick:
                next_tick += interval
                if next_tick <= loop.time():  # we were busy for several periods: don't burst
                    next_tick = loop.time() + interval
            slot.wake.clear()
            slot.manual = False
            ctx = ControllerContext(slot.name, self.state, slot.inputs, slot.outputs, reason, self._log)
            stats.state = "running"
            stats.last_reason = str(reason)
            stats.last_run = self._clock()
            t0 = time.perf_counter()
            try:
                await slot.controller.reconcile(ctx)
            except Exception as e:
                stats.last_duration = time.perf_counter() - t0
                stats.runs += 1
                stats.failures += 1
                stats.consecutive_failures += 1
                stats.last_error = f"{type(e).__name__}: {e}"
                delay = self.backoff.delay(stats.consecutive_failures)
                self._log.error(
                    "controller %r failed (%d in a row), retrying in %.3gs: %s",
                    slot.name,
                    stats.consecutive_failures,
                    delay,
                    stats.last_error,
                    exc_info=True,
                )
                stats.state = "backoff"
                await self._sleep(delay)
                reason = WakeReason.RETRY
                continue
            stats.last_duration = time.perf_counter() - t0
            stats.runs += 1
            stats.consecutive_failures = 0
            stats.last_success = stats.last_run
            reason = None


def strong(namespace: str, type: str, id: str | None = None) -> Input:
    """Shorthand for a strong input."""
    return Input(namespace, type, id, InputKind.STRONG)


def weak(namespace: str, type: str, id: str | None = None) -> Input:
    """Shorthand for a weak input."""
    return Input(namespace, type, id, InputKind.WEAK)
