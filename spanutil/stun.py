"""STUN codec (RFC 5389 / RFC 8489), sans I/O: Binding requests and responses, nothing else.

The mesh asks STUN servers which public address its WireGuard port maps to, and the discovery service
answers such requests. Both sides use this module, which is why it sits in the shared leaf package
(``discovery`` may not import ``kubespan``).

Parsing is strict and bounded: a message is at most :data:`MAX_MESSAGE` bytes, attributes are walked once
(at most ``length / 4`` of them), every length is checked against what is left, and each problem raises
:class:`StunError` naming the field. FINGERPRINT is written on everything we send and checked whenever a
message carries one.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from spanutil.ipcodec import IPAddress, ip_from_bytes

__all__ = [
    "BINDING_ERROR",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "HEADER_SIZE",
    "MAGIC_COOKIE",
    "MAX_MESSAGE",
    "Mapped",
    "Message",
    "StunError",
    "binding_request",
    "binding_success",
    "looks_like_stun",
    "new_transaction_id",
    "parse",
    "parse_binding_response",
]

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
TXID_SIZE = 12
MAX_MESSAGE = 1280  # fits one IPv6 minimum-MTU datagram; servers answer Binding in far less

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_MESSAGE_INTEGRITY_SHA256 = 0x001C
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# Comprehension-required attributes (type < 0x8000) a Binding response may carry and that we understand
# (or may safely ignore, having sent no credentials). Any other one makes the response unusable
# (RFC 8489 §6.3.3: discard it). The old RFC 3489 SOURCE-ADDRESS / CHANGED-ADDRESS are informative.
RESPONSE_KNOWN = frozenset(
    {
        ATTR_MAPPED_ADDRESS,
        0x0004,  # SOURCE-ADDRESS (RFC 3489)
        0x0005,  # CHANGED-ADDRESS (RFC 3489)
        ATTR_USERNAME,
        ATTR_MESSAGE_INTEGRITY,
        ATTR_ERROR_CODE,
        ATTR_UNKNOWN_ATTRIBUTES,
        ATTR_REALM,
        ATTR_NONCE,
        ATTR_MESSAGE_INTEGRITY_SHA256,
        ATTR_XOR_MAPPED_ADDRESS,
    }
)

_HEADER = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")


class StunError(ValueError):
    """Not a usable STUN message; the text says which field and why."""


class Mapped(NamedTuple):
    """A transport address as a STUN server saw it."""

    ip: IPAddress
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Message:
    """A decoded STUN message: type, transaction id and attributes in wire order (padding removed)."""

    type: int
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...]
    fingerprint: bool  # it carried a FINGERPRINT, and the CRC matched

    def get(self, attr: int) -> bytes | None:
        """The value of the first ``attr`` (RFC 8489 §14: later duplicates are ignored)."""
        for t, v in self.attributes:
            if t == attr:
                return v
        return None

    def unknown_required(self, known: frozenset[int]) -> list[int]:
        """Comprehension-required attribute types (below 0x8000) not in ``known``."""
        return sorted({t for t, _ in self.attributes if t < 0x8000 and t not in known})


def new_transaction_id() -> bytes:
    """96 random bits (RFC 8489 §5: uniform and random, so an off-path attacker cannot guess it)."""
    return os.urandom(TXID_SIZE)


def looks_like_stun(data: bytes) -> bool:
    """Cheap pre-check (header only): top two bits zero, length a multiple of 4 that matches, magic cookie."""
    if len(data) < HEADER_SIZE:
        return False
    mtype, length, cookie, _ = _HEADER.unpack_from(data)
    return (
        mtype & 0xC000 == 0
        and length % 4 == 0
        and HEADER_SIZE + length == len(data)
        and cookie == MAGIC_COOKIE
    )


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def _encode(mtype: int, txid: bytes, attrs: list[tuple[int, bytes]], fingerprint: bool) -> bytes:
    if len(txid) != TXID_SIZE:
        raise StunError(f"transaction id: {len(txid)} bytes, must be {TXID_SIZE}")
    body = b"".join(_ATTR.pack(t, len(v)) + v + b"\0" * _pad(len(v)) for t, v in attrs)
    if not fingerprint:
        return _HEADER.pack(mtype, len(body), MAGIC_COOKIE, txid) + body
    # the CRC covers the header with the length already counting the FINGERPRINT attribute (8 bytes)
    head = _HEADER.pack(mtype, len(body) + 8, MAGIC_COOKIE, txid) + body
    crc = (zlib.crc32(head) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    return head + _ATTR.pack(ATTR_FINGERPRINT, 4) + struct.pack("!I", crc)


def binding_request(txid: bytes | None = None, fingerprint: bool = True) -> bytes:
    """A Binding request with no attributes but FINGERPRINT (28 bytes)."""
    return _encode(BINDING_REQUEST, new_transaction_id() if txid is None else txid, [], fingerprint)


def _xor_address(ip: IPAddress, port: int, txid: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value (RFC 8489 §14.2); the same operation decodes it."""
    xport = port ^ (MAGIC_COOKIE >> 16)
    key = struct.pack("!I", MAGIC_COOKIE) + (txid if ip.version == 6 else b"")
    raw = bytes(a ^ b for a, b in zip(ip.packed, key, strict=True))
    family = FAMILY_IPV6 if ip.version == 6 else FAMILY_IPV4
    return struct.pack("!BBH", 0, family, xport) + raw


