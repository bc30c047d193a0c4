"""ICMPv6 probe codec and reply handling (no raw socket needed)."""

from __future__ import annotations

import struct

from kubespan.probe import ECHO_REPLY, Prober, echo_request, parse_echo_reply


class FakeSock:
    def __init__(self, packets: list[bytes]) -> None:
        self.packets = packets
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def recv(self, n: int) -> bytes:
        if not self.packets:
            raise BlockingIOError
        return self.packets.pop(0)

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
    import ipaddress

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
