"""Value types for WireGuard configuration and observed state.

Keys are 32-byte values with base64 (WireGuard's text form) and hex (UAPI's
form) codecs. Secret keys (private, preshared) never show their bytes in
``repr``/``str``; only an explicit ``.b64``/``.hex`` reveals them.

Desired peers (:class:`PeerConfig`) and observed peers (:class:`ObservedPeer`)
share field meanings: ``endpoint=None`` in a *desired* peer means "leave
whatever WireGuard has (it may have roamed)", as in Talos.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType
from typing import Self

from spanutil.ipcodec import IPAddress, IPNetwork

KEY_LEN = 32


class InvalidKeyError(ValueError):
    """A key is not 32 bytes / valid base64 / valid hex."""


@dataclass(frozen=True, slots=True)
class _Key:
    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes | bytearray) or len(self.raw) != KEY_LEN:
            raise InvalidKeyError(f"{type(self).__name__} must be {KEY_LEN} bytes")
        object.__setattr__(self, "raw", bytes(self.raw))

    @classmethod
    def from_b64(cls, text: str) -> Self:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError, AttributeError):
            raise InvalidKeyError(f"{cls.__name__}: not valid base64") from None
        if len(raw) != KEY_LEN:
            raise InvalidKeyError(f"{cls.__name__}: decodes to {len(raw)} bytes, need {KEY_LEN}")
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> Self:
        if len(text) != 2 * KEY_LEN:
            raise InvalidKeyError(f"{cls.__name__}: hex must be {2 * KEY_LEN} characters")
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise InvalidKeyError(f"{cls.__name__}: not valid hex") from None

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def is_zero(self) -> bool:
        return self.raw == bytes(KEY_LEN)

    def __hash__(self) -> int:
        # keys are dict keys all over a reconcile; cheaper than the generated hash((self.raw,))
        return hash(self.raw)


class PublicKey(_Key):
    """A Curve25519 public key; ordering by bytes gives a stable peer order."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"PublicKey({self.b64})"

    def __str__(self) -> str:
        return self.b64

    def __lt__(self, other: PublicKey) -> bool:
        return self.raw < other.raw


class _SecretKey(_Key):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


class PrivateKey(_SecretKey):
    """A Curve25519 private key (clamped form)."""

    __slots__ = ()

    def public_key(self) -> PublicKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        pub = X25519PrivateKey.from_private_bytes(self.raw).public_key()
        return PublicKey(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))


class PresharedKey(_SecretKey):
    """A WireGuard preshared key (KubeSpan uses the cluster secret for every peer)."""

    __slots__ = ()


ZERO_PSK = PresharedKey(bytes(KEY_LEN))


