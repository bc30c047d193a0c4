"""In-memory fakes of the process spawner and the clock, for tests of the supervisor and of machined.

spawner = FakeSpawner()
spawner.program("web", exits(1, "boom"), hangs("listening"))   # 1st spawn fails, later ones hang
clock = FakeClock()
sup = Supervisor(spawner=spawner, clock=clock)
...
[p] = await spawner.wait_for_spawns(1, "web")          # wrap waits in asyncio.timeout()
clock.advance(1.0)                                               # fire due sleeps
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import signal
from collections.abc import Callable, Iterable

from .process import Command, SpawnError

_pids = itertools.count(40000)


class FakeProcess:
    """A process that prints what it is told and exits when told (or when signalled).

    SIGKILL always ends it (code -9).  SIGTERM ends it with ``term_code`` (-15 by default, as a real
    process killed by the signal) unless ``ignore_sigterm``.  Other signals are only recorded.
    """

    def __init__(
        self,
        cmd: Command | None = None,
        *,
        lines: Iterable[str] = (),
        stderr_lines: Iterable[str] = (),
        exit_code: int | None = None,
        ignore_sigterm: bool = False,
        term_code: int = -signal.SIGTERM,
    ) -> None:
        self.cmd = cmd
        self.pid = next(_pids)
        self.stdout = asyncio.StreamReader()
        self.stderr = asyncio.StreamReader()
        self.signals: list[int] = []
        self.closed = False
        self.ignore_sigterm = ignore_sigterm
        self.term_code = term_code
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        for line in lines:
            self.print(line)
        for line in stderr_lines:
            self.print(line, stderr=True)
        if exit_code is not None:
            asyncio.get_running_loop().call_soon(self.exit, exit_code)

    def print(self, line: str, *, stderr: bool = False) -> None:
        if not self._exit.done():
            (self.stderr if stderr else self.stdout).feed_data(line.encode() + b"\n")

    def write(self, data: bytes, *, stderr: bool = False) -> None:
        if not self._exit.done():
            (self.stderr if stderr else self.stdout).feed_data(data)

    def exit(self, code: int) -> None:
        if not self._exit.done():
            self.stdout.feed_eof()
            self.stderr.feed_eof()
            self._exit.set_result(code)

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    @property
    def alive(self) -> bool:
        return not self._exit.done()

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def close(self) -> None:
        self.closed = True

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.exit(-signal.SIGKILL)
        elif sig == signal.SIGTERM and not self.ignore_sigterm:
            self.exit(self.term_code)


Behavior = Callable[[Command], FakeProcess]


def exits(code: int, *lines: str, stderr: Iterable[str] = ()) -> Behavior:
    """Prints ``lines`` and exits with ``code`` right away."""
    return lambda cmd: FakeProcess(cmd, lines=lines, stderr_lines=stderr, exit_code=code)


def hangs(*lines: str, ignore_sigterm: bool = False, term_code: int = -signal.SIGTERM) -> Behavior:
    """Prints ``lines`` and runs until signalled (or until the test calls ``exit``)."""
    return lambda cmd: FakeProcess(cmd, lines=lines, ignore_sigterm=ignore_sigterm, term_code=term_code)


def fails_to_spawn(message: str = "executable not found") -> Behavior:
    def spawn(cmd: Command) -> FakeProcess:
        raise SpawnError(message)

    return spawn


class FakeSpawner:
    """Spawns :class:`FakeProcess` es by ``argv[0]``: each programmed behavior is used once, in order,
    and the last one repeats.  Unprogrammed commands hang (``default``)."""

    def __init__(self, default: Behavior | None = None) -> None:
        self.default = default or hangs()
        self._programs: dict[str, list[Behavior]] = {}
        self.spawned: list[FakeProcess] = []
        self.commands: list[Command] = []
        self._changed = asyncio.Event()

    def program(self, argv0: str, *behaviors: Behavior) -> None:
        self._programs[argv0] = list(behaviors)

    async def spawn(self, cmd: Command) -> FakeProcess:
        self.commands.append(cmd)
        queue = self._programs.get(cmd.argv[0])
        behavior = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else self.default
        self._changed.set()
        self._changed = asyncio.Event()
        proc = behavior(cmd)
        self.spawned.append(proc)
        return proc

    def of(self, argv0: str) -> list[FakeProcess]:
        return [p for p in self.spawned if p.cmd is not None and p.cmd.argv[0] == argv0]

    async def wait_for_spawns(self, n: int, argv0: str | None = None) -> list[FakeProcess]:
        """Wait until at least ``n`` processes (of ``argv0``) were spawned; return them all."""
        while True:
            procs = self.spawned if argv0 is None else self.of(argv0)
            if len(procs) >= n:
                return list(procs)
            await self._changed.wait()


class FakeClock:
    """Virtual time.  ``sleep`` parks until :meth:`advance` moves time past its deadline."""

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._changed = asyncio.Event()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + seconds, next(self._seq), fut))
        self._changed.set()
        self._changed = asyncio.Event()
        await fut

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed (earliest first)."""
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._timers)
            if not fut.done():
                fut.set_result(None)

    def sleepers(self) -> list[float]:
        """Remaining seconds of every pending sleep, soonest first."""
        return sorted(d - self._now for d, _, f in self._timers if not f.done())

    async def wait_for_sleeper(self, duration: float | None = None) -> None:
        """Wait until someone sleeps (for ``duration`` remaining seconds, if given)."""
        while True:
            pending = self.sleepers()
            if pending if duration is None else any(abs(r - duration) < 1e-9 for r in pending):
                return
            await self._changed.wait()
