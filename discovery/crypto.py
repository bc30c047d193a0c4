"""Affiliate encryption, wire-compatible with the Talos discovery client.

Pure functions only: values in, values out, no I/O (except ``os.urandom`` for GCM nonces).

* The key is the 32-byte cluster secret (Talos: base64 StdEncoding of 32 random bytes), used directly
  as the AES-256 key, with no KDF. The same key serves both ciphers below.
* Affiliate data: the ``sidero.discovery.client.Affiliate`` protobuf, AES-256-GCM with a random 12-byte
  nonce prepended and the 16-byte tag appended, no associated data: ``nonce || ciphertext || tag``.
  The server caps the blob at 2048 bytes, so the plaintext may be at most 2020 bytes.
* Endpoints: the ``Endpoint`` protobuf prefixed with one length byte, zero-padded to a multiple of 16 and
  encrypted with AES-256-ECB. ECB is deterministic on purpose, so the server can de-duplicate the same
  endpoint reported by several nodes. IPv4 endpoints are 16 bytes, IPv6 endpoints 32.

Decoding never trusts its input: anything short, misaligned, tampered or unparsable raises a
:class:`DecodeError` subclass (the Go client panics on some of these; we must not).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Iterable
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import message as _pb_message

from discovery.limits import AFFILIATE_PLAINTEXT_MAX, ENDPOINT_MAX, GCM_NONCE_SIZE, GCM_TAG_SIZE
from spanapi.discovery.client import affiliate_pb2
from spanutil.ipcodec import IPAddress, IPNetwork, ip_from_bytes, ip_to_bytes

__all__ = [
    "AES_BLOCK_SIZE",
    "KEY_SIZE",
    "AffiliateTooLargeError",
    "DecodeError",
    "DecryptError",
    "MalformedBlobError",
    "SecretError",
    "addresses_to_pb",
    "decrypt_affiliate",
    "decrypt_endpoint",
    "encrypt_affiliate",
    "encrypt_endpoint",
    "endpoint_from_addr",
    "endpoint_to_addr",
    "parse_secret",
    "prefix_from_pb",
    "prefix_to_pb",
]

KEY_SIZE = 32
AES_BLOCK_SIZE = 16
_GCM_OVERHEAD = GCM_NONCE_SIZE + GCM_TAG_SIZE
_M = TypeVar("_M", bound=_pb_message.Message)


class SecretError(ValueError):
    """The cluster secret is not usable. The message never contains the secret itself."""


class AffiliateTooLargeError(ValueError):
    """The serialized affiliate exceeds what fits in one discovery data blob."""


class DecodeError(_pb_message.DecodeError, ValueError):
    """A blob could not be decoded. Base class; it is also a ``google.protobuf.message.DecodeError``."""


class MalformedBlobError(DecodeError):
    """Structurally invalid: wrong length, bad size byte, or the plaintext is not the expected protobuf."""


class DecryptError(DecodeError):
    """AES-GCM authentication failed: wrong key, or the blob was tampered with."""


# --- key ---------------------------------------------------------------------------------------------------


def parse_secret(b64: str | bytes) -> bytes:
    """Decode a cluster secret (base64, standard alphabet, padded) into the 32-byte AES-256 key.

    Surrounding whitespace is ignored (secrets often come from files). Errors say what is wrong without
    echoing any part of the secret.
    """
    raw = b64.strip() if isinstance(b64, bytes) else b64.strip().encode("ascii", errors="replace")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(
            "cluster secret is not valid base64 (standard alphabet with padding); expected base64 of 32 bytes"
        ) from None
    if len(key) != KEY_SIZE:
        raise SecretError(f"cluster secret must decode to exactly {KEY_SIZE} bytes, got {len(key)} bytes")
    return key


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray | memoryview) or len(key) != KEY_SIZE:
        raise SecretError(f"cluster key must be {KEY_SIZE} raw bytes (use parse_secret() on the base64 form)")


# --- affiliate data (AES-256-GCM) --------------------------------------------------------------------------


def encrypt_affiliate(key: bytes, affiliate: affiliate_pb2.Affiliate) -> bytes:
    """Serialize and encrypt an affiliate: ``nonce(12) || ciphertext || tag(16)`` with a fresh random nonce.

    Raises :class:`AffiliateTooLargeError` when the serialized affiliate exceeds 2020 bytes.
    """
    _check_key(key)
    plaintext = affiliate.SerializeToString(deterministic=True)
    if len(plaintext) > AFFILIATE_PLAINTEXT_MAX:
        raise AffiliateTooLargeError(
            f"affiliate data is {len(plaintext)} bytes serialized; the limit is {AFFILIATE_PLAINTEXT_MAX} "
            f"bytes of plaintext ({AFFILIATE_PLAINTEXT_MAX + _GCM_OVERHEAD} bytes encrypted)"
        )
    nonce = os.urandom(GCM_NONCE_SIZE)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, plaintext, None)


def decrypt_affiliate(key: bytes, blob: bytes) -> affiliate_pb2.Affiliate:
    """Decrypt and parse an affiliate data blob.

    Raises :class:`MalformedBlobError` (too short, or not an Affiliate protobuf) or :class:`DecryptError`
    (authentication failed: wrong key or tampered).
    """
    _check_key(key)
    if len(blob) < _GCM_OVERHEAD:
        raise MalformedBlobError(
            f"affiliate data is {len(blob)} bytes; at least {_GCM_OVERHEAD} (nonce + tag) are required"
        )
    blob = bytes(blob)
    try:
        plaintext = AESGCM(bytes(key)).decrypt(blob[:GCM_NONCE_SIZE], blob[GCM_NONCE_SIZE:], None)
    except InvalidTag:
        raise DecryptError(
            "affiliate data failed authentication (wrong cluster secret or tampered)"
        ) from None
    return _parse(affiliate_pb2.Affiliate, plaintext, "affiliate data")


# --- endpoints (AES-256-ECB, deterministic) ----------------------------------------------------------------


def _ecb(key: bytes) -> Cipher[modes.ECB]:
    # ECB is the upstream wire format (deterministic so the server de-duplicates equal endpoints).
    return Cipher(algorithms.AES(bytes(key)), modes.ECB())


def encrypt_endpoint(key: bytes, endpoint: affiliate_pb2.Endpoint) -> bytes:
    """Encrypt one endpoint deterministically: ``len(1) || Endpoint || zero pad`` to 16 bytes, AES-256-ECB.

    An IPv4 endpoint yields 16 bytes and an IPv6 endpoint 32. Raises ``ValueError`` if the result would
    exceed the server's 32-byte limit (only possible with a malformed Endpoint message).
    """
    _check_key(key)
    body = endpoint.SerializeToString(deterministic=True)
    if len(body) > 255:
        raise ValueError(f"endpoint is {len(body)} bytes serialized; the length prefix allows at most 255")
    plain = bytes([len(body)]) + body
    plain += b"\x00" * (-len(plain) % AES_BLOCK_SIZE)
    if len(plain) > ENDPOINT_MAX:
        raise ValueError(
            f"encrypted endpoint would be {len(plain)} bytes; the limit is {ENDPOINT_MAX} bytes "
            "(ip must be 4 or 16 bytes, port at most 65535)"
        )
    enc = _ecb(key).encryptor()
    return enc.update(plain) + enc.finalize()


def decrypt_endpoint(key: bytes, blob: bytes) -> affiliate_pb2.Endpoint:
    """Decrypt and validate one endpoint blob.

    Raises :class:`MalformedBlobError` for an empty blob, a length that is not a multiple of 16, a size
    byte beyond the plaintext, an unparsable protobuf, an IP that is not 4 or 16 bytes, or a port > 65535.
    ECB carries no integrity check, so a wrong key usually surfaces as one of these.
    """
    _check_key(key)
    if not blob or len(blob) % AES_BLOCK_SIZE:
        raise MalformedBlobError(
            f"endpoint blob is {len(blob)} bytes; expected a non-zero multiple of {AES_BLOCK_SIZE}"
        )
    dec = _ecb(key).decryptor()
    plain = dec.update(bytes(blob)) + dec.finalize()
    size = plain[0]
    if size > len(plain) - 1:
        raise MalformedBlobError(f"endpoint size byte is {size} but only {len(plain) - 1} bytes follow it")
    endpoint = _parse(affiliate_pb2.Endpoint, plain[1 : 1 + size], "endpoint")
    if len(endpoint.ip) not in (4, 16):
        raise MalformedBlobError(f"endpoint ip is {len(endpoint.ip)} bytes; expected 4 or 16")
    if endpoint.port > 0xFFFF:
        raise MalformedBlobError(f"endpoint port {endpoint.port} is out of range (max 65535)")
    return endpoint


def _parse(cls: type[_M], data: bytes, what: str) -> _M:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception:  # protobuf backends differ in what they raise for garbage; all of it means "malformed"
        raise MalformedBlobError(f"{what} is not a valid {cls.DESCRIPTOR.full_name} protobuf") from None
    return msg


# --- conversions between ipaddress objects and protobuf messages -------------------------------------------


def endpoint_from_addr(ip: IPAddress | str, port: int) -> affiliate_pb2.Endpoint:
    """Build an ``Endpoint`` message from an address and a UDP port (0..65535)."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"endpoint port must be within 0..65535, got {port}")
    return affiliate_pb2.Endpoint(ip=ip_to_bytes(ip), port=port)


