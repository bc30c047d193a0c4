"""The relay control protocol (kubespan.relay.control): the strict codec against malformed and hostile
input, and the server and client over loopback, distinct 127.0.0.x addresses standing for mesh addresses."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from kubespan.relay.control import (
    HEADER,
    MAX_MESSAGE,
    MAX_TEXT,
    ControlServer,
    DecodeError,
    ErrorCode,
    Grant,
    Message,
    MsgType,
    Notice,
    Refusal,
    RelayClient,
    RelayRefused,
    RelayTimeout,
    decode,
    encode,
)
from kubespan.wireguard.types import PublicKey

RELAY, A, B, STRANGER = "127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13"
KA, KB, KR = PublicKey(b"\x0a" * 32), PublicKey(b"\x0b" * 32), PublicKey(b"\x0f" * 32)


def key(n: int) -> PublicKey:
    return PublicKey(bytes([n]) * 32)


# -- codec -------------------------------------------------------------------------------------------

SAMPLES = [
    Message(MsgType.ALLOCATE, 1, peer=KB),
    Message(MsgType.ALLOCATED, 2, peer=KB, port=40000, lifetime=180),
    Message(MsgType.RELEASE, 3, peer=KB),
    Message(MsgType.RELEASED, 4, peer=KB),
    Message(MsgType.PING, 5),
    Message(MsgType.PONG, 0xFFFFFFFF),
    Message(MsgType.NOTIFY, 7, peer=KA, port=1, lifetime=2**32 - 1),
    Message(MsgType.NOTIFIED, 8, peer=KA, port=65535),
    Message(MsgType.ERROR, 9, code=ErrorCode.RELAY_FULL, text="relay full: 256 allocations"),
    Message(MsgType.ERROR, 10, code=255, text="é" * (MAX_TEXT // 2)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type.name)
def test_every_message_round_trips(msg: Message) -> None:
    data = encode(msg)
    assert data[:4] == b"KR\x01" + bytes([msg.type])
    assert len(data) <= MAX_MESSAGE
    assert decode(data) == msg


@pytest.mark.parametrize("msg", [m for m in SAMPLES if m.type != MsgType.ERROR], ids=lambda m: m.type.name)
def test_a_fixed_layout_with_a_byte_more_or_less_is_refused(msg: Message) -> None:
    data = encode(msg)
    with pytest.raises(DecodeError, match="body must be"):
        decode(data + b"\x00")
    if len(data) > HEADER.size:
        with pytest.raises(DecodeError, match="body must be"):
            decode(data[:-1])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "below the header"),
        (b"KR\x01\x05\x00\x00\x00", "below the header"),
        (b"XX\x01\x05\x00\x00\x00\x01", "magic"),
        (b"KR\x02\x05\x00\x00\x00\x01", "version must be 1, not 2"),
        (b"KR\x01\x00\x00\x00\x00\x01", "type 0"),
        (b"KR\x01\x0a\x00\x00\x00\x01", "type 10"),
        (b"KR\x01\x09\x00\x00\x00\x01\x01", "ERROR body"),
        (b"KR\x01\x09\x00\x00\x00\x01\x00\x00", "code must be 1-255, not 0"),
        (b"KR\x01\x09\x00\x00\x00\x01\x01\x05abc", "text length 5"),
        (b"KR\x01\x09\x00\x00\x00\x01\x01\x02\xff\xfe", "not UTF-8"),
        (b"KR\x01\x02\x00\x00\x00\x01" + bytes(32) + b"\x00\x00" + bytes(4), "port must be 1-65535, not 0"),
        (b"KR\x01\x05" + bytes(4) + bytes(MAX_MESSAGE), "above the maximum"),
    ],
)
def test_malformed_datagrams_are_refused_with_the_field_named(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(data)


def test_an_error_text_longer_than_the_limit_cannot_be_encoded_or_decoded() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_TEXT} bytes"):
        encode(Message(MsgType.ERROR, 1, code=1, text="x" * (MAX_TEXT + 1)))
    forged = HEADER.pack(b"KR", 1, MsgType.ERROR, 1) + bytes([1, 200]) + b"x" * 200
    with pytest.raises(DecodeError):
        decode(forged)


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Message(MsgType.ALLOCATE, 1), "peer is required"),
        (Message(MsgType.ALLOCATED, 1, peer=KB, port=0), "port must be 1-65535"),
        (Message(MsgType.NOTIFY, 1, peer=KB, port=70000), "port must be 1-65535"),
        (Message(MsgType.NOTIFY, 1, peer=KB, port=1, lifetime=-1), "lifetime"),
        (Message(MsgType.PING, 2**32), "request_id"),
        (Message(MsgType.ERROR, 1, code=0), "code must be 1-255"),
    ],
)
def test_encode_refuses_out_of_bounds_fields(msg: Message, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(msg)


def test_random_and_mutated_input_only_ever_raises_decode_error() -> None:
    rng = random.Random(14)
    valid = [encode(m) for m in SAMPLES]
    for _ in range(20_000):
        if rng.random() < 0.5:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        else:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[: rng.randrange(len(data) + 1)])
        try:
            msg = decode(data)
        except DecodeError:
            continue
        assert encode(msg) == data  # whatever decodes is canonical


# -- server and client over loopback ------------------------------------------------------------------


@dataclass
class FakeHandler:
    """A relay that grants fixed ports (or refuses), recording requests."""

    calls: list[tuple[str, PublicKey, PublicKey]] = field(default_factory=list)
    refuse: Refusal | None = None
    fail: bool = False

    async def allocate(self, requester: PublicKey, peer: PublicKey) -> Grant:
        self.calls.append(("allocate", requester, peer))
        if self.refuse is not None:
            raise self.refuse
        if self.fail:
            raise RuntimeError("boom")
        return Grant(40001, 40002, 180)

    async def release(self, requester: PublicKey, peer: PublicKey) -> bool:
        self.calls.append(("release", requester, peer))
        return True


@dataclass
class Mesh:
    server: ControlServer
    handler: FakeHandler
    a: RelayClient
    b: RelayClient
    notices: list[Notice]


def directory(clients: dict[PublicKey, tuple[str, int]]) -> tuple[object, object]:
    """``who`` over the fixed addresses and ``where`` over the clients' bound addresses, filled in later."""
    addrs = {A: KA, B: KB, RELAY: KR}

    def who(addr: str) -> PublicKey | None:
        return addrs.get(addr)

    def where(k: PublicKey) -> tuple[str, int] | None:
        return clients.get(k)

    return who, where


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    handler = FakeHandler()
    clients: dict[PublicKey, tuple[str, int]] = {}
    who, where = directory(clients)
    server = ControlServer(RELAY, handler, who, where, port=0, notify_interval=0.1, notify_attempts=3)  # type: ignore[arg-type]
    await server.start()
    notices: list[Notice] = []
    relay_port = server.address[1]
    a = RelayClient(A, port=0, relay_port=relay_port, who=who, on_notify=notices.append)  # type: ignore[arg-type]
    b = RelayClient(B, port=0, relay_port=relay_port, who=who, on_notify=notices.append)  # type: ignore[arg-type]
    await a.start()
    await b.start()
    clients.update({KA: a.address, KB: b.address})
    try:
        yield Mesh(server, handler, a, b, notices)
    finally:
        await a.stop()
        await b.stop()
        await server.stop()


