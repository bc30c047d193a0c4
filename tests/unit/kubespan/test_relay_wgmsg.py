"""WireGuard message classification and mac1 checks (kubespan.relay.wgmsg)."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from kubespan.relay import wgmsg
from kubespan.relay.testing import cookie_reply, handshake, transport

# A handshake initiation sent by wireguard-go 0.0.20220316 to a peer with public key RECEIVER (captured on
# loopback in a lab namespace): a known answer from a real implementation.
REAL_INITIATION = bytes.fromhex(
    "01000000192cb2fa1d7066d45fc8e1a0a06f937e111eeb2a6ee4a510417ef81667e86d9e2b926678ee9e99515aa1203eeb3fa8"
    "27bd0b9f3f5180b38aff93df1c06e7d0a2232ef8e5deea8094902be8e4e61fcc470b4312ef34c3e4332127e7417b6227edbb35"
    "e9c8ce07f293eeb4660c5d1c061a1969d4f285fc8f7c857d1f3a764ed04d00000000000000000000000000000000"
)
RECEIVER = bytes.fromhex("e62f4a996cfa3b6ebae168929aebddbd7403eeea4e010e51fd9438370c767d40")


def header(kind: int) -> bytes:
    return struct.pack("<I", kind)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (header(1) + bytes(144), 1),
        (header(2) + bytes(88), 2),
        (header(3) + bytes(60), 3),
        (header(4) + bytes(28), 4),  # 32 bytes: a keepalive
        (header(4) + bytes(1500), 4),
    ],
)
def test_wireguard_messages_are_recognised(data: bytes, kind: int) -> None:
    assert wgmsg.message_type(data) == kind


@pytest.mark.parametrize(
    "data",
    [
        b"",
        header(4) + bytes(27),  # transport shorter than header + tag
        header(1) + bytes(143),  # initiation one byte short
        header(1) + bytes(145),
        header(2) + bytes(87),
        header(3) + bytes(61),
        header(0) + bytes(60),
        header(5) + bytes(60),
        bytes([1, 0, 0, 1]) + bytes(144),  # reserved bytes must be zero
        bytes([4, 1, 0, 0]) + bytes(60),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(10),
    ],
)
def test_anything_else_is_not_wireguard(data: bytes) -> None:
    assert wgmsg.message_type(data) is None
    assert not wgmsg.verify_mac1(data, RECEIVER)


def test_mac1_of_a_real_wireguard_go_initiation() -> None:
    assert wgmsg.message_type(REAL_INITIATION) == wgmsg.INITIATION
    assert wgmsg.verify_mac1(REAL_INITIATION, RECEIVER)
    assert not wgmsg.verify_mac1(REAL_INITIATION, os.urandom(32))


@pytest.mark.parametrize("pos", [0 + 8, 40, 115, 116, 131])
def test_any_changed_byte_before_or_in_mac1_fails(pos: int) -> None:
    bad = bytearray(REAL_INITIATION)
    bad[pos] ^= 0x01
    assert not wgmsg.verify_mac1(bytes(bad), RECEIVER)


def test_mac2_is_not_covered_by_mac1() -> None:
    with_mac2 = REAL_INITIATION[:132] + os.urandom(16)
    assert wgmsg.verify_mac1(with_mac2, RECEIVER)


def test_mac1_matches_the_definition() -> None:
    """An independent spelling of mac1 = BLAKE2s-128(key = BLAKE2s-256("mac1----" || pub), msg[:-32])."""
    key = hashlib.blake2s(b"mac1----" + RECEIVER).digest()
    assert wgmsg.mac1_key(RECEIVER) == key
    assert (
        REAL_INITIATION[116:132] == hashlib.blake2s(REAL_INITIATION[:116], digest_size=16, key=key).digest()
    )


@pytest.mark.parametrize("kind", [wgmsg.INITIATION, wgmsg.RESPONSE])
def test_crafted_handshakes_verify_only_for_their_receiver(kind: int) -> None:
    me, other = os.urandom(32), os.urandom(32)
    msg = handshake(me, kind)
    assert wgmsg.message_type(msg) == kind
    assert wgmsg.verify_mac1(msg, me) and not wgmsg.verify_mac1(msg, other)
    assert not wgmsg.verify_mac1(handshake(me, kind, forged=True), me)


def test_only_handshakes_carry_mac1() -> None:
    key = os.urandom(32)
    for msg in (transport(), cookie_reply()):
        assert not wgmsg.verify_mac1(msg, key)
        with pytest.raises(ValueError, match="carry mac1"):
            wgmsg.with_mac1(msg, key)


def test_public_key_length_is_checked() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        wgmsg.mac1_key(b"short")
