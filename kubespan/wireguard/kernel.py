"""Kernel WireGuard over generic netlink (family ``wireguard``), through pyroute2's transport.

The WireGuard semantics are ours, in two pure functions: :func:`encode_set` batches diff operations
into as few ``WG_CMD_SET_DEVICE`` messages as fit below :data:`MAX_MESSAGE_SIZE`, and :func:`parse_dump`
merges a dump and refuses an interrupted one. The kernel facts they rest on, and why pyroute2's
high-level calls are not used: docs/design/wireguard-kernel.md. Keys never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import os
import secrets
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from socket import AF_INET, AF_INET6
from typing import Any, Protocol

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import wgmsg

from kubespan.constants import check_link_name
from kubespan.wireguard.diff import AddPeer, Op, RemovePeer, UpdatePeer, split_ops
from kubespan.wireguard.types import (
    AddrPort,
    ObservedDevice,
    ObservedPeerBuilder,
    PresharedKey,
    PrivateKey,
    PublicKey,
    sorted_networks,
)
from spanutil.ipcodec import IPNetwork
from spanutil.logs import log_event

try:
    from kubespan.wireguard.backend import WireGuardError
except ModuleNotFoundError as exc:  # backend.py not written yet: same contract, local fallback
    if exc.name != "kubespan.wireguard.backend":
        raise

    class WireGuardError(OSError):  # type: ignore[no-redef]
        """A WireGuard backend operation failed (``errno`` says why)."""


__all__ = [
    "DUMP_ATTEMPTS",
    "MAX_MESSAGE_SIZE",
    "WGPEER_F_REMOVE_ME",
    "WGPEER_F_REPLACE_ALLOWEDIPS",
    "WGPEER_F_UPDATE_ONLY",
    "WG_CMD_GET_DEVICE",
    "WG_CMD_SET_DEVICE",
    "WG_GENL_NAME",
    "WG_GENL_VERSION",
    "DumpInterrupted",
    "KernelBackend",
    "WireGuardError",
    "decode_messages",
    "encode_set",
    "kernel_available",
    "message_size",
    "parse_dump",
]

logger = logging.getLogger("kubespan.wireguard")

# --- protocol constants (include/uapi/linux/wireguard.h) -----------------------------------------

WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1
WGDEVICE_F_REPLACE_PEERS = 0x1  # never sent
WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_MIN_TYPE = 0x10  # below: netlink control messages

#: Largest SET_DEVICE message we send: 4-aligned and small enough that the nested
#: ``WGDEVICE_A_PEERS`` attribute (whose length is a u16) can never overflow.
MAX_MESSAGE_SIZE = 0xFFFC
#: How often :meth:`KernelBackend.get` re-reads a dump flagged ``NLM_F_DUMP_INTR``.
DUMP_ATTEMPTS = 5

# --- wire sizes (netlink attributes are 4-byte headers plus payload padded to 4) ----------------

_NLMSG_HDR = 16
_GENL_HDR = 4
_NLA_HDR = 4


def _nla(payload: int) -> int:
    return _NLA_HDR + ((payload + 3) & ~3)


_KEY_ATTR = _nla(32)
_INT_ATTR = _nla(4)  # u8, u16 and u32 all pad to 8 bytes
_ENDPOINT4 = _nla(16)  # struct sockaddr_in
_ENDPOINT6 = _nla(28)  # struct sockaddr_in6
_ALLOWED_IP4 = _NLA_HDR + _nla(2) + _nla(4) + _nla(1)
_ALLOWED_IP6 = _NLA_HDR + _nla(2) + _nla(16) + _nla(1)
_CONT_HEAD = _NLA_HDR + _KEY_ATTR + _INT_ATTR  # peer nest + public key + flags


class DumpInterrupted(WireGuardError):
    """The kernel flagged a dump ``NLM_F_DUMP_INTR``: the device changed while it was read."""

    def __init__(self, detail: str = "WireGuard dump was interrupted by a concurrent change") -> None:
        super().__init__(errno.EINTR, detail)


def _protocol_error(detail: str) -> WireGuardError:
    return WireGuardError(errno.EPROTO, f"malformed WireGuard netlink message: {detail}")


def _check_ifname(ifname: str) -> None:
    check_link_name(ifname, "ifname")


def _check_max_size(max_size: int) -> None:
    if not 0 < max_size <= MAX_MESSAGE_SIZE:
        raise ValueError(f"max_size: {max_size} must be 1..{MAX_MESSAGE_SIZE} (netlink attribute limit)")


# --- encoding ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PeerEntry:
    """One peer's part of a SET_DEVICE message; ``None`` means "attribute absent"."""

    public_key: PublicKey
    flags: int
    preshared_key: PresharedKey | None = None
    endpoint: AddrPort | None = None
    keepalive: int | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()

    def head_size(self) -> int:
        size = _NLA_HDR + _KEY_ATTR + _INT_ATTR
        if self.preshared_key is not None:
            size += _KEY_ATTR
        if self.endpoint is not None:
            size += _ENDPOINT4 if self.endpoint.ip.version == 4 else _ENDPOINT6
        if self.keepalive is not None:
            size += _INT_ATTR
        return size


