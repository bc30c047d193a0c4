"""The wireguard-go UAPI text protocol (cross-platform userspace interface), as a pure codec.

A request is ``get=1`` or ``set=1`` followed by ``key=value`` lines and an
empty line; the answer to ``get`` is the device as ``key=value`` lines, and
both end with ``errno=N`` and an empty line (``N`` is 0 or a negated errno).

Rules this codec keeps:

* keys travel as lowercase hex (never base64);
* ``replace_peers`` is never sent (it would drop every session); peers are
  added, updated (``update_only=true``) or removed individually;
* a changed allowed-IP list is sent as ``replace_allowed_ips=true`` plus the
  full list;
* device-level keys come before the first ``public_key`` line.

Errors never quote values, so a private key cannot leak through one.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace

from kubespan.wgdiff import AddPeer, Op, RemovePeer, SetDevice, UpdatePeer
from kubespan.wgtypes import (
    AddrPort,
    InvalidKeyError,
    IPNetwork,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    PublicKey,
    sorted_networks,
)

GET_REQUEST = b"get=1\n\n"


class UapiError(OSError):
    """wireguard-go answered with a non-zero ``errno``."""

    def __init__(self, code: int) -> None:
        self.code = code
        err = abs(code)
        super().__init__(err, f"wireguard UAPI errno={code} ({os.strerror(err)})")


class UapiProtocolError(ValueError):
    """The UAPI text is malformed (the message names the line and key, never the value)."""


# --- encoding ------------------------------------------------------------------------------------


def _peer_lines(op: AddPeer | UpdatePeer, lines: list[str]) -> None:
    if isinstance(op, AddPeer):
        cfg = op.peer
        lines.append(f"public_key={cfg.public_key.hex}")
        if cfg.preshared_key is not None:
            lines.append(f"preshared_key={cfg.preshared_key.hex}")
        if cfg.endpoint is not None:
            lines.append(f"endpoint={cfg.endpoint}")
        if cfg.persistent_keepalive:
            lines.append(f"persistent_keepalive_interval={cfg.persistent_keepalive}")
        allowed: frozenset[IPNetwork] | None = cfg.allowed_ips
    else:
        lines.append(f"public_key={op.public_key.hex}")
        lines.append("update_only=true")
        if op.preshared_key is not None:
            lines.append(f"preshared_key={op.preshared_key.hex}")
        if op.endpoint is not None:
            lines.append(f"endpoint={op.endpoint}")
        if op.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={op.persistent_keepalive}")
        allowed = op.allowed_ips
    if allowed is not None:
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in sorted_networks(allowed))


def encode_set(ops: Sequence[Op]) -> bytes | None:
    """The ``set=1`` request for ``ops``, or None when there is nothing to send."""
    if not ops:
        return None
    private_key: PrivateKey | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    peer_lines: list[str] = []
    for op in ops:
        if isinstance(op, SetDevice):
            private_key = op.private_key if op.private_key is not None else private_key
            listen_port = op.listen_port if op.listen_port is not None else listen_port
            fwmark = op.fwmark if op.fwmark is not None else fwmark
        elif isinstance(op, RemovePeer):
            peer_lines.append(f"public_key={op.public_key.hex}")
            peer_lines.append("remove=true")
        elif isinstance(op, AddPeer | UpdatePeer):
            _peer_lines(op, peer_lines)
        else:
            raise TypeError(f"unknown operation {type(op).__name__}")
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    lines.extend(peer_lines)
    if len(lines) == 1:
        return None
    return ("\n".join(lines) + "\n\n").encode("ascii")


# --- decoding ------------------------------------------------------------------------------------


def _lines(text: str | bytes) -> Iterable[tuple[int, str, str]]:
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise UapiProtocolError("UAPI response is not ASCII") from None
    for n, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiProtocolError(f"line {n}: expected key=value")
        yield n, key, value


def _int(n: int, key: str, value: str, high: int) -> int:
    if not value.isdigit():
        raise UapiProtocolError(f"line {n}: {key} must be a non-negative integer")
    number = int(value)
    if number > high:
        raise UapiProtocolError(f"line {n}: {key} is above {high}")
    return number


def parse_errno(text: str | bytes) -> int:
    """The ``errno`` of a response (0 when absent is *not* assumed: absence is an error)."""
    code: int | None = None
    for n, key, value in _lines(text):
        if key == "errno":
            try:
                code = int(value)
            except ValueError:
                raise UapiProtocolError(f"line {n}: errno must be an integer") from None
    if code is None:
        raise UapiProtocolError("response has no errno line")
    return code


def check_set_response(text: str | bytes) -> None:
    """Raise :class:`UapiError` unless the ``set`` response is ``errno=0``."""
    code = parse_errno(text)
    if code != 0:
        raise UapiError(code)


class _PeerBuilder:
    __slots__ = (
        "allowed",
        "endpoint",
        "hs_nsec",
        "hs_sec",
        "keepalive",
        "psk",
        "pubkey",
        "rx",
        "tx",
        "version",
    )

    def __init__(self, pubkey: PublicKey) -> None:
        self.pubkey = pubkey
        self.psk: PresharedKey | None = None
        self.endpoint: AddrPort | None = None
        self.keepalive = 0
        self.rx = 0
        self.tx = 0
        self.hs_sec = 0
        self.hs_nsec = 0
        self.version = 1
        self.allowed: list[IPNetwork] = []

    def build(self) -> ObservedPeer:
        handshake = None if (self.hs_sec == 0 and self.hs_nsec == 0) else self.hs_sec + self.hs_nsec / 1e9
        return ObservedPeer(
            public_key=self.pubkey,
            allowed_ips=frozenset(self.allowed),
            endpoint=self.endpoint,
            persistent_keepalive=self.keepalive,
            preshared_key=self.psk,
            rx_bytes=self.rx,
            tx_bytes=self.tx,
            last_handshake=handshake,
            protocol_version=self.version,
        )


_U64 = 2**64 - 1


def parse_get(text: str | bytes) -> ObservedDevice:
    """Parse a ``get=1`` response; raises :class:`UapiError` on a non-zero errno."""
    private_key: PrivateKey | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[PublicKey, ObservedPeer] = {}
    cur: _PeerBuilder | None = None
    errno: int | None = None

    def flush() -> None:
        if cur is not None:
            peers[cur.pubkey] = cur.build()

    for n, key, value in _lines(text):
        try:
            if key == "errno":
                try:
                    errno = int(value)
                except ValueError:
                    raise UapiProtocolError(f"line {n}: errno must be an integer") from None
            elif key == "public_key":
                flush()
                cur = _PeerBuilder(PublicKey.from_hex(value))
            elif cur is None:
                if key == "private_key":
                    private_key = PrivateKey.from_hex(value)
                    if private_key.is_zero():
                        private_key = None
                elif key == "listen_port":
                    listen_port = _int(n, key, value, 65535)
                elif key == "fwmark":
                    fwmark = _int(n, key, value, 2**32 - 1)
                # other device keys (e.g. a future "protocol_version") are ignored
            elif key == "preshared_key":
                psk = PresharedKey.from_hex(value)
                cur.psk = None if psk.is_zero() else psk
            elif key == "endpoint":
                try:
                    cur.endpoint = AddrPort.parse(value)
                except ValueError:
                    raise UapiProtocolError(f"line {n}: endpoint is not ip:port") from None
            elif key == "allowed_ip":
                try:
                    cur.allowed.append(ipaddress.ip_network(value, strict=False))
                except ValueError:
                    raise UapiProtocolError(f"line {n}: allowed_ip is not a prefix") from None
            elif key == "rx_bytes":
                cur.rx = _int(n, key, value, _U64)
            elif key == "tx_bytes":
                cur.tx = _int(n, key, value, _U64)
            elif key == "last_handshake_time_sec":
                cur.hs_sec = _int(n, key, value, _U64)
            elif key == "last_handshake_time_nsec":
                cur.hs_nsec = _int(n, key, value, 999_999_999)
            elif key == "persistent_keepalive_interval":
                cur.keepalive = _int(n, key, value, 65535)
            elif key == "protocol_version":
                cur.version = _int(n, key, value, 2**32 - 1)
            # unknown peer keys are ignored for forward compatibility
        except InvalidKeyError:
            raise UapiProtocolError(f"line {n}: {key} is not a 64-character hex key") from None
    flush()
    if errno is None:
        raise UapiProtocolError("response has no errno line")
    if errno != 0:
        raise UapiError(errno)
    return ObservedDevice(private_key, listen_port, fwmark, peers)


def encode_get_response(device: ObservedDevice) -> bytes:
    """Render a device as wireguard-go answers ``get=1`` (used by fakes and tests)."""
    lines: list[str] = []
    if device.private_key is not None:
        lines.append(f"private_key={device.private_key.hex}")
    lines.append(f"listen_port={device.listen_port}")
    if device.fwmark:
        lines.append(f"fwmark={device.fwmark}")
    for key in sorted(device.peers):
        p = device.peers[key]
        lines.append(f"public_key={key.hex}")
        psk = p.preshared_key.hex if p.preshared_key is not None else "0" * 64
        lines.append(f"preshared_key={psk}")
        lines.append(f"protocol_version={p.protocol_version}")
        if p.endpoint is not None:
            lines.append(f"endpoint={p.endpoint}")
        sec, nsec = 0, 0
        if p.last_handshake is not None:
            sec = int(p.last_handshake)
            nsec = round((p.last_handshake - sec) * 1e9)
            if nsec >= 1_000_000_000:
                sec, nsec = sec + 1, nsec - 1_000_000_000
        lines.append(f"last_handshake_time_sec={sec}")
        lines.append(f"last_handshake_time_nsec={nsec}")
        lines.append(f"tx_bytes={p.tx_bytes}")
        lines.append(f"rx_bytes={p.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
        lines.extend(f"allowed_ip={net}" for net in sorted_networks(p.allowed_ips))
    lines.append("errno=0")
    return ("\n".join(lines) + "\n\n").encode("ascii")


class _SetPeer:
    __slots__ = ("allowed", "endpoint", "keepalive", "psk", "pubkey", "remove", "replace", "update_only")

    def __init__(self, pubkey: PublicKey) -> None:
        self.pubkey = pubkey
        self.remove = False
        self.update_only = False
        self.replace = False
        self.allowed: list[IPNetwork] = []
        self.endpoint: AddrPort | None = None
        self.keepalive: int | None = None
        self.psk: PresharedKey | None = None

    def op(self) -> Op:
        if self.remove:
            return RemovePeer(self.pubkey)
        if self.allowed and not self.replace:
            raise UapiProtocolError("allowed_ip without replace_allowed_ips")
        allowed = frozenset(self.allowed) if self.replace else None
        if self.update_only:
            return UpdatePeer(self.pubkey, self.endpoint, self.keepalive, self.psk, allowed)
        return AddPeer(
            PeerConfig(self.pubkey, allowed or frozenset(), self.endpoint, self.keepalive or 0, self.psk)
        )


def decode_set(text: str | bytes) -> list[Op]:
    """Parse a ``set=1`` request back into operations (for fakes and round-trip tests).

    Raises :class:`UapiProtocolError` on anything this codec would not send,
    notably ``replace_peers``.
    """
    ops: list[Op] = []
    device = SetDevice()
    peer: _SetPeer | None = None
    started = False
    for n, key, value in _lines(text):
        try:
            if not started:
                if key != "set" or value != "1":
                    raise UapiProtocolError(f"line {n}: expected set=1")
                started = True
            elif key == "public_key":
                if peer is not None:
                    ops.append(peer.op())
                peer = _SetPeer(PublicKey.from_hex(value))
            elif peer is None:
                if key == "private_key":
                    device = replace(device, private_key=PrivateKey.from_hex(value))
                elif key == "listen_port":
                    device = replace(device, listen_port=_int(n, key, value, 65535))
                elif key == "fwmark":
                    device = replace(device, fwmark=_int(n, key, value, 2**32 - 1))
                else:
                    raise UapiProtocolError(f"line {n}: unexpected device key {key}")
            elif key == "remove" and value == "true":
                peer.remove = True
            elif key == "update_only" and value == "true":
                peer.update_only = True
            elif key == "replace_allowed_ips" and value == "true":
                peer.replace = True
            elif key == "allowed_ip":
                peer.allowed.append(ipaddress.ip_network(value, strict=False))
            elif key == "endpoint":
                peer.endpoint = AddrPort.parse(value)
            elif key == "persistent_keepalive_interval":
                peer.keepalive = _int(n, key, value, 65535)
            elif key == "preshared_key":
                peer.psk = PresharedKey.from_hex(value)
            else:
                raise UapiProtocolError(f"line {n}: unexpected peer key {key}")
        except InvalidKeyError:
            raise UapiProtocolError(f"line {n}: {key} is not a 64-character hex key") from None
        except UapiProtocolError:
            raise
        except ValueError:
            raise UapiProtocolError(f"line {n}: bad value for {key}") from None
    if not started:
        raise UapiProtocolError("empty request")
    if peer is not None:
        ops.append(peer.op())
    if device != SetDevice():
        ops.insert(0, device)
    return ops