async def wait_for(cond: object, within: float = 2.0) -> None:
    for _ in range(int(within / 0.01)):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_allocate_answers_the_requester_and_notifies_the_peer(mesh: Mesh) -> None:
    got = await mesh.a.allocate(RELAY, KB, timeout=2)
    assert (got.port, got.lifetime) == (40001, 180)
    assert mesh.handler.calls == [("allocate", KA, KB)]
    await wait_for(lambda: mesh.notices)
    assert mesh.notices == [Notice(KR, RELAY, KA, 40002, 180)]
    await wait_for(lambda: mesh.server.counters.notify_acked == 1)
    assert mesh.server.counters.notify_sent == 1 and mesh.server.counters.notify_failed == 0


async def test_ping_measures_a_round_trip(mesh: Mesh) -> None:
    rtt = await mesh.a.ping(RELAY, timeout=1)
    assert 0 < rtt < 1
    assert mesh.server.counters.requests["PING"] == 1


async def test_a_request_from_an_unknown_source_is_refused() -> None:
    handler = FakeHandler()
    clients: dict[PublicKey, tuple[str, int]] = {}
    who, where = directory(clients)
    server = ControlServer(RELAY, handler, who, where, port=0)  # type: ignore[arg-type]
    await server.start()
    stranger = RelayClient(STRANGER, port=0, relay_port=server.address[1])
    await stranger.start()
    try:
        with pytest.raises(RelayRefused, match="unknown_source") as e:
            await stranger.allocate(RELAY, KB, timeout=1)
        assert e.value.code == ErrorCode.UNKNOWN_SOURCE
        with pytest.raises(RelayRefused, match="unknown_source"):
            await stranger.ping(RELAY, timeout=1)
        assert handler.calls == []
        assert server.counters.refused == {"unknown_source": 2}
    finally:
        await stranger.stop()
        await server.stop()


