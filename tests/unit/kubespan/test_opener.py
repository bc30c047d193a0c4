"""The punch executor's socket-free parts: TTL, the probe filters, datagram parsing, the responder's and
the prober's decisions (the raw sockets run as root in tests/integration/test_punch_netns.py)."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from test_stun_rawstun import ipv4, run_bpf

from kubespan.nat import opener, probemsg, rawstun
from kubespan.nat.probemsg import ProbeMessage, RateLimiter
from kubespan.wireguard.types import AddrPort, PublicKey

KEY = probemsg.probe_key(b"s" * 32)
ME, PEER, STRANGER = PublicKey(b"m" * 32), PublicKey(b"p" * 32), PublicKey(b"x" * 32)
NOW = 1_800_000_000_000
WG = 51820


class Clock:
    def __init__(self) -> None:
        self.ms = NOW
        self.mono = 100.0

    def wall(self) -> int:
        return self.ms


def udp(payload: bytes, dport: int = WG, sport: int = 40000) -> bytes:
    return rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), sport, dport, payload)


@pytest.mark.parametrize(
    ("version", "level", "option"),
    [(4, socket.IPPROTO_IP, socket.IP_TTL), (6, socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)],
)
def test_ttl_is_set_on_the_socket(version, level, option):
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as e:
        pytest.skip(f"no IPv{version} sockets here: {e}")
    with s:
        opener.set_ttl(s, version, 3)
        assert s.getsockopt(level, option) == 3
        with pytest.raises(ValueError, match="ttl"):
            opener.set_ttl(s, version, 0)


PROBE = probemsg.encode(ProbeMessage.probe(PEER, NOW), KEY)
ANSWER = probemsg.encode(
    ProbeMessage.answering(ProbeMessage.probe(ME, NOW), PEER, AddrPort("1.2.3.4", 5), NOW), KEY
)


@pytest.mark.parametrize(
    ("packet", "probes", "answers"),
    [
        (ipv4(udp(PROBE)), True, False),
        (ipv4(udp(ANSWER)), False, True),
        (ipv4(udp(PROBE), ihl=7), True, False),
        (ipv4(udp(PROBE, dport=WG + 1)), False, False),
        (ipv4(udp(probemsg.OPENER_PAYLOAD)), False, False),
        (ipv4(udp(b"\x01\0\0\0" + PROBE[4:])), False, False),  # a WireGuard initiation's first word
        (ipv4(udp(rawstun.stun.binding_request(b"t" * 12))), False, False),
        (ipv4(udp(PROBE), frag=0x2001), False, False),  # a later fragment
        (ipv4(udp(b"KSP")), False, False),  # too short for the magic word
    ],
)
def test_ipv4_filters_pass_only_their_own_message_to_the_wireguard_port(packet, probes, answers):
    assert (run_bpf(opener._magic_filter(WG, 4, probemsg.PROBE_MAGIC), packet) > 0) is probes
    assert (run_bpf(opener._magic_filter(WG, 4, probemsg.ANSWER_MAGIC), packet) > 0) is answers


def test_ipv6_filters_see_the_udp_header():
    prog = opener._magic_filter(WG, 6, probemsg.PROBE_MAGIC)
    assert run_bpf(prog, udp(PROBE))
    assert not run_bpf(prog, udp(ANSWER))
    assert not run_bpf(prog, udp(PROBE, dport=9))


def test_parse_datagram_gives_source_destination_and_payload():
    pkt = ipv4(udp(PROBE + b"trailing", sport=40799))
    pkt = pkt[:12] + IPv4Address("198.51.100.7").packed + IPv4Address("10.0.0.2").packed + pkt[20:]
    # the UDP length says where the payload ends, not the read size
    length = struct.pack("!H", 8 + len(PROBE))
    pkt = pkt[:24] + length + pkt[26:]
    src, dst, payload = opener.parse_datagram(pkt, ("198.51.100.7", 0), 4, WG)
    assert src == AddrPort("198.51.100.7", 40799) and dst == IPv4Address("10.0.0.2") and payload == PROBE
    assert opener.parse_datagram(pkt, ("198.51.100.7", 0), 4, WG + 1) is None
    assert opener.parse_datagram(pkt[:27], ("198.51.100.7", 0), 4, WG) is None
    assert opener.parse_datagram(ipv4(udp(PROBE, sport=0)), ("1.1.1.1", 0), 4, WG) is None
    v6 = opener.parse_datagram(udp(PROBE), ("2001:db8::7%eth0", 0, 0, 0), 6, WG)
    assert v6 == (AddrPort(IPv6Address("2001:db8::7"), 40000), None, PROBE)


def responder(clock: Clock, **kw) -> opener.ProbeResponder:
    return opener.ProbeResponder(
        WG, KEY, ME, lambda k: k == PEER, wall_ms=clock.wall, monotonic=lambda: clock.mono, **kw
    )


SRC = AddrPort("198.51.100.7", 40799)


def test_responder_answers_a_known_peer_with_what_it_saw():
    clock = Clock()
    r = responder(clock)
    probe = ProbeMessage.probe(PEER, NOW - 1000)
    wire = r.answer(probemsg.encode(probe, KEY), SRC)
    assert wire is not None
    ans = probemsg.decode(wire, KEY, NOW)
    assert ans.answer and ans.sender == ME and ans.reply_to == probe.nonce and ans.observed == SRC
    assert r.answered == 1 and not r.dropped


def test_responder_ignores_strangers_answers_replays_forgeries_and_stale_probes():
    clock = Clock()
    r = responder(clock)
    fresh = probemsg.encode(ProbeMessage.probe(PEER, NOW), KEY)
    assert r.answer(fresh, SRC) is not None
    assert r.answer(fresh, SRC) is None  # replayed
    assert r.answer(fresh, AddrPort("203.0.113.9", 1)) is None  # replayed from elsewhere
    assert r.answer(probemsg.encode(ProbeMessage.probe(STRANGER, NOW), KEY), SRC) is None
    assert r.answer(probemsg.encode(ProbeMessage.probe(ME, NOW), KEY), SRC) is None  # our own, looped
    assert r.answer(ANSWER, SRC) is None
    assert (
        r.answer(probemsg.encode(ProbeMessage.probe(PEER, NOW), probemsg.probe_key(b"t" * 32)), SRC) is None
    )
    assert r.answer(probemsg.encode(ProbeMessage.probe(PEER, NOW - 31_000), KEY), SRC) is None
    assert r.answer(fresh[:50], SRC) is None
    assert r.answered == 1
    assert r.dropped == {
        "replay": 2,
        "unknown key": 2,
        "answer": 1,
        "bad mac": 1,
        "stale": 1,
        "length 50, not 116": 1,
    }


def test_responder_rate_limits_answers_per_source():
    clock = Clock()
    r = responder(clock, limiter=RateLimiter(rate=1, burst=2))
    answers = [r.answer(probemsg.encode(ProbeMessage.probe(PEER, NOW), KEY), SRC) for _ in range(4)]
    assert [a is not None for a in answers] == [True, True, False, False]
    other = AddrPort("198.51.100.8", 40799)
    assert r.answer(probemsg.encode(ProbeMessage.probe(PEER, NOW), KEY), other) is not None
    clock.mono += 1.0
    assert r.answer(probemsg.encode(ProbeMessage.probe(PEER, NOW), KEY), SRC) is not None
    assert r.dropped == {"rate limited": 2}


def test_prober_takes_only_the_peers_answer_to_its_own_probe_and_reports_its_source():
    clock = Clock()
    p = opener._Prober(KEY, ME, PEER, clock.wall)
    cand = AddrPort("203.0.113.2", 51820)
    sent = probemsg.decode(p.probe(cand), KEY, NOW)
    assert not sent.answer and sent.sender == ME

    def answer(sender: PublicKey, to: ProbeMessage, key: bytes = KEY) -> bytes:
        return probemsg.encode(ProbeMessage.answering(to, sender, AddrPort("198.51.100.1", 51820), NOW), key)

    assert p.accept(answer(STRANGER, sent), cand) is None
    assert p.accept(answer(PEER, ProbeMessage.probe(ME, NOW)), cand) is None  # not a probe we sent
    assert p.accept(answer(PEER, sent, probemsg.probe_key(b"t" * 32)), cand) is None
    assert (
        p.accept(probemsg.encode(ProbeMessage.probe(PEER, NOW), KEY), cand) is None
    )  # a probe, not an answer
    assert p.accept(answer(PEER, sent), cand) == cand
    rewritten = AddrPort("203.0.113.2", 40799)
    assert p.accept(answer(PEER, sent), rewritten) == rewritten  # the answer's source is what works
    assert p.rejected == {"not ours": 3, "bad mac": 1}


async def test_nothing_to_probe_returns_none_without_sockets():
    assert await opener.probe_candidates(WG, [], key=KEY, own=ME, peer=PEER) is None