def binding_success(txid: bytes, mapped: Mapped | tuple[IPAddress, int], fingerprint: bool = True) -> bytes:
    """A Binding success response carrying XOR-MAPPED-ADDRESS (40 bytes for IPv4, 52 for IPv6)."""
    ip, port = mapped
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"mapped port {port} out of range")
    return _encode(
        BINDING_SUCCESS, txid, [(ATTR_XOR_MAPPED_ADDRESS, _xor_address(ip, port, txid))], fingerprint
    )


def parse(data: bytes) -> Message:
    """Decode and check a STUN message: header, attribute framing, FINGERPRINT (last, CRC matching)."""
    n = len(data)
    if n < HEADER_SIZE:
        raise StunError(f"message: {n} bytes, shorter than the {HEADER_SIZE}-byte header")
    if n > MAX_MESSAGE:
        raise StunError(f"message: {n} bytes, longer than {MAX_MESSAGE}")
    mtype, length, cookie, txid = _HEADER.unpack_from(data)
    if mtype & 0xC000:
        raise StunError(f"message type {mtype:#06x}: the two top bits must be zero")
    if cookie != MAGIC_COOKIE:
        raise StunError(f"magic cookie {cookie:#010x}, expected {MAGIC_COOKIE:#010x}")
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4")
    if HEADER_SIZE + length != n:
        raise StunError(
            f"message length {length} does not match the {n - HEADER_SIZE} bytes after the header"
        )
    attrs: list[tuple[int, bytes]] = []
    fingerprint = False
    pos = HEADER_SIZE
    while pos < n:
        if fingerprint:
            raise StunError("FINGERPRINT is not the last attribute")
        if n - pos < _ATTR.size:
            raise StunError(f"attribute at offset {pos}: truncated header")
        atype, alen = _ATTR.unpack_from(data, pos)
        start = pos + _ATTR.size
        end = start + alen
        if end + _pad(alen) > n:
            raise StunError(f"attribute {atype:#06x} at offset {pos}: length {alen} runs past the message")
        value = bytes(data[start:end])
        if atype == ATTR_FINGERPRINT:
            if alen != 4:
                raise StunError(f"FINGERPRINT: length {alen}, must be 4")
            # the CRC covers everything before the attribute, header length as sent (it counts the attribute)
            want = (zlib.crc32(data[:pos]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            got = struct.unpack("!I", value)[0]
            if got != want:
                raise StunError(f"FINGERPRINT {got:#010x} does not match the message ({want:#010x})")
            fingerprint = True
        else:
            attrs.append((atype, value))
        pos = end + _pad(alen)
    return Message(mtype, bytes(txid), tuple(attrs), fingerprint)


def _decode_address(value: bytes, txid: bytes | None, name: str) -> Mapped:
    """MAPPED-ADDRESS (``txid`` None) or XOR-MAPPED-ADDRESS value."""
    if len(value) < 4:
        raise StunError(f"{name}: {len(value)} bytes, too short")
    _, family, port = struct.unpack_from("!BBH", value)
    size = {FAMILY_IPV4: 4, FAMILY_IPV6: 16}.get(family)
    if size is None:
        raise StunError(f"{name}: unknown address family {family:#04x}")
    if len(value) != 4 + size:
        raise StunError(f"{name}: {len(value)} bytes for family {family:#04x}, expected {4 + size}")
    raw = value[4:]
    if txid is not None:
        port ^= MAGIC_COOKIE >> 16
        key = struct.pack("!I", MAGIC_COOKIE) + txid
        raw = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    ip = ip_from_bytes(raw)
    if port == 0:
        raise StunError(f"{name}: port 0")
    return Mapped(ip, port)


def _error_text(msg: Message) -> str:
    value = msg.get(ATTR_ERROR_CODE)
    if value is None or len(value) < 4:
        return "no ERROR-CODE"
    code = (value[2] & 0x7) * 100 + value[3]
    reason = value[4:].decode("utf-8", "replace")[:128]
    return f"{code} {reason}".strip()


def parse_binding_response(data: bytes, txid: bytes) -> Mapped:
    """The mapped address from a Binding success response to the request with ``txid``.

    XOR-MAPPED-ADDRESS is preferred; MAPPED-ADDRESS (old servers) is the fallback. Raises
    :class:`StunError` for anything else: another transaction, an error response (with its code),
    unknown comprehension-required attributes, or no address at all.
    """
    msg = parse(data)
    if msg.transaction_id != txid:
        raise StunError("transaction id does not match the request")
    if msg.type == BINDING_ERROR:
        raise StunError(f"Binding error response: {_error_text(msg)}")
    if msg.type != BINDING_SUCCESS:
        raise StunError(f"message type {msg.type:#06x} is not a Binding success response")
    unknown = msg.unknown_required(RESPONSE_KNOWN)
    if unknown:
        names = ", ".join(f"{t:#06x}" for t in unknown)
        raise StunError(f"unknown comprehension-required attributes: {names}")
    xored = msg.get(ATTR_XOR_MAPPED_ADDRESS)
    if xored is not None:
        return _decode_address(xored, txid, "XOR-MAPPED-ADDRESS")
    plain = msg.get(ATTR_MAPPED_ADDRESS)
    if plain is not None:
        return _decode_address(plain, None, "MAPPED-ADDRESS")
    raise StunError("Binding success response without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS")