async def test_a_request_for_an_unknown_peer_or_oneself_is_refused(mesh: Mesh) -> None:
    with pytest.raises(RelayRefused, match="unknown_peer"):
        await mesh.a.allocate(RELAY, key(0x33), timeout=1)
    with pytest.raises(RelayRefused, match="unknown_peer: the peer is the requester"):
        await mesh.a.allocate(RELAY, KA, timeout=1)
    assert mesh.handler.calls == []


async def test_the_handlers_refusal_and_failure_become_errors(mesh: Mesh) -> None:
    mesh.handler.refuse = Refusal(ErrorCode.RELAY_FULL, "relay full")
    with pytest.raises(RelayRefused, match="relay_full: relay full") as e:
        await mesh.a.allocate(RELAY, KB, timeout=1)
    assert e.value.code == ErrorCode.RELAY_FULL
    mesh.handler.refuse, mesh.handler.fail = None, True
    with pytest.raises(RelayRefused, match="internal: internal error: RuntimeError"):
        await mesh.a.allocate(RELAY, KB, timeout=1)
    assert mesh.notices == []
    assert await mesh.a.ping(RELAY) > 0  # the server lives on


async def test_release_is_answered(mesh: Mesh) -> None:
    await mesh.a.release(RELAY, KB, timeout=1)
    assert mesh.handler.calls == [("release", KA, KB)]


async def test_a_notify_is_retried_until_acknowledged_and_delivered_once(mesh: Mesh) -> None:
    """B's client is down for the first NOTIFY: the relay resends; B acknowledges and delivers once."""
    b_addr = mesh.b.address
    await mesh.b.stop()
    task = asyncio.create_task(mesh.a.allocate(RELAY, KB, timeout=2))
    await wait_for(lambda: mesh.server.counters.notify_sent >= 1)
    late = RelayClient(
        B, port=b_addr[1], relay_port=mesh.server.address[1], who=mesh.b.who, on_notify=mesh.notices.append
    )
    await late.start()
    try:
        await task
        await wait_for(lambda: mesh.server.counters.notify_acked == 1)
        assert mesh.server.counters.notify_sent >= 2
        assert mesh.notices == [Notice(KR, RELAY, KA, 40002, 180)]
    finally:
        await late.stop()


async def test_an_unacknowledged_notify_gives_up_after_its_attempts(mesh: Mesh) -> None:
    await mesh.b.stop()
    await mesh.a.allocate(RELAY, KB, timeout=1)
    await wait_for(lambda: mesh.server.counters.notify_failed == 1)
    assert mesh.server.counters.notify_sent == 3 and mesh.server.counters.notify_acked == 0


async def test_a_repeated_notify_is_acknowledged_again_but_delivered_once(mesh: Mesh) -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((RELAY, 0))  # the relay's mesh address: known to B's client as KR
    raw.settimeout(1)
    try:
        notice = encode(Message(MsgType.NOTIFY, 77, peer=KA, port=41000, lifetime=60))
        for _ in range(3):
            raw.sendto(notice, mesh.b.address)
            ack = decode(await asyncio.to_thread(raw.recv, 100))
            assert ack == Message(MsgType.NOTIFIED, 77, peer=KA, port=41000)
        assert mesh.notices == [Notice(KR, RELAY, KA, 41000, 60)]
    finally:
        raw.close()


async def test_notify_from_an_unknown_source_is_ignored_and_not_acknowledged(mesh: Mesh) -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((STRANGER, 0))
    raw.settimeout(0.2)
    try:
        raw.sendto(encode(Message(MsgType.NOTIFY, 1, peer=KA, port=41000, lifetime=60)), mesh.b.address)
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(raw.recv, 100)
        assert mesh.notices == [] and mesh.b.ignored == 1
    finally:
        raw.close()


