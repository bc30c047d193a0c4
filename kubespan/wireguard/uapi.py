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
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

from kubespan.wireguard.diff import AddPeer, Op, RemovePeer, SetDevice, UpdatePeer, split_ops
from kubespan.wireguard.types import (
    AddrPort,
    InvalidKeyError,
    ObservedDevice,
    ObservedPeer,
    ObservedPeerBuilder,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    PublicKey,
    handshake_time,
    observed_peer_unchecked,
    sorted_networks,
)
from spanutil.ipcodec import IPNetwork

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
#
# Formatting addresses with ipaddress' __str__ dominated encoding a large set (~10 us per
# IPv6 address). The C formatters give the same text: inet_ntoa always does for IPv4;
# glibc's inet_ntop compresses IPv6 exactly as Python does (the first longest run of two
# or more zero groups, lowercase hex) except that it may write an embedded IPv4 address
# in dotted form, so such results, and scoped addresses, go through str(). A self-check at
# import falls back to str() altogether should a platform's inet_ntop differ.


def _v6_text_fast(ip: ipaddress.IPv6Address) -> str:
    if ip.scope_id:
        return str(ip)
    text = socket.inet_ntop(socket.AF_INET6, ip.packed)
    return str(ip) if "." in text else text


def _v6_text_str(ip: ipaddress.IPv6Address) -> str:
    return str(ip)


def _ntop_matches_python() -> bool:
    vectors = (
        "::",
        "::1",
        "1::",
        "1:0:0:1:0:0:0:1",
        "1:0:0:1:1:0:0:1",
        "1:0:1:1:1:1:1:1",
        "0:0:1:1:1:1:0:0",
        "2001:db8::",
        "2001:db8:0:0:1::1",
        "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169",
        "64:ff9b::102:304",
        "ffff::",
        "::ffff:0:0:1",
    )
    try:
        return all(_v6_text_fast(ipaddress.IPv6Address(v)) == str(ipaddress.IPv6Address(v)) for v in vectors)
    except (OSError, ValueError):  # pragma: no cover - platform without inet_ntop
        return False


_v6_text = _v6_text_fast if _ntop_matches_python() else _v6_text_str


def _net_text(net: IPNetwork) -> str:
    """``str(net)``, faster."""
    if net.version == 4:
        return f"{socket.inet_ntoa(net.network_address.packed)}/{net.prefixlen}"
    return f"{_v6_text(net.network_address)}/{net.prefixlen}"  # type: ignore[arg-type]


def _endpoint_text(ep: AddrPort) -> str:
    """``str(ep)``, faster."""
    if ep.ip.version == 4:
        return f"{socket.inet_ntoa(ep.ip.packed)}:{ep.port}"
    return f"[{_v6_text(ep.ip)}]:{ep.port}"  # type: ignore[arg-type]


def _peer_lines(op: AddPeer | UpdatePeer, lines: list[str]) -> None:
    if isinstance(op, AddPeer):
        cfg = op.peer
        lines.append(f"public_key={cfg.public_key.hex}")
        if cfg.preshared_key is not None:
            lines.append(f"preshared_key={cfg.preshared_key.hex}")
        if cfg.endpoint is not None:
            lines.append(f"endpoint={_endpoint_text(cfg.endpoint)}")
        if cfg.persistent_keepalive:
            lines.append(f"persistent_keepalive_interval={cfg.persistent_keepalive}")
        allowed: frozenset[IPNetwork] | None = cfg.allowed_ips
    else:
        lines.append(f"public_key={op.public_key.hex}")
        lines.append("update_only=true")
        if op.preshared_key is not None:
            lines.append(f"preshared_key={op.preshared_key.hex}")
        if op.endpoint is not None:
            lines.append(f"endpoint={_endpoint_text(op.endpoint)}")
        if op.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={op.persistent_keepalive}")
        allowed = op.allowed_ips
    if allowed is not None:
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={_net_text(net)}" for net in sorted_networks(allowed))


