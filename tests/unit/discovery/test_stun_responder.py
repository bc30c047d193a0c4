"""The discovery service's STUN responder on loopback: it answers Binding requests with the source it
saw, drops everything else, limits each source with a fixed-size table, never amplifies by more than a
few bytes, and is wired into ``discovery-service --stun-addr`` with its counter in /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from discovery.server import main as server_main
from discovery.server.stun import (
    IP_PKTINFO,
    MAX_GROWTH,
    RateTable,
    StunMetrics,
    StunResponder,
    reply_source,
    serve,
)
from spanutil import stun
from spanutil.testing import ManualClock

V4 = ("192.0.2.10", 40000)


def unlimited() -> StunResponder:
    return StunResponder(RateTable(0), RateTable(0))


def test_reply_carries_the_source_and_a_fingerprint():
    r = unlimited()
    txid = stun.new_transaction_id()
    out = r.reply(stun.binding_request(txid), V4)
    assert out is not None and stun.parse(out).fingerprint
    assert str(stun.parse_binding_response(out, txid)) == "192.0.2.10:40000"
    assert (r.answered, sum(r.dropped.values())) == (1, 0)


def test_ipv4_mapped_sources_are_answered_as_ipv4_and_ipv6_as_ipv6():
    r = unlimited()
    txid = stun.new_transaction_id()
    out = r.reply(stun.binding_request(txid), ("::ffff:192.0.2.10", 5, 0, 0))
    assert out is not None and stun.parse_binding_response(out, txid).ip.version == 4
    out = r.reply(stun.binding_request(txid), ("2001:db8::7", 6, 0, 0))
    assert out is not None
    assert stun.parse_binding_response(out, txid) == (ipaddress.IPv6Address("2001:db8::7"), 6)


@pytest.mark.parametrize("fingerprint", [False, True])
@pytest.mark.parametrize("src", [V4, ("2001:db8::7", 6, 0, 0)])
def test_no_reply_is_much_larger_than_its_request(fingerprint, src):
    req = stun.binding_request(fingerprint=fingerprint)
    out = unlimited().reply(req, src)
    assert out is not None and len(out) <= len(req) + MAX_GROWTH


def _with_attr(atype: int, value: bytes) -> bytes:
    txid = stun.new_transaction_id()
    body = struct.pack("!HH", atype, len(value)) + value + b"\0" * (-len(value) % 4)
    return struct.pack("!HHI", stun.BINDING_REQUEST, len(body), stun.MAGIC_COOKIE) + txid + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"\x01\x00\x00\x00" + b"\0" * 144, "malformed"),  # a WireGuard handshake initiation
        (stun.binding_request()[:-1], "malformed"),
        (stun.binding_request()[:-1] + b"\0", "malformed"),  # FINGERPRINT does not match
        (stun.binding_success(b"\0" * 12, (ipaddress.IPv4Address("192.0.2.1"), 9)), "not_binding"),
        (b"\x00\x11" + stun.binding_request(fingerprint=False)[2:], "not_binding"),  # Binding indication
        (_with_attr(0x0006, b"user:name"), "unsupported"),  # USERNAME: credentials we do not have
        (_with_attr(0x0003, b"\0\0\0\x06"), "unsupported"),  # CHANGE-REQUEST (RFC 3489 / 5780)
    ],
)
def test_everything_else_is_dropped_and_counted(data, reason):
    r = unlimited()
    assert r.reply(data, V4) is None
    assert r.answered == 0 and r.dropped[reason] == 1


def test_source_port_zero_is_not_answered():
    r = unlimited()
    assert r.reply(stun.binding_request(), ("192.0.2.10", 0)) is None and r.dropped["malformed"] == 1


def test_optional_attributes_in_a_request_are_fine():
    assert unlimited().reply(_with_attr(0x8022, b"client 1.0"), V4) is not None


def test_rate_limit_per_source_refills_over_time():
    clock = ManualClock()
    r = StunResponder(RateTable(rate=2, burst=3, clock=clock), RateTable(0))
    req = stun.binding_request()
    assert [r.reply(req, V4) is not None for _ in range(5)] == [True, True, True, False, False]
    assert r.reply(req, ("192.0.2.11", 1)) is not None  # another source has its own bucket
    clock.t += 1.0  # two tokens back
    assert [r.reply(req, V4) is not None for _ in range(3)] == [True, True, False]
    assert r.dropped["rate_limited"] == 3


def test_ipv6_sources_are_limited_per_64():
    r = StunResponder(RateTable(rate=1, burst=2, clock=ManualClock()), RateTable(0))
    req = stun.binding_request()
    got = [r.reply(req, (f"2001:db8:1:2::{i:x}", 1, 0, 0)) is not None for i in range(1, 5)]
    assert got == [True, True, False, False]
    assert r.reply(req, ("2001:db8:1:3::1", 1, 0, 0)) is not None


def test_rate_table_has_a_fixed_size_whatever_the_sources():
    table = RateTable(rate=1, burst=1, slots=64, clock=ManualClock())
    for i in range(10_000):
        table.allow(i.to_bytes(4, "big"))
    assert len(table._tokens) == len(table._stamp) == 64


def test_global_limit_caps_all_sources_together():
    r = StunResponder(RateTable(0), RateTable(rate=1, burst=3, slots=1, clock=ManualClock()))
    req = stun.binding_request()
    answered = [r.reply(req, (f"192.0.2.{i}", 1)) is not None for i in range(1, 7)]
    assert answered == [True, True, True, False, False, False]


def test_metrics_sum_the_responders():
    reg = CollectorRegistry()
    metrics = StunMetrics(reg)
    a, b = unlimited(), unlimited()
    metrics.responders += [a, b]
    a.reply(stun.binding_request(), V4)
    b.reply(stun.binding_request(), V4)
    b.reply(b"junk", V4)
    text = generate_latest(reg).decode()
    assert 'discovery_stun_requests_total{result="answered"} 2.0' in text
    assert 'discovery_stun_requests_total{result="malformed"} 1.0' in text


async def _ask(host: str, port: int, family: int = socket.AF_INET, wait: float = 2.0) -> stun.Mapped:
    loop = asyncio.get_running_loop()
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.bind((host, 0))
        txid = stun.new_transaction_id()
        await loop.sock_sendto(s, stun.binding_request(txid), (host, port))
        data = await asyncio.wait_for(loop.sock_recv(s, 2048), wait)
        mapped = stun.parse_binding_response(data, txid)
        assert mapped.port == s.getsockname()[1]
        return mapped


async def test_responder_answers_over_loopback():
    responder = unlimited()
    transport, port = await serve("127.0.0.1", 0, responder)
    try:
        assert str((await _ask("127.0.0.1", port)).ip) == "127.0.0.1"
        assert responder.answered == 1
    finally:
        transport.close()


async def test_dual_stack_listener_answers_ipv4_as_ipv4():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    responder = unlimited()
    try:
        transport, port = await serve("::", 0, responder)
    except OSError as e:
        pytest.skip(f"no IPv6 socket: {e}")
    try:
        assert str((await _ask("127.0.0.1", port)).ip) == "127.0.0.1"
        with contextlib.suppress(OSError):  # loopback ::1 may be absent in a container
            assert str((await _ask("::1", port, socket.AF_INET6)).ip) == "::1"
    finally:
        transport.close()


def test_flags():
    ns = server_main.parse_args(["--stun-addr", "127.0.0.1:3478", "--stun-addr", ":3479"])
    assert ns.stun_addr == ["127.0.0.1:3478", ":3479"]
    assert server_main.parse_args([]).stun_addr == []
    assert server_main.parse_args(["--stun-addr", ""]).stun_addr == []
    assert "--stun-addr" in server_main.build_parser().format_help()
    for bad in (["--stun-addr", "3478"], ["--stun-rate-limit", "-1"], ["--stun-rate-burst", "0"]):
        with pytest.raises(SystemExit):
            server_main.parse_args(bad)


async def test_daemon_serves_stun_and_counts_it():
    ns = server_main.parse_args(
        [
            "--addr", "127.0.0.1:0",
            "--landing-addr", "",
            "--metrics-addr", "",
            "--snapshot-path", "",
            "--stun-addr", "127.0.0.1:0",
            "--stun-addr", "127.0.0.1:0",
            "--stun-rate-burst", "2",
            "--no-rpc-log",
        ]
    )  # fmt: skip
    daemon = server_main.Daemon(ns)
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(10):
            while "stun1" not in daemon.ports:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        one, two = daemon.ports["stun"], daemon.ports["stun1"]
        assert one != two
        await _ask("127.0.0.1", one)
        await _ask("127.0.0.1", two)
        with pytest.raises(TimeoutError):  # the burst (2) is shared by both listeners
            await _ask("127.0.0.1", one, wait=0.3)
        text = generate_latest(daemon.metrics.registry).decode()
        assert 'discovery_stun_requests_total{result="answered"} 2.0' in text
        assert 'discovery_stun_requests_total{result="rate_limited"} 1.0' in text
    finally:
        daemon.stopping.set()
        assert await asyncio.wait_for(task, 15) == 0
    assert daemon._stun == []


def test_reply_source_echoes_the_address_asked():
    v4 = struct.pack("=i4s4s", 3, bytes([10, 1, 0, 2]), bytes([10, 1, 0, 255]))
    assert reply_source([(socket.IPPROTO_IP, IP_PKTINFO, v4)]) == [
        (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, bytes([10, 1, 0, 2]), bytes(4)))
    ]
    glob = ipaddress.IPv6Address("2001:db8::2").packed
    local = ipaddress.IPv6Address("fe80::2").packed
    v6 = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16si", glob, 7))]
    assert reply_source(v6)[0][2] == struct.pack("=16si", glob, 0)  # any interface may carry it
    v6 = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16si", local, 7))]
    assert reply_source(v6)[0][2] == struct.pack("=16si", local, 7)  # link-local: its interface
    assert reply_source([]) == [] and reply_source([(socket.IPPROTO_IP, IP_PKTINFO, b"short")]) == []
