"""spanutil.minihttp against real sockets on 127.0.0.1: routing, methods, limits, keep-alive, timeouts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from spanutil import minihttp
from spanutil.minihttp import Request, Response, Server

Reply = tuple[int, dict[str, str], bytes]


async def hello(req: Request) -> Response:
    return Response.text(f"hello {req.method} {req.query}\n")


async def boom(_: Request) -> Response:
    raise RuntimeError("secret-ish detail")


async def data(_: Request) -> Response:
    return Response.json({"a": [1, 2]}, status=503)


ROUTES = {"/hello": hello, "/boom": boom, "/data": data}


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(ROUTES)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()


async def read_reply(reader: asyncio.StreamReader, *, head_only: bool = False) -> Reply:
    """One response from ``reader``: status, headers (lower-case names), body (by Content-Length)."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    lines = head.split("\r\n")
    assert lines[0].startswith("HTTP/1.1 ")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    length = 0 if head_only else int(headers["content-length"])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return status, headers, body


async def request(port: int, raw: bytes, *, head_only: bool = False) -> tuple[Reply, bytes]:
    """Send ``raw`` on a new connection; the reply and whatever follows until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        reply = await read_reply(reader, head_only=head_only)
        rest = await asyncio.wait_for(reader.read(), 5)
        return reply, rest
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True


async def test_get_routes_ignore_the_query_and_close_on_request(server: Server) -> None:
    (status, headers, body), rest = await request(
        server.port, b"GET /hello?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert (status, body, rest) == (200, b"hello GET x=1\n", b"")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close"


async def test_json_response_keeps_status_and_type(server: Server) -> None:
    (status, headers, body), _ = await request(
        server.port, b"GET /data HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert (status, headers["content-type"], body) == (
        503,
        "application/json; charset=utf-8",
        b'{"a": [1, 2]}',
    )


async def test_head_sends_the_headers_of_get_without_a_body(server: Server) -> None:
    (status, headers, _), rest = await request(
        server.port, b"HEAD /hello HTTP/1.1\r\nConnection: close\r\n\r\n", head_only=True
    )
    assert status == 200
    assert headers["content-length"] == str(len(b"hello HEAD \n"))
    assert rest == b""  # no body bytes after the head


async def test_unknown_path_404_and_other_method_405_with_allow(server: Server) -> None:
    (status, _, body), _ = await request(server.port, b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert (status, body) == (404, b"404: Not Found")
    (status, headers, _), _ = await request(
        server.port, b"DELETE /hello HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    (status, _, _), _ = await request(server.port, b"get /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status == 405  # methods are case-sensitive (RFC 9110 9.1)


async def test_oversized_head_and_too_many_headers_get_431(server: Server) -> None:
    big = b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * minihttp.MAX_HEAD + b"\r\n\r\n"
    (status, _, _), rest = await request(server.port, big)
    assert (status, rest) == (431, b"")
    many = (
        b"GET /hello HTTP/1.1\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(minihttp.MAX_HEADERS + 1))
        + b"\r\n"
    )
    (status, _, _), rest = await request(server.port, many)
    assert (status, rest) == (431, b"")
    # exactly at the header count limit is served
    ok = b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(minihttp.MAX_HEADERS - 1))
    (status, _, _), _ = await request(server.port, ok + b"Connection: close\r\n\r\n")
    assert status == 200


async def test_bodies_small_discarded_large_413_chunked_501(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /hello HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcdeGET /hello?2 HTTP/1.1\r\n\r\n")
        assert (await read_reply(reader))[2] == b"hello GET \n"
        assert (await read_reply(reader))[2] == b"hello GET 2\n"  # the body was not taken for a request
    finally:
        writer.close()
    big = b"GET /hello HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (minihttp.MAX_BODY + 1)
    (status, _, _), rest = await request(server.port, big)
    assert (status, rest) == (413, b"")
    chunked = b"GET /hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    (status, _, _), rest = await request(server.port, chunked)
    assert (status, rest) == (501, b"")
    (status, _, _), _ = await request(server.port, b"GET /hello HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
    assert status == 400


async def test_bad_request_line_400_and_unknown_version_505(server: Server) -> None:
    (status, _, _), _ = await request(server.port, b"GET /hello\r\n\r\n")
    assert status == 400
    (status, _, _), _ = await request(server.port, b"GET /hello HTTP/2.0\r\n\r\n")
    assert status == 505
    (status, _, _), _ = await request(server.port, b"GET /hello HTTP/1.1\r\nBad Header: x\r\n\r\n")
    assert status == 400


async def test_keep_alive_serves_two_requests_on_one_connection(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /hello?1 HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = await read_reply(reader)
        assert (status, body) == (200, b"hello GET 1\n")
        assert "connection" not in headers
        writer.write(b"GET /hello?2 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await read_reply(reader))[2] == b"hello GET 2\n"
        assert server.connections == 1
    finally:
        writer.close()


async def test_http10_closes_unless_keep_alive_is_asked(server: Server) -> None:
    (status, headers, body), rest = await request(server.port, b"GET /hello HTTP/1.0\r\n\r\n")
    assert (status, body, rest, headers["connection"]) == (200, b"hello GET \n", b"", "close")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /hello?1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await read_reply(reader)
        assert headers["connection"] == "keep-alive"
        writer.write(b"GET /hello?2 HTTP/1.0\r\n\r\n")
        assert (await read_reply(reader))[2] == b"hello GET 2\n"
        assert await closed_by_server(reader, 5)
    finally:
        writer.close()


async def test_idle_and_slow_header_connections_are_closed() -> None:
    srv = Server(ROUTES, idle_timeout=0.3, header_timeout=0.3)
    await srv.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /hello HTTP/1.1\r\n\r\n")
        assert (await read_reply(reader))[0] == 200
        assert await closed_by_server(reader, 3)  # idle after a request
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost:")  # never finishes its headers
        assert await closed_by_server(reader, 3)
        writer.close()
        await asyncio.sleep(0.05)
        assert srv.connections == 0
    finally:
        await srv.stop()


async def test_connections_beyond_the_limit_are_closed() -> None:
    srv = Server(ROUTES, max_connections=2)
    await srv.start("127.0.0.1", 0)
    writers = []
    try:
        held = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]
        writers += [w for _, w in held]
        for _ in range(50):
            if srv.connections == 2:
                break
            await asyncio.sleep(0.02)
        assert srv.connections == 2
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writers.append(writer)
        writer.write(b"GET /hello HTTP/1.1\r\n\r\n")
        assert await closed_by_server(reader, 3)
        # the held ones still work, and a slot freed is usable again
        r0, w0 = held[0]
        w0.write(b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert (await read_reply(r0))[0] == 200
        assert await closed_by_server(r0, 3)
        await asyncio.sleep(0.05)
        (status, _, _), _ = await request(srv.port, b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status == 200
    finally:
        for w in writers:
            w.close()
        await srv.stop()


async def test_handler_error_is_500_logged_and_the_server_goes_on(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        with caplog.at_level(logging.ERROR, logger="spanutil.minihttp"):
            writer.write(b"GET /boom HTTP/1.1\r\n\r\n")
            status, _, body = await read_reply(reader)
        assert (status, body) == (500, b"500: Internal Server Error")
        assert b"secret-ish" not in body
        assert any(r.getMessage() == "http handler failed" for r in caplog.records)
        writer.write(b"GET /hello HTTP/1.1\r\n\r\n")  # same connection
        assert (await read_reply(reader))[0] == 200
    finally:
        writer.close()


async def test_stop_closes_open_connections_and_the_listener() -> None:
    srv = Server(ROUTES)
    await srv.start("127.0.0.1", 0)
    port = srv.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\n\r\n")
    assert (await read_reply(reader))[0] == 200
    await asyncio.wait_for(srv.stop(), 5)
    assert await closed_by_server(reader, 3)
    writer.close()
    assert not srv.started and srv.connections == 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await srv.stop()  # idempotent


async def test_a_failed_start_leaves_the_server_stopped(server: Server) -> None:
    other = Server(ROUTES)
    with pytest.raises(OSError):
        # SO_REUSEADDR does not allow two listeners on one port
        await other.start("127.0.0.1", server.port)
    assert not other.started
    with pytest.raises(RuntimeError):
        _ = other.port
    await other.stop()
    await other.start("127.0.0.1", 0)  # and it can start later
    assert other.started
    await other.stop()
