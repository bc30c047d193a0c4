"""spanutil.stun: Binding requests and responses round-trip, XOR-MAPPED-ADDRESS decodes to the address the
RFC's arithmetic gives, FINGERPRINT is written and checked, and hostile input is refused with a clear error."""

from __future__ import annotations

import binascii
import ipaddress
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spanutil import stun
from spanutil.stun import Mapped, StunError

TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def message(
    mtype: int, attrs: list[tuple[int, bytes]], txid: bytes = TXID, cookie: int = stun.MAGIC_COOKIE
) -> bytes:
    """A hand-built message, independent of the encoder (no FINGERPRINT)."""
    body = b""
    for t, v in attrs:
        body += struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4)
    return struct.pack("!HHI", mtype, len(body), cookie) + txid + body


def with_fingerprint(msg: bytes) -> bytes:
    head = bytearray(msg)
    struct.pack_into("!H", head, 2, len(msg) - 20 + 8)
    crc = (binascii.crc32(bytes(head)) ^ 0x5354554E) & 0xFFFFFFFF
    return bytes(head) + struct.pack("!HHI", 0x8028, 4, crc)


def test_binding_request_layout():
    req = stun.binding_request(TXID)
    assert len(req) == 28
    assert req[:2] == b"\x00\x01" and req[2:4] == b"\x00\x08" and req[4:8] == b"\x21\x12\xa4\x42"
    assert req[8:20] == TXID
    assert req[20:24] == b"\x80\x28\x00\x04"
    assert req == with_fingerprint(message(stun.BINDING_REQUEST, []))
    msg = stun.parse(req)
    assert (msg.type, msg.transaction_id, msg.attributes, msg.fingerprint) == (1, TXID, (), True)
    assert len(stun.binding_request(TXID, fingerprint=False)) == 20


def test_transaction_ids_are_random():
    ids = {stun.parse(stun.binding_request()).transaction_id for _ in range(64)}
    assert len(ids) == 64 and all(len(i) == 12 for i in ids)


def test_xor_mapped_address_matches_the_rfc_arithmetic():
    # RFC 5769 §2.2's address: 192.0.2.1:32853 is carried as port 0xa147, address 0xe112a643
    value = bytes.fromhex("0001a147e112a643")
    resp = message(stun.BINDING_SUCCESS, [(0x8022, b"test vector"), (0x0020, value)])
    assert stun.parse_binding_response(resp, TXID) == Mapped(ipaddress.ip_address("192.0.2.1"), 32853)
    assert stun.binding_success(TXID, Mapped(ipaddress.ip_address("192.0.2.1"), 32853))[20:32] == (
        b"\x00\x20\x00\x08" + value
    )


def test_ipv6_address_is_xored_with_cookie_and_transaction_id():
    ip = ipaddress.IPv6Address("2001:db8:1234:5678:11:2233:4455:6677")
    key = int.from_bytes(struct.pack("!I", stun.MAGIC_COOKIE) + TXID, "big")
    xaddr = (int(ip) ^ key).to_bytes(16, "big")
    value = struct.pack("!BBH", 0, 2, 32853 ^ 0x2112) + xaddr
    resp = message(stun.BINDING_SUCCESS, [(0x0020, value)])
    assert stun.parse_binding_response(resp, TXID) == Mapped(ip, 32853)
    assert stun.binding_success(TXID, (ip, 32853), fingerprint=False) == resp


@given(
    st.one_of(
        st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
        st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    ),
    st.integers(1, 65535),
    st.binary(min_size=12, max_size=12),
)
def test_success_round_trip(ip, port, txid):
    resp = stun.binding_success(txid, Mapped(ip, port))
    assert len(resp) == (40 if ip.version == 4 else 52)
    assert stun.looks_like_stun(resp)
    assert stun.parse(resp).fingerprint
    assert stun.parse_binding_response(resp, txid) == (ip, port)


def test_mapped_address_fallback_and_xor_preferred():
    plain = struct.pack("!BBH", 0, 1, 4000) + ipaddress.IPv4Address("198.51.100.7").packed
    assert stun.parse_binding_response(message(0x0101, [(0x0001, plain)]), TXID) == (
        ipaddress.IPv4Address("198.51.100.7"),
        4000,
    )
    xored = stun.binding_success(TXID, (ipaddress.IPv4Address("203.0.113.1"), 51820), fingerprint=False)[20:]
    both = message(0x0101, [(0x0001, plain)]) + xored
    both = both[:2] + struct.pack("!H", len(both) - 20) + both[4:]
    assert str(stun.parse_binding_response(both, TXID)) == "203.0.113.1:51820"


def test_optional_and_known_attributes_are_tolerated():
    value = bytes.fromhex("0001a147e112a643")
    resp = message(
        0x0101,
        [(0x8022, b"server"), (0x802B, b"\0" * 8), (0x802C, b"\0" * 8), (0x0020, value), (0x0004, b"\0" * 8)],
    )
    assert stun.parse_binding_response(with_fingerprint(resp), TXID).port == 32853


