"""A fork server for a lab's agents: one process imports ``kubespan run``'s modules once, then forks
each agent into its node.

Why: a node imports its agent's modules once per boot, on its own CPU. A lab of N nodes on one
machine pays N imports on the same cores (~0.2 s of CPU each here: at N = 50, about 5 s of a 2-core
machine's wall time before any mesh work), so the lab's cold-start figures measured mostly Python's
start-up. Forked agents share the imports; everything else is the agent's own: the child enters its
node like ``Node.argv`` does (a new session, a private mount namespace with the node's
``/run/wireguard``, the node's network namespace and its ``/sys``), then runs ``kubespan.cli.main``
(by name) with the given arguments and environment, and spawns its own wireguard-go. The collector is not
frozen: a forked agent collects like an exec'd one.

The server knows no agent: its command line names the modules to preload (netns.mesh's
``AGENT_PRELOAD``), a spawn the module to run; the lab knows the agent by name only, as it knows the
command line it would exec. Protocol (the lab side is :class:`Launcher`): one JSON object per line on stdin,
one answer per line on stdout. ``{"op": "spawn", "module": "kubespan.cli", "args": [...], "ns": ...,
"log": ..., "env": {...}, "wg_dir": ...}`` (``module.main(args)``, run in the child) →
``{"pid": N}``; ``{"op": "wait", "pid": N, "timeout": T}`` → ``{"code": C}`` (``null``: still
running after ``T`` seconds; ``0`` polls). Errors answer ``{"error": "..."}``. The server exits at
EOF (its lab closed or died) and, through PR_SET_PDEATHSIG, with the process that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from netns.errors import LabError

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
#: The server's nice value while it forks (its children go back to 0): on a machine its earlier
#: children keep busy, a server at 0 gets a fair share of one task in N and 50 forks took 2.4-3.3 s;
#: real nodes all start at once.
SERVER_NICE = -20


class LaunchError(LabError):
    """The fork server refused a request or is gone."""


# -- the server (``python -m netns.launcher``)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter(libc: Any, ns: str, wg_dir: str | None) -> None:
    """Enter node ``ns`` as ``Node.argv`` does: private mounts (with ``wg_dir`` on /run/wireguard),
    the network namespace, and a /sys that shows it (as ``ip netns exec`` remounts it)."""
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    if wg_dir is not None:
        _check(libc.mount(wg_dir.encode(), b"/run/wireguard", None, _MS_BIND, None), f"bind {wg_dir}")
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _check(libc.setns(fd, _CLONE_NEWNET), f"setns({ns})")
    finally:
        os.close(fd)
    _check(libc.umount2(b"/sys", _MNT_DETACH), "umount /sys")
    _check(libc.mount(ns.encode(), b"/sys", b"sysfs", 0, None), "mount sysfs")


def _child(req: dict[str, Any]) -> NoReturn:
    """Become the agent; never returns (``os._exit`` with its exit code)."""
    code = 1
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
        os.setsid()
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        _enter(_libc(), req["ns"], req.get("wg_dir"))
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = [req["module"], *req["args"]]
        # by name, as ``python -m MODULE`` would run it (the lab never imports the product)
        code = importlib.import_module(req["module"]).main(req["args"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _spawn(req: dict[str, Any]) -> int:
    for key, kind in (("module", str), ("args", list), ("ns", str), ("log", str), ("env", dict)):
        if not isinstance(req.get(key), kind):
            raise LaunchError(f"spawn: {key!r} must be a {kind.__name__}")
    if not isinstance(req.get("wg_dir"), (str, type(None))):
        raise LaunchError("spawn: 'wg_dir' must be a str or null")
    pid = os.fork()
    if pid == 0:
        _child(req)
    return pid


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


def _answer(req: object) -> dict[str, Any]:
    if not isinstance(req, dict):
        raise LaunchError("a request must be a JSON object")
    op = req.get("op")
    if op == "spawn":
        return {"pid": _spawn(req)}
    if op == "wait":
        pid, timeout = req.get("pid"), req.get("timeout", 0)
        if not isinstance(pid, int) or not isinstance(timeout, (int, float)):
            raise LaunchError("wait: 'pid' must be an int and 'timeout' a number")
        return {"code": _wait(pid, float(timeout))}
    raise LaunchError(f"unknown op {op!r} (spawn, wait)")


def serve(preload: Sequence[str]) -> int:
    """Import ``preload``, say ready, then answer requests until EOF."""
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with contextlib.suppress(OSError):  # not root: forks at the default priority
        os.setpriority(os.PRIO_PROCESS, 0, SERVER_NICE)
    t0 = time.process_time()
    for name in preload:
        importlib.import_module(name)
    requests, answers = sys.stdin.buffer, sys.stdout
    # start_cpu: what an exec'd agent spends before its own code runs (the interpreter and these imports)
    ready = {
        "ready": True,
        "modules": len(sys.modules),
        "import_cpu": round(time.process_time() - t0, 3),
        "start_cpu": round(time.process_time(), 3),
    }
    print(json.dumps(ready), file=answers, flush=True)
    for line in requests:
        try:
            answer = _answer(json.loads(line))
        except (LaunchError, OSError, ValueError) as e:
            answer = {"error": str(e)}
        print(json.dumps(answer), file=answers, flush=True)
    return 0


# -- the lab side


class Launcher:
    """A running fork server and the requests to it (thread-safe: one request at a time)."""

    def __init__(
        self, log: Path, preload: Sequence[str] = (), python: str = sys.executable, timeout: float = 60.0
    ) -> None:
        """``preload``: the modules to import once, before any fork (the agent's: netns.mesh)."""
        with log.open("ab") as err:
            self._proc = subprocess.Popen(
                [python, "-m", "netns.launcher", *preload],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self._lock = threading.RLock()
        self._pending: list[ForkedProcess] | None = None  # spawns sent in a batch, not yet answered
        self._buf = b""
        self.log = log
        self.ready = self._read(timeout)
        if not self.ready.get("ready"):
            self.close()
            raise LaunchError(f"fork server did not start: {self.ready}")

    def _read(self, timeout: float) -> dict[str, Any]:
        """The next answer line; a server silent for ``timeout`` seconds is killed (its state unknown)."""
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._proc.kill()
                raise LaunchError(f"fork server gave no answer within {timeout:.0f} s; log: {self.log}")
            chunk = os.read(fd, 65536)
            if not chunk:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise LaunchError(f"fork server exited ({self._proc.wait(5)}); its log:\n{tail}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    @property
    def alive(self) -> bool:
        """Whether the server still runs (its children's exit codes come from it while it does)."""
        return self._proc.poll() is None

    def _send(self, req: dict[str, Any]) -> None:
        if self._proc.poll() is not None or self._proc.stdin is None:
            raise LaunchError(f"fork server exited ({self._proc.returncode}); log: {self.log}")
        self._proc.stdin.write(json.dumps(req).encode() + b"\n")
        self._proc.stdin.flush()

    def request(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        with self._lock:
            if self._pending is not None:
                raise LaunchError("a request inside a spawn batch (only spawns are batched)")
            self._send(req)
            answer = self._read(timeout)
        if "error" in answer:
            raise LaunchError(answer["error"])
        return answer

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Spawns in the block are sent at once and answered at its end (their pids are set then),
        so a lab starting many agents on a busy machine does not wait a round trip per agent."""
        with self._lock:
            self._pending = []
            try:
                yield
            finally:
                pending, self._pending = self._pending, None
                errors = []
                for i, proc in enumerate(pending):
                    answer = self._read(30.0)
                    if "error" in answer:
                        errors.append(f"spawn {i + 1} ({proc.args[1]}): {answer['error']}")
                    else:
                        proc.pid = answer["pid"]
        if errors:
            for proc in pending:
                if proc.started:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
            raise LaunchError(f"{len(errors)} of {len(pending)} spawns failed: " + "; ".join(errors))

    def spawn(
        self,
        module: str,
        args: Sequence[str],
        *,
        ns: str,
        log: Path,
        env: dict[str, str],
        wg_dir: Path | None,
    ) -> ForkedProcess:
        """Fork ``module.main(args)`` (as ``python -m MODULE ARGS`` would run) into namespace ``ns``;
        inside :meth:`batch` the pid is known at the batch's end."""
        req = {
            "op": "spawn",
            "module": module,
            "args": list(args),
            "ns": ns,
            "log": str(log),
            "env": env,
            "wg_dir": None if wg_dir is None else str(wg_dir),
        }
        proc = ForkedProcess(self, ["fork:", module, *args])
        with self._lock:
            if self._pending is not None:
                self._send(req)
                self._pending.append(proc)
                return proc
        proc.pid = self.request(req)["pid"]
        return proc

    def close(self) -> None:
        """End the server (its children are the lab's to stop first; any left are re-parented)."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


class ForkedProcess:
    """A forked agent, with the part of ``subprocess.Popen``'s interface a lab uses."""

    def __init__(self, launcher: Launcher, args: list[str]) -> None:
        self.launcher = launcher
        self.args = args
        self.returncode: int | None = None
        self._pid: int | None = None  # None until the server answers the spawn (see Launcher.batch)

    @property
    def pid(self) -> int:
        if self._pid is None:  # never 0 or -1 here: os.kill would signal a group or everything
            raise LaunchError(f"{self.args[1]}: not forked yet (its spawn batch is still open)")
        return self._pid

    @pid.setter
    def pid(self, pid: int) -> None:
        if not isinstance(pid, int) or pid <= 1:
            raise LaunchError(f"fork server answered pid {pid!r}")
        self._pid = pid

    @property
    def started(self) -> bool:
        return self._pid is not None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.launcher.alive:
                self.returncode = self.launcher.request({"op": "wait", "pid": self.pid, "timeout": 0})["code"]
            elif not _alive(self.pid):  # the server is gone and init reaped its children: code lost
                self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            limit = 3600.0 if timeout is None else timeout
            if self.launcher.alive:
                req = {"op": "wait", "pid": self.pid, "timeout": limit}
                self.returncode = self.launcher.request(req, timeout=limit + 30)["code"]
            else:
                deadline = time.monotonic() + limit
                while _alive(self.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.poll()
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, limit)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self._pid} returncode={self.returncode}>"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: where init does not reap, one stays a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
