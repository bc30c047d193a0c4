"""Health probes against local fakes: exec (fake processes), TCP and HTTP (loopback servers)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from machined.services import Command, HealthCheck, probe
from machined.services.fake import FakeSpawner, exits, fails_to_spawn, hangs


async def test_exec_healthy_on_exit_zero_and_runs_with_the_service_env():
    sp = FakeSpawner()
    sp.program("check", exits(0, "all good"))
    ok, msg = await probe(
        HealthCheck.exec("check", "--quick"), spawner=sp, base=Command(("svc",), {"A": "1"}, "/tmp", None)
    )
    assert ok and msg == "all good"
    assert sp.commands[0] == Command(("check", "--quick"), {"A": "1"}, "/tmp", None)


async def test_exec_unhealthy_reports_code_and_last_output_line():
    sp = FakeSpawner()
    sp.program("check", exits(3, "connecting", stderr=["no leader"]))
    ok, msg = await probe(HealthCheck.exec("check"), spawner=sp)
    assert not ok
    assert msg.startswith("exec check: exit code 3")


async def test_exec_that_hangs_times_out_and_is_killed():
    sp = FakeSpawner()
    sp.program("check", hangs(ignore_sigterm=True))
    ok, msg = await probe(HealthCheck.exec("check", timeout=0.05), spawner=sp)
    assert not ok and "timed out after 0.05s" in msg
    assert sp.spawned[0].signals == [signal.SIGKILL] and not sp.spawned[0].alive


async def test_exec_that_cannot_start_is_unhealthy():
    sp = FakeSpawner()
    sp.program("check", fails_to_spawn("executable 'check' not found"))
    ok, msg = await probe(HealthCheck.exec("check"), spawner=sp)
    assert not ok and "not found" in msg


@pytest.fixture
async def tcp_server() -> AsyncIterator[int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()


async def test_tcp_healthy_when_the_port_accepts(tcp_server):
    assert await probe(HealthCheck.tcp("127.0.0.1", tcp_server), spawner=FakeSpawner()) == (True, "")


async def test_tcp_unhealthy_when_refused():
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    ok, msg = await probe(HealthCheck.tcp("127.0.0.1", port), spawner=FakeSpawner())
    assert not ok and f"tcp 127.0.0.1:{port}" in msg


@pytest.fixture
async def http_server() -> AsyncIterator[str]:
    """A tiny HTTP/1.0 server: GET /ok -> 200, /redirect -> 302, /slow hangs, anything else -> 503."""

    release = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await r.readline()
        while (await r.readline()) not in (b"\r\n", b""):
            pass
        path = request.split()[1].decode()
        if path == "/slow":
            await release.wait()
        status = {"/ok": "200 OK", "/redirect": "302 Found"}.get(path, "503 Service Unavailable")
        extra = "Location: /ok\r\n" if path == "/redirect" else ""
        w.write(f"HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    release.set()
    srv.close()
    await srv.wait_closed()


async def test_http_status_decides(http_server):
    sp = FakeSpawner()
    assert await probe(HealthCheck.http(f"{http_server}/ok"), spawner=sp) == (True, "HTTP 200")
    assert await probe(HealthCheck.http(f"{http_server}/redirect"), spawner=sp) == (True, "HTTP 302")
    ok, msg = await probe(HealthCheck.http(f"{http_server}/down"), spawner=sp)
    assert not ok and msg.endswith("HTTP 503")
    ok, msg = await probe(HealthCheck.http(f"{http_server}/slow", timeout=0.1), spawner=sp)
    assert not ok and "timed out" in msg
