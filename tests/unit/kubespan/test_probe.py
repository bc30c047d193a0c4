"""ICMPv6 probe codec and reply handling (no raw socket needed)."""

from __future__ import annotations

import ipaddress
import struct

from kubespan.probe import ECHO_REPLY, Prober, echo_request, parse_echo_reply

PEER = ("fd00::9", 0, 0, 0)  # a recvfrom address: host, port (raw: the protocol), flow info, scope


class FakeSock:
    """Packets arrive from PEER, or from the (packet, address) given."""

    def __init__(self, packets: list[bytes | tuple[bytes, tuple[object, ...]]]) -> None:
        self.packets = packets
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def recvfrom(self, n: int) -> tuple[bytes, tuple[object, ...]]:
        if not self.packets:
            raise BlockingIOError
        item = self.packets.pop(0)
        return item if isinstance(item, tuple) else (item, PEER)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.sent.append((data, addr))
        return len(data)


def reply(ident: int, seq: int) -> bytes:
    return struct.pack("!BBHHH", ECHO_REPLY, 0, 0, ident, seq) + b"x"


def test_echo_codec() -> None:
    req = echo_request(0x1234, 7)
    assert req[0] == 128 and struct.unpack("!HH", req[4:8]) == (0x1234, 7)
    assert parse_echo_reply(reply(0x1234, 7)) == (0x1234, 7)
    assert parse_echo_reply(req) is None  # a request is not a reply
    assert parse_echo_reply(b"\x81\x00") is None  # truncated


def test_replies_map_to_peers_and_wake_the_engine() -> None:
    p = Prober()
    sock = FakeSock([])
    p._sock = sock  # type: ignore[assignment]
    woken: list[int] = []
    p.on_reply = lambda: woken.append(1)
    assert p.send("peer-a", ipaddress.IPv6Address("fd00::1"))
    assert p.send("peer-b", ipaddress.IPv6Address("fd00::2"))
    seq_a = struct.unpack("!H", sock.sent[0][0][6:8])[0]
    # a reply for peer-a, a reply with a foreign identifier, garbage
    sock.packets = [reply(p.ident, seq_a), reply(p.ident ^ 1, seq_a), b"\x01\x02"]
    p._readable()
    assert p.take_answered() == {"peer-a"}
    rtts = p.take_rtts()
    assert set(rtts) == {"peer-a"} and 0 <= rtts["peer-a"] < 5
    assert p.take_rtts() == {}
    assert woken == [1]  # one wake per batch of replies
    assert p.take_answered() == set()
    # nothing relevant arrived: no wake
    sock.packets = [reply(p.ident ^ 1, 99)]
    p._readable()
    assert woken == [1]


def test_echo_requests_report_their_source_and_are_no_replies() -> None:
    """A peer's probe to us (the kernel answers it) tells the engine the peer's session carries
    data; it answers none of our probes and wakes nothing as a reply."""
    p = Prober()
    sock = FakeSock([])
    p._sock = sock  # type: ignore[assignment]
    sources: list[ipaddress.IPv6Address] = []
    replies: list[int] = []
    p.on_request = sources.append
    p.on_reply = lambda: replies.append(1)
    assert p.send("peer-a", ipaddress.IPv6Address("fd00::9"))
    seq = struct.unpack("!H", sock.sent[0][0][6:8])[0]
    # the peer's probe (its own identifier, our sequence number by chance), a link-local ping with a
    # scope, a request with a nonzero code (not an echo request), a truncated packet
    sock.packets = [
        echo_request(p.ident ^ 1, seq),
        (echo_request(7, 1), ("fe80::5%eth0", 0, 0, 2)),
        b"\x80\x01" + bytes(6),
        b"\x80",
    ]
    p._readable()
    assert sources == [ipaddress.IPv6Address("fd00::9"), ipaddress.IPv6Address("fe80::5")]
    assert p.take_answered() == set() and replies == []
    p.on_request = None  # without a listener, requests are dropped as before
    sock.packets = [echo_request(7, 2)]
    p._readable()
    assert len(sources) == 2
