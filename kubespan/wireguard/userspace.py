"""The userspace backend: wireguard-go, spawned and supervised by us, configured over its UAPI socket.

:class:`UapiClient` speaks UAPI over one unix-socket connection per request; :class:`UserspaceBackend`
runs and restarts ``wireguard-go -f IFNAME`` and adopts a daemon left running by a killed agent, so
sessions survive an agent restart. Socket directories, adoption and restart rules:
docs/design/wireguard-userspace.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shlex
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from kubespan.constants import check_link_name
from kubespan.wireguard import uapi
from kubespan.wireguard.diff import AddPeer, Op, RemovePeer, UpdatePeer
from kubespan.wireguard.types import ObservedDevice
from spanutil.logs import log_event

from .backend import WireGuardError

logger = logging.getLogger("kubespan.wireguard")

DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
MAX_RESPONSE = 64 << 20  # a get with 10^5 peers is ~40 MB
_RECV = 1 << 18
_NO_DEVICE = (errno.ENOENT, errno.ECONNREFUSED)
_LOG_CAP = 1 << 20  # the daemon's log file is truncated at spawn when bigger


# --- UAPI client ---------------------------------------------------------------------------------


class UapiClient:
    """wireguard-go's UAPI over ``socket_path``: one connection per request.

    ``gets``/``sets`` count requests sent (for tests and metrics);
    ``last_set_ops`` holds the operations of the last set. Errors are
    :class:`WireGuardError` naming the socket path, never a value.

    It uses a non-blocking socket with ``loop.sock_*`` rather than asyncio
    streams: when wireguard-go rejects an early line of a large set (say, the
    listen port is taken) it answers and closes without reading the rest, and
    a stream transport tears itself down on the resulting EPIPE, dropping the
    errno answer that is already in the receive buffer.
    """

    def __init__(self, socket_path: Path | str, *, timeout: float = 10.0) -> None:
        self.path = Path(socket_path)
        self.timeout = timeout
        self.gets = 0
        self.sets = 0
        self.last_set_ops: tuple[Op, ...] = ()
        # the previous answer's parsed peers: unchanged ones are not parsed again
        self.peer_cache = uapi.PeerCache()

    @property
    def requests(self) -> int:
        return self.gets + self.sets

    async def get(self) -> ObservedDevice:
        device, _ = await self.get_with_pid()
        return device

    async def get_with_pid(self) -> tuple[ObservedDevice, int | None]:
        """The device, and the pid of the process that listens on the socket (its peer credentials)."""
        self.gets += 1
        answer, pid = await self._exchange(uapi.GET_REQUEST, "get")
        try:
            return uapi.parse_get(answer, self.peer_cache), pid
        except uapi.UapiError as e:
            raise WireGuardError(abs(e.code), f"UAPI get on {self.path}: {e.strerror}") from None
        except uapi.UapiProtocolError as e:
            raise WireGuardError(errno.EPROTO, f"UAPI get on {self.path}: malformed answer: {e}") from None

    async def set(self, ops: Sequence[Op]) -> None:
        """Send ``ops`` as one ``set=1`` request; nothing is sent when there is nothing to change.

        A large request is written in pieces as it is encoded, so wireguard-go
        applies the first peers while later ones are still being encoded.
        Not transactional: on an error, lines before the failing one stay applied.
        """
        request = uapi.encode_set_chunks(ops)
        if request is None:
            return
        self.sets += 1
        self.last_set_ops = tuple(ops)
        answer, _ = await self._exchange(request, "set")
        try:
            uapi.check_set_response(answer)
        except uapi.UapiError as e:
            raise WireGuardError(
                abs(e.code),
                f"UAPI set on {self.path} failed: {e.strerror}; earlier lines may have been applied",
            ) from None
        except uapi.UapiProtocolError as e:
            raise WireGuardError(errno.EPROTO, f"UAPI set on {self.path}: malformed answer: {e}") from None

    async def _exchange(self, request: bytes | Iterable[bytes], what: str) -> tuple[bytes, int | None]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout):
                await self._connect(loop, sock)
                pid = _peer_pid(sock)
                sent_error: OSError | None = None
                for piece in (request,) if isinstance(request, bytes) else request:
                    try:
                        await loop.sock_sendall(sock, piece)
                    except (BrokenPipeError, ConnectionResetError) as e:
                        # wireguard-go answers at the first failing line and stops reading;
                        # its answer may already be waiting in our receive buffer
                        sent_error = e
                        break
                answer = await self._read_answer(loop, sock, what, sent_error)
                return answer, pid
        except TimeoutError:
            raise WireGuardError(
                errno.ETIMEDOUT, f"UAPI {what} on {self.path}: no answer within {self.timeout:g} s"
            ) from None
        finally:
            sock.close()

    async def _connect(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        try:
            await loop.sock_connect(sock, str(self.path))
        except FileNotFoundError:
            raise WireGuardError(
                errno.ENOENT, f"UAPI socket {self.path} does not exist (is wireguard-go running?)"
            ) from None
        except ConnectionRefusedError:
            raise WireGuardError(
                errno.ECONNREFUSED, f"UAPI socket {self.path} refused the connection (stale socket?)"
            ) from None
        except OSError as e:
            raise WireGuardError(e.errno, f"UAPI socket {self.path}: {e.strerror or e}") from None

    async def _read_answer(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, what: str, sent_error: OSError | None
    ) -> bytes:
        buf = bytearray()
        while True:
            try:
                chunk = await loop.sock_recv(sock, _RECV)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                detail = f" (write failed: {sent_error.strerror})" if sent_error is not None else ""
                raise WireGuardError(
                    errno.ECONNRESET,
                    f"UAPI {what} on {self.path}: connection closed before the answer{detail}",
                )
            start = max(0, len(buf) - 1)
            buf += chunk
            end = buf.find(b"\n\n", start)
            if end >= 0:
                return bytes(buf[: end + 2])
            if len(buf) > MAX_RESPONSE:
                raise WireGuardError(
                    errno.EMSGSIZE, f"UAPI {what} on {self.path}: answer exceeds {MAX_RESPONSE} bytes"
                )


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None
    return pid or None  # 0: not visible from our pid namespace


# --- process handles -----------------------------------------------------------------------------


class _Process:
    """A wireguard-go process watched through a pidfd: our child, or an adopted one."""

    def __init__(self, pid: int, *, child: bool) -> None:
        self.pid = pid
        self.child = child
        self.returncode: int | None = None
        self.started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = os.pidfd_open(pid)
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(self._pidfd, self._on_exit)

    @property
    def alive(self) -> bool:
        return not self._exited.done()

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
        # reap it when it is our child (also one adopted from an earlier backend in this process)
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        if not self._exited.done():
            self._exited.set_result(None)

    async def wait(self) -> int | None:
        await asyncio.shield(self._exited)
        return self.returncode

    def signal(self, sig: int) -> None:
        if not self.alive or self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.child:
                os.killpg(self.pid, sig)  # its own session: reaches wrappers that did not exec
            else:
                signal.pidfd_send_signal(self._pidfd, sig)

    def release(self) -> None:
        """Stop watching (the process keeps running if it is)."""
        if self._pidfd is not None:
            if self.alive:
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _descends_from(pid: int, ancestor: int, depth: int = 4) -> bool:
    for _ in range(depth + 1):
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


# --- the backend ---------------------------------------------------------------------------------


class UserspaceBackend:
    """WireGuard through a supervised wireguard-go.

    ``command_prefix`` is put in front of the command line, e.g.
    ``["ip", "netns", "exec", NS]`` to run the daemon in a network namespace.
    ``on_restart`` is awaited after every automatic restart (the device is
    then empty). ``private_mount`` (default: when ``socket_dir`` is not
    ``/var/run/wireguard``) runs the daemon in its own mount namespace with
    ``socket_dir`` bind-mounted onto ``/var/run/wireguard``. wireguard-go's output goes to ``log_path`` (default
    ``SOCKET_DIR/IFNAME.log``), a file rather than a pipe so the daemon can
    outlive us without dying of SIGPIPE.
    """

    name = "userspace"

    def __init__(
        self,
        ifname: str = "kubespan",
        *,
        socket_dir: Path | str = DEFAULT_SOCKET_DIR,
        binary: str | Sequence[str] = "wireguard-go",
        on_restart: Callable[[], Awaitable[None]] | None = None,
        command_prefix: Sequence[str] = (),
        existing: Literal["adopt", "replace"] = "adopt",
        private_mount: bool | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "error",
        log_path: Path | str | None = None,
        request_timeout: float = 10.0,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        stable_after: float = 10.0,
    ) -> None:
        check_link_name(ifname, "ifname")
        if existing not in ("adopt", "replace"):
            raise ValueError(f"existing: {existing!r} must be 'adopt' or 'replace'")
        for field, value in (
            ("request_timeout", request_timeout),
            ("start_timeout", start_timeout),
            ("stop_timeout", stop_timeout),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
        ):
            if not value > 0:
                raise ValueError(f"{field}: {value} must be > 0")
        self.ifname = ifname
        self.socket_dir = Path(socket_dir)
        self.socket_path = self.socket_dir / f"{ifname}.sock"
        self.binary = [binary] if isinstance(binary, str) else list(binary)
        if not self.binary:
            raise ValueError("binary: must not be empty")
        self.on_restart = on_restart
        self.command_prefix = list(command_prefix)
        self.existing = existing
        if private_mount is None:
            private_mount = os.path.realpath(self.socket_dir) != os.path.realpath(DEFAULT_SOCKET_DIR)
        self.private_mount = private_mount
        self.env = dict(env or {})
        self.log_level = log_level
        self.log_path = Path(log_path) if log_path is not None else self.socket_dir / f"{ifname}.log"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self.stable_after = stable_after
        self.client = UapiClient(self.socket_path, timeout=request_timeout)
        self.restarts = 0
        self._proc: _Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closing = False

    # --- introspection ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.alive else None

    @property
    def adopted(self) -> bool:
        return self._proc is not None and not self._proc.child

    @property
    def supervising(self) -> bool:
        return self._supervisor is not None and not self._supervisor.done()

    def command(self) -> list[str]:
        """The command line that starts the daemon."""
        inner = [*self.binary, "-f", self.ifname]
        if self.private_mount:
            target = str(DEFAULT_SOCKET_DIR)
            script = (
                f"mkdir -p {target} && mount --bind {shlex.quote(str(self.socket_dir))} {target}"
                f" && exec {shlex.join(inner)}"
            )
            inner = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        return [*self.command_prefix, *inner]

    # --- backend interface -----------------------------------------------------------------------

    async def ensure_device(self) -> None:
        """Adopt (or replace) a running wireguard-go, or start one; then supervise it. Idempotent."""
        async with self._lock:
            if self.supervising:
                return
            self._closing = False
            proc = self._proc  # still set only if supervision stopped unexpectedly
            if proc is not None and not proc.alive:
                proc.release()
                proc = self._proc = None
            if proc is None:
                found = await self._find_existing()
                if found is not None and self.existing == "replace":
                    await self._terminate(found)
                    found.release()
                    log_event(logger, "wireguard-go replaced", ifname=self.ifname, old_pid=found.pid)
                    found = None
                if found is None:
                    proc = await self._start()
                else:
                    proc = found
                    log_event(
                        logger,
                        "wireguard-go adopted",
                        ifname=self.ifname,
                        pid=proc.pid,
                        socket=str(self.socket_path),
                    )
            self._proc = proc
            self._supervisor = asyncio.create_task(self._supervise(), name=f"wireguard-go {self.ifname}")

    async def get(self) -> ObservedDevice | None:
        try:
            return await self.client.get()
        except WireGuardError as e:
            if e.errno in _NO_DEVICE:
                return None
            raise

    async def apply(self, ops: Sequence[Op]) -> None:
        if not ops:
            return
        t0 = time.perf_counter()
        await self.client.set(ops)
        log_event(
            logger,
            "wireguard applied",
            logging.DEBUG,
            backend=self.name,
            ifname=self.ifname,
            ops=len(ops),
            peers=sum(1 for op in ops if isinstance(op, AddPeer | UpdatePeer | RemovePeer)),
            ms=round((time.perf_counter() - t0) * 1000, 2),
        )

    async def close(self, remove: bool = False) -> None:
        """Stop supervising; with ``remove`` also stop wireguard-go (SIGTERM, then SIGKILL), which deletes the link."""
        async with self._lock:
            self._closing = True
            if self._supervisor is not None:
                self._supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._supervisor
                self._supervisor = None
            proc, self._proc = self._proc, None
            if proc is None:
                return
            if remove:
                await self._terminate(proc)
                self._remove_stale_socket()
                log_event(logger, "wireguard-go stopped", ifname=self.ifname, pid=proc.pid, removed=True)
            else:
                log_event(
                    logger, "wireguard-go left running", ifname=self.ifname, pid=proc.pid, alive=proc.alive
                )
            proc.release()

    async def __aenter__(self) -> UserspaceBackend:
        await self.ensure_device()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(remove=True)

    # --- lifecycle -------------------------------------------------------------------------------

    async def _find_existing(self) -> _Process | None:
        """The identifiable wireguard-go serving our socket, or None when nothing serves it."""
        try:
            _, pid = await self.client.get_with_pid()
        except WireGuardError as e:
            if e.errno in _NO_DEVICE:
                return None
            raise
        expected = Path(self.binary[0]).name[:15]
        if pid is None or _comm(pid) != expected:
            raise WireGuardError(
                errno.EEXIST,
                f"UAPI socket {self.socket_path} is served by a process that is not {expected}"
                f" (pid {pid}); stop it or delete the device {self.ifname}",
            )
        try:
            proc = _Process(pid, child=False)
        except ProcessLookupError:
            return None
        if _comm(pid) != expected:  # the pid was reused between the two looks
            proc.release()
            return None
        return proc

    def _spawn(self) -> _Process:
        argv = self.command()
        env = dict(os.environ)
        env.update(WG_PROCESS_FOREGROUND="1", LOG_LEVEL=self.log_level)
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > _LOG_CAP:
                self.log_path.unlink()
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(self.log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        try:
            pid = os.posix_spawnp(
                argv[0],
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores these; the daemon should not
            )
        except OSError as e:
            raise WireGuardError(e.errno, f"cannot start {argv[0]}: {e.strerror}") from None
        return _Process(pid, child=True)

    async def _start(self) -> _Process:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        proc = self._spawn()
        try:
            await self._wait_ready(proc)
        except BaseException:
            await self._terminate(proc)
            proc.release()
            raise
        log_event(
            logger,
            "wireguard-go started",
            ifname=self.ifname,
            pid=proc.pid,
            socket=str(self.socket_path),
            ms=round((time.monotonic() - t0) * 1000, 1),
        )
        return proc

    async def _wait_ready(self, proc: _Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        delay = 0.005
        while True:
            if not proc.alive:
                raise WireGuardError(
                    errno.ECHILD,
                    f"{self.binary[0]} exited ({proc.returncode}) before {self.socket_path} was ready"
                    f"{self._log_tail()}",
                )
            try:
                _, pid = await self.client.get_with_pid()
            except WireGuardError as e:
                if e.errno not in (*_NO_DEVICE, errno.ECONNRESET, errno.ETIMEDOUT):
                    raise
            else:
                if pid is None or _descends_from(pid, proc.pid):
                    return
                # someone else serves the socket: ours will fail ("unix socket in use") and exit
            if loop.time() >= deadline:
                raise WireGuardError(
                    errno.ETIMEDOUT,
                    f"{self.binary[0]} did not serve {self.socket_path} within {self.start_timeout:g} s"
                    f"{self._log_tail()}",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), delay)
            delay = min(delay * 2, 0.05)

    def _log_tail(self, limit: int = 400) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
                text = f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f": {' | '.join(text.splitlines()[-3:])}" if text else ""

    async def _terminate(self, proc: _Process) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not proc.alive:
                return
            proc.signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
        if proc.alive:
            log_event(logger, "wireguard-go did not exit", logging.ERROR, ifname=self.ifname, pid=proc.pid)

    def _remove_stale_socket(self) -> None:
        """After SIGKILL the socket file stays; remove it only when nothing listens on it."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        except OSError:
            pass
        finally:
            probe.close()

    async def _supervise(self) -> None:
        backoff = self.backoff_initial
        loop = asyncio.get_running_loop()
        while not self._closing:
            proc = self._proc
            assert proc is not None
            returncode = await proc.wait()
            if self._closing:
                return
            proc.release()
            ran = time.monotonic() - proc.started
            if ran >= self.stable_after:
                backoff = self.backoff_initial
            log_event(
                logger,
                "wireguard-go exited",
                logging.WARNING,
                ifname=self.ifname,
                pid=proc.pid,
                returncode=returncode,
                adopted=not proc.child,
                ran_s=round(ran, 1),
                restart_in_s=backoff,
            )
            down_since = loop.time()
            attempt = 0
            while True:
                attempt += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                try:
                    self._proc = await self._start()
                    break
                except Exception as e:  # keep supervising whatever went wrong
                    log_event(
                        logger,
                        "wireguard-go restart failed",
                        logging.WARNING,
                        ifname=self.ifname,
                        attempt=attempt,
                        errno=getattr(e, "errno", None),
                        error=(
                            e.strerror
                            if isinstance(e, OSError) and e.strerror
                            else f"{type(e).__name__}: {e}"
                        ),
                        retry_in_s=backoff,
                    )
            self.restarts += 1
            log_event(
                logger,
                "wireguard-go restarted",
                ifname=self.ifname,
                pid=self._proc.pid,
                attempt=attempt,
                restarts=self.restarts,
                down_ms=round((loop.time() - down_since) * 1000, 1),
            )
            if self.on_restart is not None:
                try:
                    await self.on_restart()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log_event(
                        logger,
                        "wireguard-go on_restart failed",
                        logging.ERROR,
                        ifname=self.ifname,
                        error=f"{type(e).__name__}: {e}",
                    )