@dataclass(frozen=True, slots=True)
class AddrPort:
    """An IP address and UDP port: a WireGuard endpoint."""

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.ip, IPv4Address | IPv6Address):
            object.__setattr__(self, "ip", ipaddress.ip_address(self.ip))
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port!r} must be 1..65535")

    @classmethod
    def parse(cls, text: str) -> AddrPort:
        """Parse ``1.2.3.4:51820`` or ``[2001:db8::1]:51820`` (a zone ``%eth0`` is allowed)."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"endpoint {text!r}: expected [ipv6]:port")
        else:
            host, sep, port = text.rpartition(":")
            if not sep or ":" in host:
                raise ValueError(f"endpoint {text!r}: expected ip:port (IPv6 in brackets)")
        if not port.isdigit():
            raise ValueError(f"endpoint {text!r}: port must be a number")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"endpoint {text!r}: {host!r} is not an IP address") from None
        return cls(ip, int(port))

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


def normalize_networks(nets: Iterable[IPNetwork | str]) -> frozenset[IPNetwork]:
    """Networks as a frozenset; host bits are cleared (WireGuard does the same)."""
    return frozenset(ipaddress.ip_network(n, strict=False) for n in nets)


def sorted_networks(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    """IPv4 first, then by address and prefix length: a stable display/wire order."""
    return sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Desired configuration of one WireGuard peer."""

    public_key: PublicKey
    allowed_ips: frozenset[IPNetwork] = frozenset()
    endpoint: AddrPort | None = None  # None: leave what WireGuard has
    persistent_keepalive: int = 0  # seconds, 0 = off
    preshared_key: PresharedKey | None = None  # None and the zero key both mean "no PSK"

    def __post_init__(self) -> None:
        if not isinstance(self.allowed_ips, frozenset):
            object.__setattr__(self, "allowed_ips", normalize_networks(self.allowed_ips))
        if self.preshared_key is not None and self.preshared_key.is_zero():
            object.__setattr__(self, "preshared_key", None)
        if not 0 <= self.persistent_keepalive <= 65535:
            raise ValueError(f"persistent_keepalive: {self.persistent_keepalive} must be 0..65535")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Desired configuration of the WireGuard device."""

    private_key: PrivateKey
    listen_port: int
    fwmark: int = 0
    peers: Mapping[PublicKey, PeerConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        peers = dict(self.peers)
        for key, peer in peers.items():
            if key is not peer.public_key and key != peer.public_key:  # `is`: no Python-level __eq__ per peer
                raise ValueError(f"peers: key {key} does not match peer {peer.public_key}")
        object.__setattr__(self, "peers", MappingProxyType(peers))

    @classmethod
    def of(
        cls, private_key: PrivateKey, listen_port: int, fwmark: int, peers: Iterable[PeerConfig]
    ) -> DeviceConfig:
        return cls(private_key, listen_port, fwmark, {p.public_key: p for p in peers})


@dataclass(frozen=True, slots=True)
class ObservedPeer:
    """A peer as WireGuard reports it."""

    public_key: PublicKey
    allowed_ips: frozenset[IPNetwork] = frozenset()
    endpoint: AddrPort | None = None
    persistent_keepalive: int = 0
    preshared_key: PresharedKey | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float | None = None  # unix seconds; None = never
    protocol_version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.allowed_ips, frozenset):
            object.__setattr__(self, "allowed_ips", normalize_networks(self.allowed_ips))
        if self.preshared_key is not None and self.preshared_key.is_zero():
            object.__setattr__(self, "preshared_key", None)

    def config(self) -> PeerConfig:
        """The configuration part (what a diff compares)."""
        return PeerConfig(
            self.public_key,
            self.allowed_ips,
            self.endpoint,
            self.persistent_keepalive,
            self.preshared_key,
        )


_OBSERVED_PEER_FIELDS = (
    "public_key",
    "allowed_ips",
    "endpoint",
    "persistent_keepalive",
    "preshared_key",
    "rx_bytes",
    "tx_bytes",
    "last_handshake",
    "protocol_version",
)
if tuple(f.name for f in fields(ObservedPeer)) != _OBSERVED_PEER_FIELDS:  # pragma: no cover
    raise RuntimeError("observed_peer_unchecked must set every field of ObservedPeer")
(
    _set_public_key,
    _set_allowed_ips,
    _set_endpoint,
    _set_keepalive,
    _set_psk,
    _set_rx,
    _set_tx,
    _set_handshake,
    _set_version,
) = (ObservedPeer.__dict__[name].__set__ for name in _OBSERVED_PEER_FIELDS)


def observed_peer_unchecked(
    public_key: PublicKey,
    allowed_ips: frozenset[IPNetwork],
    endpoint: AddrPort | None,
    persistent_keepalive: int,
    preshared_key: PresharedKey | None,
    rx_bytes: int,
    tx_bytes: int,
    last_handshake: float | None,
    protocol_version: int,
) -> ObservedPeer:
    """An :class:`ObservedPeer` from values a parser has already checked and normalised
    (``allowed_ips`` a frozenset, never the all-zero PSK): ``__post_init__`` is not run again.
    About a third cheaper than the constructor, which counts when a status poll parses 1000 peers."""
    peer = object.__new__(ObservedPeer)
    _set_public_key(peer, public_key)
    _set_allowed_ips(peer, allowed_ips)
    _set_endpoint(peer, endpoint)
    _set_keepalive(peer, persistent_keepalive)
    _set_psk(peer, preshared_key)
    _set_rx(peer, rx_bytes)
    _set_tx(peer, tx_bytes)
    _set_handshake(peer, last_handshake)
    _set_version(peer, protocol_version)
    return peer


def handshake_time(sec: int, nsec: int) -> float | None:
    """WireGuard's last-handshake timespec as unix seconds; None for 0/0 (never)."""
    return None if sec == 0 and nsec == 0 else sec + nsec / 1e9


class ObservedPeerBuilder:
    """One peer's fields as a readback reports them, attribute by attribute (a UAPI ``get`` line by
    line, a netlink dump in parts that repeat the key), then :meth:`build` makes the
    :class:`ObservedPeer`. Both WireGuard backends parse into it."""

    __slots__ = (
        "allowed",
        "endpoint",
        "hs_nsec",
        "hs_sec",
        "keepalive",
        "psk",
        "public_key",
        "rx",
        "tx",
        "version",
    )

    def __init__(self, public_key: PublicKey) -> None:
        self.public_key = public_key
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
        return ObservedPeer(
            public_key=self.public_key,
            allowed_ips=frozenset(self.allowed),
            endpoint=self.endpoint,
            persistent_keepalive=self.keepalive,
            preshared_key=self.psk,
            rx_bytes=self.rx,
            tx_bytes=self.tx,
            last_handshake=handshake_time(self.hs_sec, self.hs_nsec),
            protocol_version=self.version,
        )


@dataclass(frozen=True, slots=True)
class ObservedDevice:
    """The WireGuard device as reported (UAPI ``get=1`` or a netlink dump)."""

    private_key: PrivateKey | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: Mapping[PublicKey, ObservedPeer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", MappingProxyType(dict(self.peers)))

    @property
    def public_key(self) -> PublicKey | None:
        return None if self.private_key is None else self.private_key.public_key()
