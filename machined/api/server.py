"""The machine API server: ``machine.MachineService`` and ``cosi.resource.State`` on a unix socket.

The socket is created with mode 0660 (``mode``) and, when ``group`` is given, owned by that group:
its permissions decide who may connect, and a connected caller without ``talos-role`` metadata is
``os:admin`` (see :mod:`machined.api.roles`). A stale socket file left by a killed agent is removed;
a socket that still answers belongs to a running machined and is an error. Anything else at the path
(a regular file, a directory, a symbolic link, ...) is never removed: serving refuses to start
(:func:`check_socket_path`), so a mistyped ``--socket`` cannot delete a file.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from pathlib import Path
from typing import Any

import grpc

from spanapi.talos.cosi import state_pb2_grpc
from spanapi.talos.machine import machine_pb2_grpc

from .machine import MachineServicer, Node
from .resources import StateServicer, write_refusal_handler

MAX_MESSAGE = 32 << 20  # as Talos's apid backends


class SocketInUse(RuntimeError):
    pass


def _gid(group: str | int) -> int:
    if isinstance(group, int) or group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"socket group {group!r} does not exist") from None


class NotASocket(ValueError):
    """Something other than a unix socket is at the socket path."""


_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_socket_path(path: Path | str) -> bool:
    """True when a unix socket is at ``path``, False when nothing is; :class:`NotASocket` (naming the
    path and what is there) for anything else. Symbolic links are not followed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISSOCK(mode):
        return True
    what = next((name for test, name in _KINDS if test(mode)), "not a socket")
    raise NotASocket(
        f"{path} is {what}, not a unix socket: refusing to replace it (remove it or pass another --socket)"
    )


def _clear_stale(path: Path) -> None:
    if not check_socket_path(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: left by an agent that was killed
        return
    finally:
        s.close()
    raise SocketInUse(f"{path} is served by another process (is machined already running?)")


class ApiServer:
    def __init__(self, server: grpc.aio.Server, path: Path) -> None:
        self.server = server
        self.path = path

    async def stop(self, grace: float | None = 0.5) -> None:
        await self.server.stop(grace)
        with contextlib.suppress(FileNotFoundError, NotASocket):
            if check_socket_path(self.path):  # ours, unless it was replaced meanwhile
                self.path.unlink()


async def serve(
    node: Node,
    path: Path,
    *,
    mode: int = 0o660,
    group: str | int | None = None,
    **servicer_kw: Any,
) -> ApiServer:
    path = Path(path)
    gid = _gid(group) if group is not None else None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    _clear_stale(path)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    machine_pb2_grpc.add_MachineServiceServicer_to_server(MachineServicer(node, **servicer_kw), server)
    state_pb2_grpc.add_StateServicer_to_server(StateServicer(node.state), server)  # type: ignore[attr-defined]
    server.add_generic_rpc_handlers((write_refusal_handler(),))
    old = os.umask(0o777 & ~mode)  # the socket is born with the right mode: no window where it is wider
    try:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"cannot listen on {path}")
        await server.start()
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, -1, gid)
    return ApiServer(server, path)