_ZERO_PSK = PresharedKey(bytes(32))


def _entry(op: AddPeer | RemovePeer | UpdatePeer) -> _PeerEntry:
    if isinstance(op, RemovePeer):
        return _PeerEntry(op.public_key, WGPEER_F_REMOVE_ME)
    if isinstance(op, AddPeer):
        # "exactly this configuration", also when the peer already exists: replace the
        # allowed IPs, set (or clear, with the zero key) the PSK, set the keepalive even if 0.
        cfg = op.peer
        return _PeerEntry(
            cfg.public_key,
            WGPEER_F_REPLACE_ALLOWEDIPS,
            cfg.preshared_key if cfg.preshared_key is not None else _ZERO_PSK,
            cfg.endpoint,
            cfg.persistent_keepalive,
            tuple(sorted_networks(cfg.allowed_ips)),
        )
    flags = WGPEER_F_UPDATE_ONLY
    allowed: tuple[IPNetwork, ...] = ()
    if op.allowed_ips is not None:
        flags |= WGPEER_F_REPLACE_ALLOWEDIPS
        allowed = tuple(sorted_networks(op.allowed_ips))
    return _PeerEntry(op.public_key, flags, op.preshared_key, op.endpoint, op.persistent_keepalive, allowed)


def _allowed_ip_attrs(net: IPNetwork) -> dict[str, Any]:
    family = AF_INET if net.version == 4 else AF_INET6
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
            ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen],
        ]
    }


def _peer_attrs(entry: _PeerEntry, nets: Sequence[IPNetwork], *, head: bool) -> dict[str, Any]:
    """The peer as codec attributes; a continuation (``head=False``) appends allowed IPs only."""
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", entry.public_key.b64]]
    if head:
        attrs.append(["WGPEER_A_FLAGS", entry.flags])
        if entry.preshared_key is not None:
            attrs.append(["WGPEER_A_PRESHARED_KEY", entry.preshared_key.b64])
        if entry.endpoint is not None:
            # a zone (fe80::1%eth0) cannot be expressed here; the kernel gets the bare address
            addr = str(entry.endpoint.ip).partition("%")[0]
            attrs.append(["WGPEER_A_ENDPOINT", {"addr": addr, "port": entry.endpoint.port}])
        if entry.keepalive is not None:
            attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", entry.keepalive])
    else:
        attrs.append(["WGPEER_A_FLAGS", WGPEER_F_UPDATE_ONLY])
    if nets:
        attrs.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip_attrs(n) for n in nets]])
    return {"attrs": attrs}


class _Batch:
    __slots__ = ("device_attrs", "peers", "size")

    def __init__(self, base: int, device_attrs: list[list[Any]], device_size: int) -> None:
        self.device_attrs = device_attrs
        self.peers: list[dict[str, Any]] = []
        # reserve the WGDEVICE_A_PEERS header up front; message_size() gives the exact figure
        self.size = base + device_size + _NLA_HDR

    def message(self, ifname: str) -> wgmsg:
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"] = [["WGDEVICE_A_IFNAME", ifname], *self.device_attrs]
        if self.peers:
            msg["attrs"].append(["WGDEVICE_A_PEERS", self.peers])
        return msg


