"""Crafted WireGuard messages for relay tests: handshakes whose mac1 is right (or forged) for a given
receiver key, and transport packets. Test support only: product code never imports it."""

from __future__ import annotations

import os
import struct

from kubespan.relay import wgmsg


def handshake(receiver_public_key: bytes, kind: int = wgmsg.INITIATION, *, forged: bool = False) -> bytes:
    """A random initiation (or response) whose mac1 verifies for ``receiver_public_key``; with
    ``forged`` the mac1 is random instead. mac2 is zero, as when no cookie is in play."""
    size = {wgmsg.INITIATION: wgmsg.INITIATION_LEN, wgmsg.RESPONSE: wgmsg.RESPONSE_LEN}[kind]
    body = struct.pack("<I", kind) + os.urandom(size - 4 - 32) + bytes(32)
    if forged:
        return body[: size - 32] + os.urandom(16) + bytes(16)
    return wgmsg.with_mac1(body, receiver_public_key)


def transport(payload: int = 64, counter: int = 0) -> bytes:
    """A type-4 transport message with ``payload`` random bytes after the 16-byte header (16 at least:
    the AEAD tag of a keepalive)."""
    return struct.pack("<IIQ", wgmsg.TRANSPORT, 0x1234, counter) + os.urandom(payload)


def cookie_reply() -> bytes:
    """A random 64-byte type-3 cookie reply."""
    return struct.pack("<I", wgmsg.COOKIE_REPLY) + os.urandom(wgmsg.COOKIE_REPLY_LEN - 4)