def test_fingerprint_mismatch_is_refused():
    resp = bytearray(stun.binding_success(TXID, (ipaddress.IPv4Address("192.0.2.1"), 1)))
    resp[-1] ^= 1
    with pytest.raises(StunError, match="FINGERPRINT"):
        stun.parse(bytes(resp))
    body = bytearray(stun.binding_success(TXID, (ipaddress.IPv4Address("192.0.2.1"), 1)))
    body[27] ^= 1  # the mapped address, under the CRC
    with pytest.raises(StunError, match=r"FINGERPRINT .* does not match"):
        stun.parse(bytes(body))


def test_fingerprint_must_be_last_and_four_bytes():
    tail = struct.pack("!HH", 0x8022, 4) + b"late"
    head = bytearray(message(0x0101, []))
    struct.pack_into("!H", head, 2, 8 + len(tail))  # the length as sent covers both attributes
    crc = (binascii.crc32(bytes(head)) ^ 0x5354554E) & 0xFFFFFFFF
    bad = bytes(head) + struct.pack("!HHI", 0x8028, 4, crc) + tail
    with pytest.raises(StunError, match="last attribute"):
        stun.parse(bad)
    with pytest.raises(StunError, match="FINGERPRINT: length 8"):
        stun.parse(message(0x0101, [(0x8028, b"\0" * 8)]))


GOOD = stun.binding_success(TXID, (ipaddress.IPv4Address("192.0.2.1"), 32853))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "shorter than the 20-byte header"),
        (GOOD[:19], "shorter than the 20-byte header"),
        (GOOD[:-4], "does not match the"),
        (GOOD + b"\0" * 4, "does not match the"),
        (b"\xc0" + GOOD[1:], "two top bits"),
        (GOOD[:4] + b"\x21\x12\xa4\x43" + GOOD[8:], "magic cookie 0x2112a443"),
        (GOOD[:2] + b"\x00\x13" + GOOD[4:], "not a multiple of 4"),
        (message(0x0101, [])[:2] + b"\x00\x04" + message(0x0101, [])[4:] + b"\x00\x20\x00\x08", "runs past"),
        (b"\0\x01" + struct.pack("!H", 1264) + GOOD[4:20] + b"\0" * 1264, "longer than 1280"),
    ],
)
def test_malformed_messages_are_refused(data, error):
    with pytest.raises(StunError, match=error):
        stun.parse(data)


@pytest.mark.parametrize(
    ("attrs", "error"),
    [
        ([(0x0020, b"\0\x01\0")], "too short"),
        ([(0x0020, b"\0\x03\x00\x01" + b"\0" * 4)], "unknown address family 0x03"),
        ([(0x0020, b"\0\x01\x00\x01" + b"\0" * 16)], "20 bytes for family 0x01, expected 8"),
        ([(0x0020, b"\0\x02\x00\x01" + b"\0" * 4)], "8 bytes for family 0x02, expected 20"),
        ([(0x0001, b"\0\x01\x00\x00" + b"\0" * 4)], "port 0"),
        ([(0x8022, b"x")], "without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS"),
        (
            [(0x0020, bytes.fromhex("0001a147e112a643")), (0x7F00, b"")],
            "comprehension-required attributes: 0x7f00",
        ),
    ],
)
def test_unusable_responses_are_refused(attrs, error):
    with pytest.raises(StunError, match=error):
        stun.parse_binding_response(message(0x0101, attrs), TXID)


def test_error_response_reports_its_code():
    resp = message(0x0111, [(0x0009, b"\0\0\x04\x00Bad Request")])
    with pytest.raises(StunError, match="Binding error response: 400 Bad Request"):
        stun.parse_binding_response(resp, TXID)


def test_other_transactions_and_types_are_refused():
    with pytest.raises(StunError, match="transaction id"):
        stun.parse_binding_response(GOOD, os.urandom(12))
    with pytest.raises(StunError, match="not a Binding success"):
        stun.parse_binding_response(stun.binding_request(TXID), TXID)


def test_encoder_refuses_bad_values():
    with pytest.raises(StunError, match="transaction id: 11 bytes"):
        stun.binding_request(b"\0" * 11)
    with pytest.raises(StunError, match="port 70000"):
        stun.binding_success(TXID, (ipaddress.IPv4Address("192.0.2.1"), 70000))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_parser(data):
    try:
        stun.parse_binding_response(data, TXID)
    except StunError:
        pass


@given(st.binary(min_size=0, max_size=120))
def test_arbitrary_attributes_after_a_valid_header_never_crash(body):
    body = body[: len(body) - len(body) % 4]
    data = struct.pack("!HHI", 0x0101, len(body), stun.MAGIC_COOKIE) + TXID + body
    try:
        stun.parse_binding_response(data, TXID)
    except StunError:
        pass


def test_looks_like_stun_checks_the_header_only():
    assert stun.looks_like_stun(GOOD) and stun.looks_like_stun(stun.binding_request())
    assert not stun.looks_like_stun(GOOD[:-4])
    assert not stun.looks_like_stun(GOOD[:4] + b"\0\0\0\0" + GOOD[8:])
    wireguard_initiation = b"\x01\0\0\0" + os.urandom(144)
    assert not stun.looks_like_stun(wireguard_initiation)