def _request_head(ops: Sequence[Op]) -> tuple[list[str], list[AddPeer | UpdatePeer | RemovePeer]]:
    """``set=1`` plus the device-level lines (they must come first), and the peer operations."""
    device, peer_ops = split_ops(ops)
    private_key, listen_port, fwmark = device.private_key, device.listen_port, device.fwmark
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    return lines, peer_ops


def _op_lines(op: AddPeer | UpdatePeer | RemovePeer, lines: list[str]) -> None:
    if isinstance(op, RemovePeer):
        lines.append(f"public_key={op.public_key.hex}")
        lines.append("remove=true")
    else:
        _peer_lines(op, lines)


def encode_set(ops: Sequence[Op]) -> bytes | None:
    """The ``set=1`` request for ``ops``, or None when there is nothing to send."""
    if not ops:
        return None
    lines, peer_ops = _request_head(ops)
    if len(lines) == 1 and not peer_ops:
        return None
    for op in peer_ops:
        _op_lines(op, lines)
    return ("\n".join(lines) + "\n\n").encode("ascii")


# A large set is sent in pieces while the rest is still being encoded, so wireguard-go
# (which applies each line as it reads it) works in parallel with us. The first piece is
# small so that it starts at once; later ones grow up to _CHUNK_PEERS_MAX peers.
_CHUNK_PEERS_FIRST = 8
_CHUNK_PEERS_MAX = 256


def encode_set_chunks(ops: Sequence[Op]) -> Iterator[bytes] | None:
    """:func:`encode_set` in pieces (joined, they are exactly its bytes), or None when there is nothing
    to send. Operations are checked before the first piece is produced."""
    if not ops:
        return None
    head, peer_ops = _request_head(ops)
    if len(head) == 1 and not peer_ops:
        return None
    return _chunks(head, peer_ops)


def _chunks(lines: list[str], peer_ops: list[AddPeer | UpdatePeer | RemovePeer]) -> Iterator[bytes]:
    batch = _CHUNK_PEERS_FIRST
    in_batch = 0
    for op in peer_ops:
        _op_lines(op, lines)
        in_batch += 1
        if in_batch >= batch:
            yield ("\n".join(lines) + "\n").encode("ascii")
            lines = []
            in_batch = 0
            batch = min(batch * 2, _CHUNK_PEERS_MAX)
    lines.append("")  # the empty line that ends the request
    yield ("\n".join(lines) + "\n").encode("ascii")


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


_U64 = 2**64 - 1
_U32 = 2**32 - 1

# --- caches of parsed values ---------------------------------------------------------------------
#
# A status poll reads the same device every second: the same public keys,
# endpoints and prefixes come back as the same text, so their parsed (immutable)
# objects are kept, keyed by that text. Secrets are never cached here (a PSK is
# memoised only within one parse). Each cache is cleared when it outgrows
# _CACHE_MAX entries, so memory stays bounded whatever the churn.

_CACHE_MAX = 1 << 15
_T = TypeVar("_T")


class _ParseCache(dict[str, _T]):
    """Parsed values by their text: a miss parses (a ValueError stores nothing) and keeps the value;
    the whole cache is cleared when it outgrows ``_CACHE_MAX``."""

    __slots__ = ("_parse",)

    def __init__(self, parse: Callable[[str], _T]) -> None:
        super().__init__()
        self._parse = parse

    def __missing__(self, text: str) -> _T:
        value = self._parse(text)
        if len(self) >= _CACHE_MAX:
            self.clear()
        self[text] = value
        return value


def _allowed_set(lines: str) -> frozenset[IPNetwork]:
    """The prefixes of a peer's ``allowed_ip=`` lines (each preceded by a newline)."""
    if not lines:
        return frozenset()
    return frozenset(_network_cache[net] for net in lines[len(_ALLOWED_SEP) :].split(_ALLOWED_SEP))


