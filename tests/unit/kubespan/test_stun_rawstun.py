"""The raw-socket STUN client's pure parts: the UDP header and checksum, the BPF program, and the
reply matching (the socket side runs as root in tests/integration/test_stun_nat.py)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubespan.nat import rawstun
from spanutil import stun


def fold(data: bytes) -> int:
    """The receiver's check: the ones'-complement sum over pseudo-header and datagram, checksum included."""
    data += b"\0" * (len(data) % 2)
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo(src, dst, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + bytes([0, 17]) + struct.pack("!H", length)
    return src.packed + dst.packed + struct.pack("!I", length) + bytes([0, 0, 0, 17])


@given(
    st.sampled_from(
        [
            (IPv4Address("192.168.1.10"), IPv4Address("203.0.113.11")),
            (IPv6Address("2001:db8::10"), IPv6Address("2001:db8:1::3478")),
        ]
    ),
    st.binary(max_size=64),
)
def test_checksum_verifies_like_a_receiver_would(addrs, payload):
    src, dst = addrs
    udp = rawstun.udp_datagram(src, dst, 51820, 3478, payload)
    assert struct.unpack("!HHH", udp[:6]) == (51820, 3478, 8 + len(payload))
    assert udp[8:] == payload
    assert fold(pseudo(src, dst, len(udp)) + udp) == 0xFFFF
    assert udp[6:8] != b"\0\0"  # 0 means "no checksum": RFC 768 sends 0xffff instead


def test_checksum_of_zero_sum_is_sent_as_ffff():
    # a datagram whose sum folds to 0xffff would get checksum 0; find one by adjusting two payload bytes
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    base = rawstun.udp_datagram(None, dst, 1, 2, b"\0\0")
    partial = fold(pseudo(src, dst, len(base)) + base)
    filler = (0xFFFF - partial).to_bytes(2, "big")
    assert rawstun.udp_checksum(src, dst, base[:8] + filler) == 0xFFFF


def test_without_a_source_the_checksum_is_left_to_the_kernel():
    udp = rawstun.udp_datagram(None, IPv6Address("2001:db8::1"), 51820, 3478, b"abc")
    assert udp[6:8] == b"\0\0"


@pytest.mark.parametrize("ipv6", [False, True])
def test_bpf_program_is_short_and_its_jumps_land_on_returns(ipv6):
    prog = rawstun.bpf_program(51820, ipv6)
    assert len(prog) <= 9
    assert prog[-2] == (0x06, 0, 0, 0xFFFF) and prog[-1] == (0x06, 0, 0, 0)
    for pc, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # BPF_JMP: both targets inside the program
            assert pc + 1 + jt < len(prog) and pc + 1 + jf < len(prog)
    ks = [k for _c, _t, _f, k in prog]
    assert 51820 in ks and stun.MAGIC_COOKIE in ks


def run_bpf(prog, packet: bytes) -> int:
    """A tiny classic-BPF interpreter for the opcodes the program uses (out-of-bounds loads drop)."""
    a = x = 0
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        try:
            if code == 0x28:
                a = struct.unpack_from("!H", packet, k)[0]
            elif code == 0x20:
                a = struct.unpack_from("!I", packet, k)[0]
            elif code == 0x48:
                a = struct.unpack_from("!H", packet, x + k)[0]
            elif code == 0x40:
                a = struct.unpack_from("!I", packet, x + k)[0]
            elif code == 0xB1:
                x = (packet[k] & 0xF) * 4
            elif code == 0x15:
                pc += jt if a == k else jf
            elif code == 0x45:
                pc += jt if a & k else jf
            elif code == 0x06:
                return k
            else:
                raise AssertionError(f"opcode {code:#x}")
        except (struct.error, IndexError):
            return 0


def ipv4(udp: bytes, frag: int = 0, ihl: int = 5) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(udp), 0, frag, 64, 17, 0, b"\1" * 4, b"\2" * 4
    )
    return head + b"\0" * (4 * ihl - 20) + udp


REPLY = stun.binding_success(b"t" * 12, (IPv4Address("203.0.113.1"), 51820))


@pytest.mark.parametrize(
    ("packet", "accepted"),
    [
        (ipv4(rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), 3478, 51820, REPLY)), True),
        (ipv4(rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), 3478, 51820, REPLY), ihl=6), True),
        (ipv4(rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), 3478, 51821, REPLY)), False),
        (
            ipv4(rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), 51820, 51820, b"\4\0\0\0" + b"\0" * 28)),
            False,
        ),
        (ipv4(rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), 3478, 51820, REPLY), frag=0x4000), True),
        (ipv4(rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), 3478, 51820, REPLY), frag=0x2000), True),
        (ipv4(rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), 3478, 51820, REPLY), frag=0x2003), False),
        (ipv4(b"\0\0"), False),
    ],
)
def test_ipv4_filter_passes_only_stun_to_the_wireguard_port(packet, accepted):
    assert (run_bpf(rawstun.bpf_program(51820, False), packet) > 0) is accepted


def test_ipv6_filter_sees_the_udp_header():
    prog = rawstun.bpf_program(51820, True)
    assert run_bpf(prog, rawstun.udp_datagram(None, IPv6Address("::1"), 3478, 51820, REPLY))
    assert not run_bpf(prog, rawstun.udp_datagram(None, IPv6Address("::1"), 3478, 51820, b"\1" * 148))
    assert not run_bpf(prog, rawstun.udp_datagram(None, IPv6Address("::1"), 3478, 9, REPLY))


def test_reply_matching_checks_source_and_ports():
    server = ip_address("203.0.113.11")
    udp = rawstun.udp_datagram(None, IPv4Address("1.1.1.1"), 3478, 51820, REPLY)
    pkt = ipv4(udp)
    pkt = pkt[:12] + server.packed + pkt[16:]
    assert rawstun._reply(pkt, ("203.0.113.11", 0), server, 3478, 51820) == REPLY
    assert rawstun._reply(pkt, ("203.0.113.11", 0), server, 3479, 51820) is None
    assert rawstun._reply(pkt, ("203.0.113.11", 0), ip_address("203.0.113.12"), 3478, 51820) is None
    assert rawstun._reply(pkt[:30], ("203.0.113.11", 0), server, 3478, 51820) is None  # length past the end
    v6 = ip_address("2001:db8::3478")
    assert rawstun._reply(udp, ("2001:db8::3478", 0, 0, 0), v6, 3478, 51820) == REPLY
    assert rawstun._reply(udp, ("2001:db8::1", 0, 0, 0), v6, 3478, 51820) is None