def encode_set(ifname: str, ops: Iterable[Op], *, max_size: int = MAX_MESSAGE_SIZE) -> list[wgmsg]:
    """``WG_CMD_SET_DEVICE`` messages (pyroute2 ``wgmsg``, not yet encoded) executing ``ops``.

    * Device settings from all :class:`SetDevice` ops (the last non-``None`` value
      of each field wins) go into the first message; peers follow in op order.
    * Each message's encoded size stays at or below ``max_size``. A peer goes into
      the current message if it fits, else whole into the next one; only a peer
      too large for any message is split: the first chunk carries its flags
      (``REPLACE_ALLOWEDIPS`` among them) and settings, later chunks only
      ``UPDATE_ONLY`` and more allowed IPs, which the kernel appends.
    * An empty list means there is nothing to send.

    The messages hold key material (base64, as the codec wants it): never log them.
    The netlink header (family id, flags, sequence) is filled in when sending.
    """
    _check_ifname(ifname)
    _check_max_size(max_size)
    device, peer_ops = split_ops(ops)
    private_key, listen_port, fwmark = device.private_key, device.listen_port, device.fwmark
    entries = [_entry(op) for op in peer_ops]

    device_attrs: list[list[Any]] = []
    device_size = 0
    if private_key is not None:
        device_attrs.append(["WGDEVICE_A_PRIVATE_KEY", private_key.b64])
        device_size += _KEY_ATTR
    if listen_port is not None:
        if not 0 <= listen_port <= 0xFFFF:
            raise ValueError(f"listen_port: {listen_port} must be 0..65535")
        device_attrs.append(["WGDEVICE_A_LISTEN_PORT", listen_port])
        device_size += _INT_ATTR
    if fwmark is not None:
        if not 0 <= fwmark <= 0xFFFFFFFF:
            raise ValueError(f"fwmark: {fwmark:#x} must fit in 32 bits")
        device_attrs.append(["WGDEVICE_A_FWMARK", fwmark])
        device_size += _INT_ATTR
    if not entries and not device_attrs:
        return []

    base = _NLMSG_HDR + _GENL_HDR + _nla(len(ifname) + 1)
    batches = [_Batch(base, device_attrs, device_size)]
    fresh = _Batch(base, [], 0).size
    if batches[0].size > max_size:
        raise ValueError(f"max_size: {max_size} bytes cannot hold the device settings")

    for entry in entries:
        head = entry.head_size()
        nets = entry.allowed_ips
        ip_sizes = [_ALLOWED_IP4 if n.version == 4 else _ALLOWED_IP6 for n in nets]
        whole = head + (_NLA_HDR + sum(ip_sizes) if nets else 0)
        cur = batches[-1]
        if cur.size + whole > max_size and fresh + whole <= max_size:
            cur = _Batch(base, [], 0)
            batches.append(cur)
        if cur.size + whole <= max_size:
            cur.peers.append(_peer_attrs(entry, nets, head=True))
            cur.size += whole
            continue
        if not nets:
            raise ValueError(f"max_size: {max_size} bytes cannot hold one peer")
        # too large for any message: split the allowed IPs, starting in the current message
        start = 0
        first = True
        while start < len(nets):
            room = max_size - cur.size - (head if first else _CONT_HEAD) - _NLA_HDR
            end = start
            used = 0
            while end < len(nets) and used + ip_sizes[end] <= room:
                used += ip_sizes[end]
                end += 1
            if end == start:
                if cur.size == fresh and not cur.peers:
                    raise ValueError(f"max_size: {max_size} bytes cannot hold one allowed IP")
                cur = _Batch(base, [], 0)
                batches.append(cur)
                continue
            cur.peers.append(_peer_attrs(entry, nets[start:end], head=first))
            cur.size += (head if first else _CONT_HEAD) + _NLA_HDR + used
            start = end
            first = False
            if start < len(nets):
                cur = _Batch(base, [], 0)
                batches.append(cur)
    return [b.message(ifname) for b in batches]