_key_cache: _ParseCache[PublicKey] = _ParseCache(PublicKey.from_hex)
_endpoint_cache: _ParseCache[AddrPort] = _ParseCache(AddrPort.parse)
_network_cache: _ParseCache[IPNetwork] = _ParseCache(lambda text: ipaddress.ip_network(text, strict=False))
_allowed_cache: _ParseCache[frozenset[IPNetwork]] = _ParseCache(_allowed_set)  # a peer's allowed_ip lines

#: how many ``get`` answers took the fast path / the general parser (for tests and profiling)
parse_stats = {"fast": 0, "general": 0}


def clear_caches() -> None:
    """Forget the parsed keys, endpoints and prefixes (benchmarks measure a cold parse with this)."""
    _key_cache.clear()
    _endpoint_cache.clear()
    _network_cache.clear()
    _allowed_cache.clear()


class PeerCache:
    """The peers of one device's previous ``get`` answer, by the exact text of each peer.

    A status poll reads the same device every second and most peers' lines
    (counters included) come back unchanged; those are not parsed again. Only
    the last answer's peers are kept, so the cache never outgrows one device.
    The parsed objects are immutable, so sharing them between answers is safe.
    """

    __slots__ = ("hits", "misses", "peers")

    def __init__(self) -> None:
        self.peers: dict[str, ObservedPeer] = {}
        self.hits = 0
        self.misses = 0


