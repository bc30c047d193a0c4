"""netns.forward.Forward: bytes both ways between a loopback client and the socket ``connect()`` gives, an
end of stream passed on, a refused upstream closing the client, and close() ending open connections."""

from __future__ import annotations

import asyncio
import socket

from netns.forward import Forward


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's end of stream: the forwarder must pass it on
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_forward_carries_bytes_both_ways_and_the_end_of_stream() -> None:
    server, port = await _echo_server()
    fwd = Forward(lambda: socket.create_connection(("127.0.0.1", port), 2))
    local = await fwd.start()
    assert local != port and fwd.port == local
    reader, writer = await asyncio.open_connection("127.0.0.1", local)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"echo:GET / HTTP/1.0\r\n\r\n"
    writer.close()
    await fwd.close()
    server.close()


async def test_refused_upstream_closes_the_client_and_close_ends_open_connections() -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead_port = free.getsockname()[1]
    free.close()  # nothing listens there now
    fwd = Forward(lambda: socket.create_connection(("127.0.0.1", dead_port), 2))
    reader, writer = await asyncio.open_connection("127.0.0.1", await fwd.start())
    assert await asyncio.wait_for(reader.read(), 5) == b"", "the connection is closed, not left hanging"
    writer.close()
    await fwd.close()

    hold = asyncio.Event()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hold.wait()
        w.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    up = server.sockets[0].getsockname()[1]
    fwd = Forward(lambda: socket.create_connection(("127.0.0.1", up), 2))
    reader, writer = await asyncio.open_connection("127.0.0.1", await fwd.start())
    writer.write(b"x")
    await asyncio.sleep(0.2)  # connected through
    await asyncio.wait_for(fwd.close(), 6)
    assert await asyncio.wait_for(reader.read(), 5) == b"", "close() ended the open connection"
    writer.close()
    hold.set()
    server.close()