async def test_garbage_and_forged_replies_are_ignored(mesh: Mesh) -> None:
    """Junk and answers sent to the server are counted and unanswered (an answer to an answer could loop
    between two servers); a reply from another address than the relay's does not complete a request."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((A, 0))
    raw.settimeout(0.2)
    try:
        answers = [
            Message(MsgType.PONG, 1),
            Message(MsgType.ERROR, 2, code=ErrorCode.INTERNAL, text="x"),
            Message(MsgType.ALLOCATED, 3, peer=KB, port=9, lifetime=1),
            Message(MsgType.NOTIFY, 4, peer=KB, port=9, lifetime=1),
        ]
        for data in (b"", os.urandom(50), b"KR\x02" + bytes(20), *map(encode, answers)):
            raw.sendto(data, mesh.server.address)
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(raw.recv, 200)
    finally:
        raw.close()
    assert mesh.server.counters.malformed == 3
    assert mesh.server.counters.refused == {"not_a_request": 4}

    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forger.bind((STRANGER, 0))
    await mesh.server.stop()  # the relay is gone: only a forged reply could answer
    task = asyncio.create_task(mesh.a.ping(RELAY, timeout=0.5))
    await asyncio.sleep(0.05)
    (rid,) = mesh.a._pending
    forger.sendto(encode(Message(MsgType.PONG, rid)), mesh.a.address)
    forger.close()
    with pytest.raises(RelayTimeout):
        await task


async def test_a_stopped_relay_times_out_and_an_allocate_is_resent_meanwhile(mesh: Mesh) -> None:
    relay_port = mesh.server.address[1]
    await mesh.server.stop()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((RELAY, relay_port))
    sink.settimeout(0.05)
    try:
        with pytest.raises(RelayTimeout, match=r"within 0\.5 s"):
            await mesh.a.allocate(RELAY, KB, timeout=0.5, retry=0.1)
        seen = []
        while True:
            try:
                seen.append(decode(sink.recv(100)))
            except TimeoutError:
                break
        assert 4 <= len(seen) <= 6 and len({m.request_id for m in seen}) == 1
    finally:
        sink.close()


async def test_the_control_sockets_never_bind_a_wildcard() -> None:
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="mesh address, not the wildcard"):
            ControlServer(host, FakeHandler(), lambda _a: None, lambda _k: None)
        with pytest.raises(ValueError, match="mesh address, not the wildcard"):
            RelayClient(host)
    with pytest.raises(ValueError, match="must be an IP address"):
        RelayClient("relay.example")


async def test_requests_beyond_the_inflight_limit_are_dropped(mesh: Mesh) -> None:
    gate = asyncio.Event()

    async def slow(requester: PublicKey, peer: PublicKey) -> Grant:
        await gate.wait()
        return Grant(40001, 40002, 180)

    mesh.handler.allocate = slow  # type: ignore[method-assign]
    mesh.server.max_inflight = 1
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((A, 0))
    try:
        for rid in range(5):
            raw.sendto(encode(Message(MsgType.ALLOCATE, rid, peer=KB)), mesh.server.address)
        await wait_for(lambda: mesh.server.counters.refused.get("busy") == 4)
        gate.set()
    finally:
        raw.close()


def test_header_layout_is_eight_bytes() -> None:
    assert HEADER.size == 8
    assert struct.pack("!2sBBI", b"KR", 1, 5, 9) == encode(Message(MsgType.PING, 9))


async def test_a_long_refusal_text_is_clipped_to_the_limit(mesh: Mesh) -> None:
    mesh.handler.refuse = Refusal(ErrorCode.INTERNAL, "é" * 100)  # 200 bytes of UTF-8
    with pytest.raises(RelayRefused) as e:
        await mesh.a.allocate(RELAY, KB, timeout=1)
    assert e.value.text == "é" * (MAX_TEXT // 2)


async def test_the_sockets_can_be_held_to_one_link() -> None:
    """``device``: SO_BINDTODEVICE to the mesh link (here lo); a missing link is a clear error."""
    clients: dict[PublicKey, tuple[str, int]] = {}
    who, where = directory(clients)
    server = ControlServer(RELAY, FakeHandler(), who, where, port=0, device="lo")  # type: ignore[arg-type]
    await server.start()
    client = RelayClient(A, port=0, relay_port=server.address[1], device="lo")
    await client.start()
    try:
        assert await client.ping(RELAY, timeout=1) > 0
    finally:
        await client.stop()
        await server.stop()
    with pytest.raises(OSError, match="on device nosuchlink0"):
        await RelayClient(A, port=0, device="nosuchlink0").start()