def endpoint_to_addr(endpoint: affiliate_pb2.Endpoint) -> tuple[IPAddress, int]:
    """``(ip, port)`` of an ``Endpoint`` message; ``ValueError`` if the ip is not 4 or 16 bytes."""
    return ip_from_bytes(endpoint.ip), endpoint.port


def prefix_to_pb(
    prefix: IPNetwork | ipaddress.IPv4Interface | ipaddress.IPv6Interface | str,
) -> affiliate_pb2.IPPrefix:
    """Build an ``IPPrefix`` message. Interfaces (host bits set) keep their address, like Go's netip.Prefix."""
    if isinstance(prefix, str):
        iface = ipaddress.ip_interface(prefix)
        return affiliate_pb2.IPPrefix(ip=iface.ip.packed, bits=iface.network.prefixlen)
    if isinstance(prefix, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return affiliate_pb2.IPPrefix(ip=prefix.ip.packed, bits=prefix.network.prefixlen)
    return affiliate_pb2.IPPrefix(ip=prefix.network_address.packed, bits=prefix.prefixlen)


def prefix_from_pb(prefix: affiliate_pb2.IPPrefix) -> IPNetwork:
    """The network of an ``IPPrefix`` message (host bits masked off).

    Raises ``ValueError`` for a bad ip length or a prefix length beyond the address size.
    """
    ip = ip_from_bytes(prefix.ip)
    if prefix.bits > ip.max_prefixlen:
        raise ValueError(f"prefix length {prefix.bits} exceeds {ip.max_prefixlen} for IPv{ip.version}")
    return ipaddress.ip_network((ip, prefix.bits), strict=False)


def addresses_to_pb(addresses: Iterable[IPAddress | str]) -> list[bytes]:
    """Binary forms of several addresses (for ``Affiliate.addresses``)."""
    return [ip_to_bytes(a) for a in addresses]
