"""A TCP forwarder from the host's loopback into a lab node: reaches a server that listens on 127.0.0.1
inside the node's network namespace (a mesh agent's page and ``/status``) from a browser on the host.
Used by ``make demo DEMO_ARGS=--keep``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()


class Forward:
    """Listens on ``127.0.0.1:port`` (0: any free port) and joins each connection to a socket from
    ``connect()``, which runs in a thread (e.g. ``lambda: node.connect_tcp("127.0.0.1", 51821)``)."""

    def __init__(self, connect: Callable[[], socket.socket], port: int = 0) -> None:
        self.connect = connect
        self.want_port = port
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("forwarder not started")
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> int:
        """Start listening; the port."""
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.want_port)
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine = [writer]
        self._writers.add(writer)
        try:
            try:
                sock = await asyncio.to_thread(self.connect)
            except OSError:
                return  # the agent is not listening (any more): the browser sees the connection close
            sock.setblocking(False)
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
            mine.append(up_writer)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in mine:
                w.close()
                self._writers.discard(w)

    async def close(self) -> None:
        """Stop listening and close every open connection (ends their pipes without cancelling)."""
        if self.server is not None:
            self.server.close()
        for w in list(self._writers):
            w.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