def parse_get(text: str | bytes, cache: PeerCache | None = None) -> ObservedDevice:
    """Parse a ``get=1`` response; raises :class:`UapiError` on a non-zero errno.

    wireguard-go's answers take a fast path (one regular expression per peer,
    in the order wireguard-go writes the keys; peers whose text is unchanged
    since the previous answer parsed with the same ``cache`` are reused).
    Anything else -- another key order, unknown keys, an error, malformed
    text -- goes through the general line-by-line parser, which gives the same
    result for what both accept and the precise error (line number, key) for
    what is wrong.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise UapiProtocolError("UAPI response is not ASCII") from None
    device = _parse_get_fast(text, cache)
    if device is not None:
        parse_stats["fast"] += 1
        return device
    parse_stats["general"] += 1
    return _parse_get_general(text)


# One peer exactly as wireguard-go (device/uapi.go, IpcGetOperation) writes it, after its
# "public_key=" (the answer is split there). Digit counts bound the numbers' length; their
# ranges are checked as the general parser does. Keys are 64 characters here and checked by
# from_hex (or were, when first put in the key cache), as in the general parser.
_PEER_RE = re.compile(
    r"([^\n]{64})\n"
    r"preshared_key=([^\n]{64})\n"
    r"protocol_version=([0-9]{1,10})\n"
    r"(?:endpoint=([^\n]+)\n)?"
    r"last_handshake_time_sec=([0-9]{1,20})\n"
    r"last_handshake_time_nsec=([0-9]{1,9})\n"
    r"tx_bytes=([0-9]{1,20})\n"
    r"rx_bytes=([0-9]{1,20})\n"
    r"persistent_keepalive_interval=([0-9]{1,5})"
    r"((?:\nallowed_ip=[^\n]+)*)"
)
_ERRNO_0 = "errno=0\n"
_PEER_SEP = "\npublic_key="
_ALLOWED_SEP = "\nallowed_ip="


def _parse_get_fast(text: str, cache: PeerCache | None) -> ObservedDevice | None:
    """wireguard-go's successful answer, or None to let the general parser decide (and explain)."""
    # the answer ends with "errno=0" and the empty line; nothing but newlines after it
    tail = text.rfind("\n" + _ERRNO_0) + 1
    if tail <= 0 or text[tail + len(_ERRNO_0) :].strip("\n"):
        return None
    start = text.find("public_key=", 0, tail)
    if start < 0:
        start = tail
    elif start > 0 and text[start - 1] != "\n":
        return None
    private_key: PrivateKey | None = None
    listen_port = 0
    fwmark = 0
    try:
        for line in text[:start].split("\n"):
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep or key == "errno":
                return None
            if key == "private_key":
                private_key = PrivateKey.from_hex(value)
                if private_key.is_zero():
                    private_key = None
            elif key == "listen_port":
                if not value.isdigit() or int(value) > 65535:
                    return None
                listen_port = int(value)
            elif key == "fwmark":
                if not value.isdigit() or int(value) > _U32:
                    return None
                fwmark = int(value)
    except ValueError:
        return None

    peers: dict[PublicKey, ObservedPeer] = {}
    if start == tail:
        if cache is not None:
            cache.peers = {}
        return ObservedDevice(private_key, listen_port, fwmark, peers)
    # One block per peer: the text after its "public_key=" up to (without) the newline
    # that ends its last line. A block is one regex match, or the same text as last time.
    blocks = text[start + len("public_key=") : tail - 1].split(_PEER_SEP)
    previous = cache.peers if cache is not None else {}
    seen: dict[str, ObservedPeer] = {}
    psk_memo: dict[str, PresharedKey | None] = {}
    keys, endpoints, allowed_sets = _key_cache, _endpoint_cache, _allowed_cache
    fullmatch = _PEER_RE.fullmatch
    misses = 0
    try:
        for block in blocks:
            peer = previous.get(block)
            if peer is None:
                m = fullmatch(block)
                if m is None:
                    return None
                misses += 1
                pk_hex, psk_hex, version, ep_text, hs_sec, hs_nsec, tx, rx, keepalive, allowed_text = (
                    m.groups()
                )
                version_n, hs_sec_n, hs_nsec_n, tx_n, rx_n, keepalive_n = (
                    int(version),
                    int(hs_sec),
                    int(hs_nsec),
                    int(tx),
                    int(rx),
                    int(keepalive),
                )
                if version_n > _U32 or hs_sec_n > _U64 or tx_n > _U64 or rx_n > _U64 or keepalive_n > 65535:
                    return None
                key = keys[pk_hex]
                if psk_hex in psk_memo:
                    psk = psk_memo[psk_hex]
                else:
                    psk = PresharedKey.from_hex(psk_hex)
                    psk = psk_memo[psk_hex] = None if psk.is_zero() else psk
                endpoint = None if ep_text is None else endpoints[ep_text]
                allowed = allowed_sets[allowed_text]
                # the values are checked and normalised above (frozenset, no zero PSK)
                peer = observed_peer_unchecked(
                    key,  # public_key
                    allowed,  # allowed_ips
                    endpoint,
                    keepalive_n,  # persistent_keepalive
                    psk,  # preshared_key
                    rx_n,  # rx_bytes
                    tx_n,  # tx_bytes
                    handshake_time(hs_sec_n, hs_nsec_n),
                    version_n,  # protocol_version
                )
            seen[block] = peer
            peers[peer.public_key] = peer
    except ValueError:  # a bad key, endpoint or prefix: the general parser names the line
        return None
    if cache is not None:
        cache.peers = seen
        cache.misses += misses
        cache.hits += len(blocks) - misses
    return ObservedDevice(private_key, listen_port, fwmark, peers)


def _parse_get_general(text: str) -> ObservedDevice:
    private_key: PrivateKey | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[PublicKey, ObservedPeer] = {}
    cur: ObservedPeerBuilder | None = None
    errno: int | None = None

    def flush() -> None:
        if cur is not None:
            peers[cur.public_key] = cur.build()

    for n, key, value in _lines(text):
        try:
            if key == "errno":
                try:
                    errno = int(value)
                except ValueError:
                    raise UapiProtocolError(f"line {n}: errno must be an integer") from None
            elif key == "public_key":
                flush()
                cur = ObservedPeerBuilder(_key_cache[value])
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
                    cur.endpoint = _endpoint_cache[value]
                except ValueError:
                    raise UapiProtocolError(f"line {n}: endpoint is not ip:port") from None
            elif key == "allowed_ip":
                try:
                    cur.allowed.append(_network_cache[value])
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
