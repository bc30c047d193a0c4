"""WireGuard message classification and mac1 checks for the relay, pure and allocation-free.

The relay must tell WireGuard from anything else without session keys. Every WireGuard message starts
with a type byte and three zero bytes; handshake initiations (type 1, 148 bytes), responses (type 2,
92 bytes) and cookie replies (type 3, 64 bytes) have fixed lengths, transport data (type 4) is at least
32 bytes. Initiations and responses carry mac1 = BLAKE2s-128 keyed with BLAKE2s-256("mac1----" ||
receiver's static public key) over the message up to mac1: checking it proves the sender knows the
receiver's public key, which is what lets a relay leg latch onto a sender (docs/design/relay.md).
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache
from typing import Final

INITIATION: Final = 1
RESPONSE: Final = 2
COOKIE_REPLY: Final = 3
TRANSPORT: Final = 4

INITIATION_LEN: Final = 148
RESPONSE_LEN: Final = 92
COOKIE_REPLY_LEN: Final = 64
TRANSPORT_MIN_LEN: Final = 32  # header (16) + the AEAD tag of an empty (keepalive) payload (16)

MAC_LEN: Final = 16
_MACS_LEN: Final = 2 * MAC_LEN  # mac1 and mac2 end every handshake message
_LABEL_MAC1: Final = b"mac1----"
_EXACT: Final = {INITIATION: INITIATION_LEN, RESPONSE: RESPONSE_LEN, COOKIE_REPLY: COOKIE_REPLY_LEN}


def message_type(data: bytes | memoryview) -> int | None:
    """The WireGuard message type (1-4) of ``data``, or None when it is not a well-formed one."""
    if len(data) < TRANSPORT_MIN_LEN or data[1:4] != b"\x00\x00\x00":
        return None
    kind = data[0]
    if kind == TRANSPORT:
        return kind
    return kind if _EXACT.get(kind) == len(data) else None


def is_handshake(kind: int | None) -> bool:
    """Initiations and responses: the messages that carry mac1."""
    return kind == INITIATION or kind == RESPONSE


@lru_cache(maxsize=4096)
def mac1_key(receiver_public_key: bytes) -> bytes:
    """BLAKE2s-256("mac1----" || public key): the mac1 key for messages sent to that key's owner."""
    if len(receiver_public_key) != 32:
        raise ValueError(f"public key must be 32 bytes, not {len(receiver_public_key)}")
    return hashlib.blake2s(_LABEL_MAC1 + receiver_public_key).digest()


def compute_mac1(message: bytes | memoryview, key: bytes) -> bytes:
    """mac1 of a handshake message (the 16 bytes it should hold) under a precomputed ``mac1_key``."""
    body = message[: len(message) - _MACS_LEN]
    return hashlib.blake2s(body, digest_size=MAC_LEN, key=key).digest()


def verify_mac1_key(message: bytes | memoryview, key: bytes) -> bool:
    """Whether ``message`` is a handshake initiation or response whose mac1 verifies under ``key``."""
    if not is_handshake(message_type(message)):
        return False
    start = len(message) - _MACS_LEN
    return hmac.compare_digest(compute_mac1(message, key), message[start : start + MAC_LEN])


def verify_mac1(message: bytes | memoryview, receiver_public_key: bytes) -> bool:
    """Whether ``message`` is a handshake initiation or response addressed (by mac1) to the owner of
    ``receiver_public_key``; the key derivation is cached per public key."""
    return verify_mac1_key(message, mac1_key(receiver_public_key))


def with_mac1(message: bytes, receiver_public_key: bytes) -> bytes:
    """``message`` (an initiation or response) with its mac1 set for ``receiver_public_key`` and mac2
    kept; how tests and tools craft handshakes the relay accepts."""
    if not is_handshake(message_type(message)):
        raise ValueError("only handshake initiations (148 bytes) and responses (92 bytes) carry mac1")
    start = len(message) - _MACS_LEN
    mac = compute_mac1(message, mac1_key(receiver_public_key))
    return message[:start] + mac + message[start + MAC_LEN :]