def message_size(msg: wgmsg) -> int:
    """The encoded size of a message built by :func:`encode_set` (encodes a copy)."""
    copy = wgmsg()
    copy["cmd"] = msg["cmd"]
    copy["version"] = msg["version"]
    copy["attrs"] = msg["attrs"]
    copy["header"]["type"] = NLMSG_MIN_TYPE
    copy["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    copy.encode()
    return len(copy.data)


# --- decoding ------------------------------------------------------------------------------------


def decode_messages(data: bytes) -> list[nlmsg]:
    """Split and decode a buffer of netlink messages with the WireGuard codec.

    Family messages become ``wgmsg``; ``NLMSG_DONE`` and other control messages
    are kept with their header (so :func:`parse_dump` sees their flags);
    an ``NLMSG_ERROR`` with a non-zero code raises :class:`WireGuardError`.
    """
    out: list[nlmsg] = []
    offset = 0
    while offset + _NLMSG_HDR <= len(data):
        length, mtype = struct.unpack_from("=IH", data, offset)
        if length < _NLMSG_HDR or offset + length > len(data):
            raise _protocol_error(f"message at offset {offset} has length {length}")
        chunk = bytes(data[offset : offset + length])
        if mtype == NLMSG_ERROR:
            if length < _NLMSG_HDR + 4:
                raise _protocol_error("truncated NLMSG_ERROR")
            (code,) = struct.unpack_from("=i", chunk, _NLMSG_HDR)
            if code:
                raise WireGuardError(abs(code), f"netlink error: {os.strerror(abs(code))}")
            msg = nlmsg(chunk)
        elif mtype < NLMSG_MIN_TYPE:
            msg = nlmsg(chunk)
        else:
            msg = wgmsg(chunk)
        msg.decode()
        out.append(msg)
        offset += (length + 3) & ~3
    if offset < len(data) and any(data[offset:]):
        raise _protocol_error(f"{len(data) - offset} trailing bytes")
    return out


def _key(value: Any, what: str) -> bytes:
    # the codec hands keys over in base64
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise _protocol_error(f"{what} is not a key") from None
    if len(raw) != 32:
        raise _protocol_error(f"{what} is {len(raw)} bytes, need 32")
    return raw


def _allowed_ip(item: Any) -> IPNetwork:
    family = addr = cidr = None
    for name, value in item["attrs"]:
        if name == "WGALLOWEDIP_A_FAMILY":
            family = value
        elif name == "WGALLOWEDIP_A_IPADDR":
            addr = value
        elif name == "WGALLOWEDIP_A_CIDR_MASK":
            cidr = value
    if family is None or addr is None or cidr is None:
        raise _protocol_error("allowed IP lacks family, address or mask")
    raw = bytes.fromhex(addr.replace(":", "")) if isinstance(addr, str) else bytes(addr)
    try:
        if family == AF_INET and len(raw) == 4 and cidr <= 32:
            return IPv4Network((int.from_bytes(raw, "big"), cidr), strict=False)
        if family == AF_INET6 and len(raw) == 16 and cidr <= 128:
            return IPv6Network((int.from_bytes(raw, "big"), cidr), strict=False)
    except ValueError:
        pass
    raise _protocol_error(f"allowed IP of family {family} with {len(raw)} address bytes and mask {cidr}")


def _endpoint(value: Any) -> AddrPort | None:
    family = value.get("family")
    if family not in (AF_INET, AF_INET6) or not value.get("port"):
        return None
    ip: IPv4Address | IPv6Address = ip_address(value["addr"])
    return AddrPort(ip, value["port"])


def _merge_peer(item: Any, peers: dict[PublicKey, ObservedPeerBuilder]) -> None:
    attrs = item["attrs"]
    key: PublicKey | None = None
    for name, value in attrs:
        if name == "WGPEER_A_PUBLIC_KEY":
            key = PublicKey(_key(value, "peer public key"))
            break
    if key is None:
        raise _protocol_error("peer without public key")
    acc = peers.get(key)
    if acc is None:
        acc = peers[key] = ObservedPeerBuilder(key)
    for name, value in attrs:
        if name == "WGPEER_A_ALLOWEDIPS":
            # a continuation part repeats the key and carries more allowed IPs: append
            acc.allowed.extend(_allowed_ip(ip) for ip in value)
        elif name == "WGPEER_A_PRESHARED_KEY":
            psk = PresharedKey(_key(value, "preshared key"))
            acc.psk = None if psk.is_zero() else psk
        elif name == "WGPEER_A_ENDPOINT":
            acc.endpoint = _endpoint(value)
        elif name == "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL":
            acc.keepalive = value
        elif name == "WGPEER_A_RX_BYTES":
            acc.rx = value
        elif name == "WGPEER_A_TX_BYTES":
            acc.tx = value
        elif name == "WGPEER_A_LAST_HANDSHAKE_TIME":
            acc.hs_sec, acc.hs_nsec = value["tv_sec"], value["tv_nsec"]
        elif name == "WGPEER_A_PROTOCOL_VERSION":
            acc.version = value


def parse_dump(messages: Iterable[nlmsg], *, interrupted: bool = False) -> ObservedDevice:
    """Merge the parts of a ``GET_DEVICE`` dump (decoded by the codec) into one device.

    Raises :class:`DumpInterrupted` when any part, ``NLMSG_DONE`` included, carries
    ``NLM_F_DUMP_INTR`` (or ``interrupted`` says a part the caller saw did), and
    :class:`WireGuardError` (``EPROTO``) on malformed content.
    """
    if interrupted:
        raise DumpInterrupted()
    private_key: PrivateKey | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[PublicKey, ObservedPeerBuilder] = {}
    parts = 0
    for msg in messages:
        header = msg["header"]
        if header.get("flags", 0) & NLM_F_DUMP_INTR and header.get("type") != NLMSG_ERROR:
            raise DumpInterrupted()
        if header.get("type", NLMSG_MIN_TYPE) < NLMSG_MIN_TYPE:
            continue
        parts += 1
        for name, value in msg["attrs"]:
            if name == "WGDEVICE_A_PEERS":
                for item in value:
                    _merge_peer(item, peers)
            elif name == "WGDEVICE_A_PRIVATE_KEY":
                key = PrivateKey(_key(value, "private key"))
                private_key = None if key.is_zero() else key
            elif name == "WGDEVICE_A_LISTEN_PORT":
                listen_port = value
            elif name == "WGDEVICE_A_FWMARK":
                fwmark = value
    if parts == 0:
        raise _protocol_error("dump has no device message")
    return ObservedDevice(private_key, listen_port, fwmark, {k: a.build() for k, a in peers.items()})


def _get_request(ifname: str) -> wgmsg:
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"] = [["WGDEVICE_A_IFNAME", ifname]]
    return msg


# --- I/O -----------------------------------------------------------------------------------------


class GenlSocket(Protocol):
    """What :class:`KernelBackend` needs of ``pyroute2.AsyncWireGuard`` (fakes implement it)."""

    @property
    def prid(self) -> int: ...

    async def setup_endpoint(self) -> None: ...

    async def nlm_request(
        self, msg: Any, msg_type: int, msg_flags: int = ..., terminate: Any = None, callback: Any = None
    ) -> AsyncIterator[Any]: ...

    def close(self) -> None: ...


class IPRoute(Protocol):
    """What we need of ``pyroute2.AsyncIPRoute``: ``link()`` and ``async with``."""

    async def link(self, command: str, **kwarg: Any) -> Any: ...

    async def __aenter__(self) -> IPRoute: ...

    async def __aexit__(self, *exc: object) -> Any: ...


def _pyroute2_kwargs(netns: str | None) -> dict[str, Any]:
    # flags=0: a named netns that does not exist is an error, not silently created
    return {} if netns is None else {"netns": netns, "flags": 0}


def default_genl_factory(netns: str | None) -> Callable[[], GenlSocket]:
    def make() -> GenlSocket:
        from pyroute2.netlink.generic.wireguard import AsyncWireGuard

        return AsyncWireGuard(**_pyroute2_kwargs(netns))

    return make


def default_iproute_factory(netns: str | None) -> Callable[[], IPRoute]:
    def make() -> IPRoute:
        from pyroute2.iproute import AsyncIPRoute

        return AsyncIPRoute(groups=0, **_pyroute2_kwargs(netns))

    return make


@contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """Plain OSErrors (a missing netns, socket trouble) become WireGuardError naming ``what``."""
    try:
        yield
    except WireGuardError:
        raise
    except OSError as e:
        code = e.errno or errno.EIO
        raise WireGuardError(code, f"{what}: {os.strerror(code)}") from None


def _where(netns: str | None) -> str:
    return "" if netns is None else f" in netns {netns}"


def _link_kind(link: Any) -> str | None:
    return link.get(("linkinfo", "kind"))


async def _get_link(ipr: IPRoute, ifname: str) -> Any | None:
    try:
        links = await ipr.link("get", ifname=ifname)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise WireGuardError(e.code, f"looking up link {ifname}: {os.strerror(e.code)}") from None
    return links[0] if links else None


_UNAVAILABLE = frozenset({errno.EOPNOTSUPP, errno.ENODEV})


async def kernel_available(
    netns: str | None = None, *, iproute_factory: Callable[[], IPRoute] | None = None
) -> bool:
    """Whether ``ip link add type wireguard`` works: creates and deletes a throwaway link.

    False when the kernel has no WireGuard (``EOPNOTSUPP``, ``ENODEV``, "unknown
    kind"); other failures (``EPERM``...) raise :class:`WireGuardError`, since
    neither backend could configure links then.
    """
    factory = iproute_factory or default_iproute_factory(netns)
    probe = f"ksprobe{secrets.token_hex(4)}"
    with _os_errors(f"probing kernel WireGuard{_where(netns)}"):
        return await _probe(factory, probe)


async def _probe(factory: Callable[[], IPRoute], probe: str) -> bool:
    async with factory() as ipr:
        try:
            await ipr.link("add", ifname=probe, kind="wireguard")
        except NetlinkError as e:
            if e.code in _UNAVAILABLE or "unknown" in str(e).lower():
                log_event(logger, "kernel wireguard unavailable", logging.DEBUG, errno=e.code)
                return False
            raise WireGuardError(e.code, f"probing kernel WireGuard: {os.strerror(e.code)}") from None
        try:
            await ipr.link("del", ifname=probe)
        except NetlinkError as e:
            log_event(logger, "probe link not deleted", logging.WARNING, link=probe, errno=e.code)
    return True


class KernelBackend:
    """The kernel WireGuard device ``ifname`` (in network namespace ``netns``, if named).

    ``apply`` is not transactional across messages: when message *k* of *n* fails,
    the first *k-1* stay applied; the caller re-reads with ``get`` and diffs again.
    """

    name = "kernel"

    def __init__(
        self,
        ifname: str = "kubespan",
        *,
        netns: str | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        dump_attempts: int = DUMP_ATTEMPTS,
        genl_factory: Callable[[], GenlSocket] | None = None,
        iproute_factory: Callable[[], IPRoute] | None = None,
    ) -> None:
        _check_ifname(ifname)
        _check_max_size(max_message_size)
        if dump_attempts < 1:
            raise ValueError(f"dump_attempts: {dump_attempts} must be at least 1")
        self.ifname = ifname
        self.netns = netns
        self.max_message_size = max_message_size
        self.dump_attempts = dump_attempts
        self._genl_factory = genl_factory or default_genl_factory(netns)
        self._iproute_factory = iproute_factory or default_iproute_factory(netns)
        self._sock: GenlSocket | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"KernelBackend(ifname={self.ifname!r}, netns={self.netns!r})"

    # -- link -----------------------------------------------------------------------------------

    async def ensure_device(self) -> None:
        """Create the WireGuard link unless it exists; a same-named link of another kind is an error."""
        with _os_errors(f"creating wireguard link {self.ifname}{_where(self.netns)}"):
            await self._ensure_device()

    async def _ensure_device(self) -> None:
        async with self._iproute_factory() as ipr:
            link = await _get_link(ipr, self.ifname)
            if link is None:
                try:
                    await ipr.link("add", ifname=self.ifname, kind="wireguard")
                    log_event(logger, "wireguard link created", backend=self.name, link=self.ifname)
                    return
                except NetlinkError as e:
                    if e.code != errno.EEXIST:  # EEXIST: lost a race, check what won it
                        raise WireGuardError(
                            e.code, f"creating wireguard link {self.ifname}: {os.strerror(e.code)}"
                        ) from None
                link = await _get_link(ipr, self.ifname)
            kind = None if link is None else _link_kind(link)
            if link is not None and kind != "wireguard":
                raise WireGuardError(
                    errno.EEXIST,
                    f"link {self.ifname} exists and is of kind {kind or 'unknown'}, not wireguard",
                )

    async def _remove_device(self) -> None:
        with _os_errors(f"deleting link {self.ifname}{_where(self.netns)}"):
            await self._delete_link()

    async def _delete_link(self) -> None:
        async with self._iproute_factory() as ipr:
            link = await _get_link(ipr, self.ifname)
            if link is None or _link_kind(link) != "wireguard":
                return  # never delete a link we do not own
            try:
                await ipr.link("del", ifname=self.ifname)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise WireGuardError(
                        e.code, f"deleting link {self.ifname}: {os.strerror(e.code)}"
                    ) from None

    # -- generic netlink ------------------------------------------------------------------------

    async def _socket(self) -> GenlSocket:
        if self._sock is None:
            with _os_errors(f"opening generic netlink for {self.ifname}{_where(self.netns)}"):
                sock = self._genl_factory()
            try:
                await sock.setup_endpoint()  # binds and resolves the "wireguard" family id
            except NetlinkError as e:
                sock.close()
                hint = " (is the wireguard kernel module loaded?)" if e.code == errno.ENOENT else ""
                raise WireGuardError(
                    e.code, f"generic netlink family {WG_GENL_NAME!r}: {os.strerror(e.code)}{hint}"
                ) from None
            except OSError as e:
                sock.close()
                code = e.errno or errno.EIO
                raise WireGuardError(
                    code,
                    f"opening generic netlink for {self.ifname}{_where(self.netns)}: {os.strerror(code)}",
                ) from None
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def _request(
        self, msg: wgmsg, flags: int, callback: Callable[[Any], bool] | None = None
    ) -> list[Any]:
        sock = await self._socket()
        try:
            answer = await sock.nlm_request(msg, msg_type=sock.prid, msg_flags=flags, callback=callback)
            return [m async for m in answer]
        except NetlinkError:
            raise
        except OSError as e:
            self._drop_socket()  # a broken socket is replaced on the next call
            code = e.errno or errno.EIO
            raise WireGuardError(code, f"netlink socket for {self.ifname}: {os.strerror(code)}") from None

    async def get(self) -> ObservedDevice | None:
        """The device as the kernel reports it, or None when the link does not exist."""
        async with self._lock:
            for attempt in range(1, self.dump_attempts + 1):
                flags_seen = 0

                def note(msg: Any) -> bool:
                    nonlocal flags_seen
                    header = msg["header"]
                    if header.get("type") != NLMSG_ERROR:
                        flags_seen |= header.get("flags", 0) or 0
                    return False  # only observe; the message is delivered as usual

                try:
                    parts = await self._request(_get_request(self.ifname), NLM_F_REQUEST | NLM_F_DUMP, note)
                except NetlinkError as e:
                    if e.code == errno.ENODEV:
                        return None
                    raise WireGuardError(e.code, f"reading {self.ifname}: {os.strerror(e.code)}") from None
                try:
                    return parse_dump(parts, interrupted=bool(flags_seen & NLM_F_DUMP_INTR))
                except DumpInterrupted:
                    log_event(
                        logger,
                        "wireguard dump interrupted",
                        logging.DEBUG,
                        link=self.ifname,
                        attempt=attempt,
                        attempts=self.dump_attempts,
                    )
                    await asyncio.sleep(0)
            raise DumpInterrupted(
                f"dump of {self.ifname} was interrupted {self.dump_attempts} times in a row by concurrent changes"
            )

    async def apply(self, ops: Sequence[Op]) -> None:
        """Send ``ops`` as batched SET_DEVICE messages; nothing is sent for no ops."""
        messages = encode_set(self.ifname, ops, max_size=self.max_message_size)
        if not messages:
            return
        async with self._lock:
            for index, msg in enumerate(messages, 1):
                try:
                    await self._request(msg, NLM_F_REQUEST | NLM_F_ACK)
                except NetlinkError as e:
                    raise WireGuardError(
                        e.code,
                        f"configuring {self.ifname}: message {index}/{len(messages)} failed: "
                        f"{os.strerror(e.code)} (earlier messages stay applied)",
                    ) from None
            log_event(
                logger,
                "wireguard ops applied",
                logging.DEBUG,
                backend=self.name,
                link=self.ifname,
                ops=len(ops),
                messages=len(messages),
            )

    async def close(self, remove: bool = False) -> None:
        """Release the netlink socket; with ``remove``, delete the link too (only if it is WireGuard)."""
        async with self._lock:
            self._drop_socket()
        if remove:
            await self._remove_device()
