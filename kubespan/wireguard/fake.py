"""In-memory WireGuard device, and a UAPI server backed by it.

:class:`FakeWireGuard` is the test double for :class:`~.backend.WireGuardBackend`:
it executes operations with :func:`kubespan.wireguard.diff.apply_ops` (WireGuard's
semantics), records every ``apply`` call so a test can assert that nothing
was written, can be told to fail (optionally after part of a batch, as a
real non-transactional set does) and can simulate traffic and handshakes.

:class:`FakeUapiServer` speaks wireguard-go's UAPI on a unix socket in front
of a :class:`FakeWireGuard`, for testing UAPI clients without root.
``python -m kubespan.wireguard.fake -f IFNAME`` runs it as a stand-in for
``wireguard-go -f IFNAME`` (socket directory from ``$KUBESPAN_FAKE_WG_DIR``,
default ``/var/run/wireguard``), to test process supervision.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kubespan.wireguard import uapi
from kubespan.wireguard.diff import Op, apply_ops
from kubespan.wireguard.types import ObservedDevice, PublicKey

from .backend import WireGuardError


@dataclass(frozen=True, slots=True)
class _Failure:
    error: WireGuardError
    after: int  # operations applied before failing


class FakeWireGuard:
    """An in-memory WireGuard device implementing the backend interface."""

    name = "fake"

    def __init__(self, *, exists: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.device: ObservedDevice | None = ObservedDevice() if exists else None
        self.clock = clock
        self.applies: list[tuple[Op, ...]] = []  # every apply call, in order, failed ones included
        self.gets = 0
        self.ensure_calls = 0
        self.closed = False
        self.removed_on_close = False
        self._apply_failures: deque[_Failure] = deque()
        self._get_failures: deque[WireGuardError] = deque()

    # --- backend interface -----------------------------------------------------------------------

    async def ensure_device(self) -> None:
        self.ensure_calls += 1
        if self.device is None:
            self.device = ObservedDevice()

    async def get(self) -> ObservedDevice | None:
        self.gets += 1
        if self._get_failures:
            raise self._get_failures.popleft()
        return self.device

    async def apply(self, ops: Sequence[Op]) -> None:
        ops = tuple(ops)
        self.applies.append(ops)
        if not ops:
            return
        if self.device is None:
            raise WireGuardError(errno.ENODEV, "fake WireGuard device does not exist")
        if self._apply_failures:
            failure = self._apply_failures.popleft()
            self.device = apply_ops(self.device, ops[: failure.after])
            raise failure.error
        self.device = apply_ops(self.device, ops)

    async def close(self, remove: bool = False) -> None:
        self.closed = True
        self.removed_on_close = remove
        if remove:
            self.device = None

    # --- test controls ---------------------------------------------------------------------------

    @property
    def writes(self) -> int:
        """Number of apply calls that carried at least one operation."""
        return sum(1 for ops in self.applies if ops)

    def fail_next_apply(self, error: WireGuardError | None = None, *, after: int = 0) -> None:
        """Make the next apply execute its first ``after`` operations, then raise ``error``."""
        if error is None:
            error = WireGuardError(errno.EINVAL, "fake WireGuard: injected apply failure")
        self._apply_failures.append(_Failure(error, after))

    def fail_next_get(self, error: WireGuardError | None = None) -> None:
        if error is None:
            error = WireGuardError(errno.EIO, "fake WireGuard: injected get failure")
        self._get_failures.append(error)

    def traffic(
        self, key: PublicKey, *, rx: int = 0, tx: int = 0, handshake: bool | float | None = None
    ) -> None:
        """Add ``rx``/``tx`` bytes to a peer; ``handshake=True`` stamps it with the clock, a float sets it."""
        if self.device is None or key not in self.device.peers:
            raise KeyError(f"no peer {key}")
        peer = self.device.peers[key]
        peer = replace(peer, rx_bytes=peer.rx_bytes + rx, tx_bytes=peer.tx_bytes + tx)
        if handshake is True:
            peer = replace(peer, last_handshake=self.clock())
        elif handshake is not None and handshake is not False:
            peer = replace(peer, last_handshake=float(handshake))
        peers = dict(self.device.peers)
        peers[key] = peer
        self.device = replace(self.device, peers=peers)

    def restart(self) -> None:
        """Simulate the daemon restarting: the device exists again, empty."""
        self.device = ObservedDevice()

    def remove(self) -> None:
        """Simulate someone deleting the device."""
        self.device = None


class FakeUapiServer:
    """wireguard-go's UAPI protocol on a unix socket, in front of a :class:`FakeWireGuard`.

    Like wireguard-go it serves any number of requests per connection, answers
    ``errno=N`` (negative) on failure and closes the connection after a failed
    set. Failures come from the device (:meth:`FakeWireGuard.fail_next_apply`,
    possibly after part of the batch) or from ``reject_next_set = -errno``,
    which answers right after ``set=1`` without reading the rest, as
    wireguard-go does when an early line fails (a client still writing a large
    request then sees a broken pipe). ``delay`` holds every answer back and
    ``hang_up`` closes connections without answering.
    """

    def __init__(self, path: Path, device: FakeWireGuard | None = None) -> None:
        self.path = Path(path)
        self.device = device if device is not None else FakeWireGuard(exists=True)
        self.requests: list[str] = []  # "get" / "set", in order
        self.delay = 0.0
        self.hang_up = False
        self.reject_next_set: int | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> FakeUapiServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=1 << 26)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> FakeUapiServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                op = await reader.readline()
                if op == b"get=1\n":
                    if await reader.readexactly(1) != b"\n":
                        return
                    self.requests.append("get")
                    answer, keep = await self._get(), True
                elif op == b"set=1\n":
                    self.requests.append("set")
                    answer, keep = await self._set(reader)
                else:
                    return  # EOF or an unknown operation: wireguard-go closes too
                if self.hang_up:
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(answer)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _get(self) -> bytes:
        try:
            dev = await self.device.get()
        except WireGuardError as e:
            return f"errno={-(e.errno or errno.EIO)}\n\n".encode()
        return uapi.encode_get_response(dev if dev is not None else ObservedDevice())

    async def _set(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        if self.reject_next_set is not None:
            code, self.reject_next_set = self.reject_next_set, None
            # answer at the first line and leave the rest unread, as wireguard-go does on an early error
            return f"errno={code}\n\n".encode(), False
        lines = [b"set=1\n"]
        while (line := await reader.readline()) not in (b"\n", b""):
            lines.append(line)
        try:
            ops = uapi.decode_set(b"".join(lines))
        except uapi.UapiProtocolError:
            return f"errno={-errno.EPROTO}\n\n".encode(), False
        try:
            await self.device.apply(ops)
        except WireGuardError as e:
            return f"errno={-(e.errno or errno.EIO)}\n\n".encode(), False
        return b"errno=0\n\n", True


# --- a stand-in for `wireguard-go -f IFNAME` ------------------------------------------------------


async def _serve_forever(ifname: str) -> int:
    sock_dir = Path(os.environ.get("KUBESPAN_FAKE_WG_DIR", "/var/run/wireguard"))
    path = sock_dir / f"{ifname}.sock"
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale, as wireguard-go does
        else:
            print("unix socket in use", file=sys.stderr, flush=True)
            return 1
        finally:
            probe.close()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeUapiServer(path):
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "-f":
        print("usage: python -m kubespan.wireguard.fake -f IFNAME", file=sys.stderr)
        return 2
    return asyncio.run(_serve_forever(args[1]))


if __name__ == "__main__":
    sys.exit(main())
