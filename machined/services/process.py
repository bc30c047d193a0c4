"""The process and clock interfaces the supervisor runs on, and their real implementations.

Every service process is a session (and process group) leader, so signals reach everything it forked.
Fakes of both interfaces live in :mod:`machined.services.fake`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SpawnError(Exception):
    """The command could not be started (executable, cwd or user problem); the message says which."""


@dataclass(frozen=True, slots=True)
class Command:
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | int | None = None


class ByteStream(Protocol):
    async def read(self, n: int = -1) -> bytes: ...  # b"" at end of stream


class Process(Protocol):
    pid: int
    stdout: ByteStream | None
    stderr: ByteStream | None

    @property
    def returncode(self) -> int | None: ...  # None while running; -N when killed by signal N

    async def wait(self) -> int: ...

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group; no error when it is already gone."""
        ...

    def close(self) -> None:
        """Release pipes and OS resources; called once the process has exited."""
        ...


class Spawner(Protocol):
    async def spawn(self, cmd: Command) -> Process: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...  # unix time, for event timestamps

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol plus an "exited" future.

    ``asyncio.subprocess.Process.wait()`` (before Python 3.12) only returns once the output pipes are
    closed too, so a grandchild that keeps them open would hide the exit of the service's process.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class _SystemProcess:
    def __init__(self, transport: asyncio.SubprocessTransport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.pid: int = transport.get_pid()
        self.stdout = protocol.stdout
        self.stderr = protocol.stderr

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    async def wait(self) -> int:
        await asyncio.shield(self._protocol.exited)
        code = self._transport.get_returncode()
        assert code is not None
        return code

    def signal_group(self, sig: int) -> None:
        # the group outlives its leader while any member lives; killpg after the leader was reaped
        # reaches the stragglers (and is a no-op when there are none)
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            if self.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._transport.send_signal(sig)

    def close(self) -> None:
        """Release the pipes (after the process exited; before that, asyncio would kill it)."""
        self._transport.close()


def resolve_user(user: str | int) -> tuple[int, int, list[int], str]:
    """``(uid, gid, supplementary gids, name)`` for a user name or uid; :class:`SpawnError` if unknown."""
    try:
        pw = pwd.getpwuid(int(user)) if isinstance(user, int) or str(user).isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise SpawnError(f"user {user!r} does not exist") from None
    try:
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except OSError:
        groups = [pw.pw_gid]
    return pw.pw_uid, pw.pw_gid, groups, pw.pw_name


def build_env(env: Mapping[str, str]) -> dict[str, str]:
    """A service's environment: ``PATH`` (machined's, or a default) plus the service's own variables.
    Nothing else of machined's environment leaks into services."""
    out = {"PATH": os.environ.get("PATH") or DEFAULT_PATH}
    out.update(env)
    return out


def prepare(cmd: Command) -> tuple[str, dict[str, str], dict[str, object]]:
    """Resolve the executable, check the working directory and the user: ``(exe, env, spawn kwargs)``
    or :class:`SpawnError` naming the problem."""
    env = build_env(cmd.env)
    exe = cmd.argv[0]
    if "/" not in exe:
        found = shutil.which(exe, path=env["PATH"])
        if found is None:
            raise SpawnError(f"executable {exe!r} not found in PATH {env['PATH']}")
        exe = found
    elif not os.access(exe, os.X_OK):
        raise SpawnError(f"{exe} is not an executable file")
    if cmd.cwd is not None and not os.path.isdir(cmd.cwd):
        raise SpawnError(f"working directory {cmd.cwd} does not exist")
    kw: dict[str, object] = {}
    if cmd.user is not None:
        uid, gid, groups, name = resolve_user(cmd.user)
        if uid != os.geteuid():
            if os.geteuid() != 0:
                raise SpawnError(f"cannot run as user {name!r}: machined is not running as root")
            kw.update(user=uid, group=gid, extra_groups=groups)
    return exe, env, kw


class SystemSpawner:
    """Real processes: stdin from /dev/null, stdout/stderr piped, a new session per process."""

    async def spawn(self, cmd: Command) -> Process:
        exe, env, kw = prepare(cmd)
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _Protocol(loop),
                exe,
                *cmd.argv[1:],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cmd.cwd,
                start_new_session=True,
                **kw,
            )
        except OSError as e:
            raise SpawnError(f"cannot start {exe}: {e.strerror or e}") from e
        return _SystemProcess(transport, protocol)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with code {code}"
