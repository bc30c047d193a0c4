"""Kernel WireGuard backend: batching, splitting, dump merging and DUMP_INTR retry, without a kernel.

Fixtures are kernel-layout netlink messages built with pyroute2's ``wgmsg`` codec:
the device attributes only in the first dump part, a peer continued in the next
part with just its public key and the remaining allowed IPs, nested array
elements typed 0 (as ``nla_nest_start(skb, 0)`` does), ``NLMSG_DONE`` at the end.
A small model of the kernel's SET_DEVICE handling (independent of
``diff.apply_ops``) checks that what we send does what the ops say.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import struct
from dataclasses import replace
from ipaddress import ip_network
from socket import AF_INET, AF_INET6

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_MULTI, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import wireguard as p2wg
from pyroute2.netlink.generic.wireguard import wgmsg

from kubespan.wireguard import kernel as kw
from kubespan.wireguard.diff import AddPeer, RemovePeer, SetDevice, UpdatePeer, apply_ops, diff_device
from kubespan.wireguard.kernel import (
    MAX_MESSAGE_SIZE,
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    DumpInterrupted,
    KernelBackend,
    WireGuardError,
    decode_messages,
    encode_set,
    kernel_available,
    message_size,
    parse_dump,
)
from kubespan.wireguard.types import (
    AddrPort,
    DeviceConfig,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    PublicKey,
)

FAMILY = 0x1D  # a generic netlink family id, as the controller would hand out
IFNAME = "kubespan"
PRIV = PrivateKey(bytes(range(1, 33)))
PSK = PresharedKey(b"\x05" * 32)
ZERO_PSK = PresharedKey(bytes(32))
K = [PublicKey(bytes([i]) * 32) for i in range(1, 9)]
NLA_F_NESTED = 0x8000
NLMSG_DONE = 3


# --- codec helpers -------------------------------------------------------------------------------


def to_bytes(msg: wgmsg, flags: int, seq: int = 1) -> bytes:
    """Encode a copy of ``msg`` as it would go on the wire."""
    copy = wgmsg()
    copy["cmd"] = msg["cmd"]
    copy["version"] = msg["version"]
    copy["attrs"] = msg["attrs"]
    copy["header"]["type"] = FAMILY
    copy["header"]["flags"] = flags
    copy["header"]["sequence_number"] = seq
    copy["header"]["pid"] = 4242
    copy.encode()
    return bytes(copy.data)


def _walk_nlas(buf: bytearray, start: int, end: int):
    off = start
    while off + 4 <= end:
        length, _ = struct.unpack_from("=HH", buf, off)
        assert length >= 4, "zero-length attribute"
        yield off, length
        off += (length + 3) & ~3


def kernelize(data: bytes) -> bytes:
    """Retype nested array elements to 0|NLA_F_NESTED, as the kernel writes them (pyroute2 numbers them)."""
    buf = bytearray(data)
    off = 0
    while off + 16 <= len(buf):
        (length,) = struct.unpack_from("=I", buf, off)
        for a_off, a_len in _walk_nlas(buf, off + 20, off + length):
            if struct.unpack_from("=H", buf, a_off + 2)[0] & 0x3FFF != 8:  # WGDEVICE_A_PEERS
                continue
            for p_off, p_len in _walk_nlas(buf, a_off + 4, a_off + a_len):
                struct.pack_into("=H", buf, p_off + 2, NLA_F_NESTED)
                for q_off, q_len in _walk_nlas(buf, p_off + 4, p_off + p_len):
                    if struct.unpack_from("=H", buf, q_off + 2)[0] & 0x3FFF == 9:  # WGPEER_A_ALLOWEDIPS
                        for i_off, _ in _walk_nlas(buf, q_off + 4, q_off + q_len):
                            struct.pack_into("=H", buf, i_off + 2, NLA_F_NESTED)
        off += (length + 3) & ~3
    return bytes(buf)


def done_message(flags: int = NLM_F_MULTI, seq: int = 1) -> bytes:
    return struct.pack("=IHHIIi", 20, NLMSG_DONE, flags, seq, 4242, 0)


def _ip_attrs(net):
    fam = AF_INET if net.version == 4 else AF_INET6
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", fam],
            ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
            ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen],
        ]
    }


def _full_peer_attrs(p: ObservedPeer) -> list:
    sec = int(p.last_handshake or 0)
    nsec = round(((p.last_handshake or 0) - sec) * 1e9)
    attrs = [
        ["WGPEER_A_PUBLIC_KEY", p.public_key.b64],
        ["WGPEER_A_PRESHARED_KEY", (p.preshared_key or ZERO_PSK).b64],
        ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": sec, "tv_nsec": nsec}],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", p.persistent_keepalive],
        ["WGPEER_A_TX_BYTES", p.tx_bytes],
        ["WGPEER_A_RX_BYTES", p.rx_bytes],
        ["WGPEER_A_PROTOCOL_VERSION", p.protocol_version],
    ]
    if p.endpoint is not None:
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": str(p.endpoint.ip), "port": p.endpoint.port}])
    return attrs


def kernel_dump(
    device: ObservedDevice, *, units: int = 1000, intr: bool = False, intr_done: bool = False
) -> bytes:
    """The dump the kernel would send; a part holds ``units`` (a peer head or an allowed IP is one)."""
    first = [
        ["WGDEVICE_A_LISTEN_PORT", device.listen_port],
        ["WGDEVICE_A_FWMARK", device.fwmark],
        ["WGDEVICE_A_IFINDEX", 7],
        ["WGDEVICE_A_IFNAME", IFNAME],
    ]
    if device.private_key is not None:
        first.append(["WGDEVICE_A_PRIVATE_KEY", device.private_key.b64])
        first.append(["WGDEVICE_A_PUBLIC_KEY", device.private_key.public_key().b64])
    parts: list[list] = [[]]
    room = units
    for key in sorted(device.peers):
        p = device.peers[key]
        ips = sorted(p.allowed_ips, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
        i, head = 0, True
        while head or i < len(ips):
            if room < 2:
                parts.append([])
                room = units
            n = min(room - 1, len(ips) - i)
            attrs = _full_peer_attrs(p) if head else [["WGPEER_A_PUBLIC_KEY", key.b64]]
            if n:
                attrs.append(["WGPEER_A_ALLOWEDIPS", [_ip_attrs(x) for x in ips[i : i + n]]])
            parts[-1].append({"attrs": attrs})
            room -= 1 + n
            i += n
            head = False
    flags = NLM_F_MULTI | (NLM_F_DUMP_INTR if intr else 0)
    out = b""
    for idx, peers in enumerate(parts):
        msg = wgmsg()
        msg["cmd"] = WG_CMD_GET_DEVICE
        msg["version"] = 1
        msg["attrs"] = (first if idx == 0 else []) + ([["WGDEVICE_A_PEERS", peers]] if peers else [])
        out += kernelize(to_bytes(msg, flags))
    return out + done_message(flags | (NLM_F_DUMP_INTR if intr_done else 0))


def wire(msgs: list[wgmsg]) -> list[bytes]:
    """encode_set's messages as they go on the wire."""
    return [to_bytes(m, NLM_F_REQUEST | NLM_F_ACK) for m in msgs]


def from_wire(datas: list[bytes]) -> list[wgmsg]:
    out = []
    for data in datas:
        d = wgmsg(data)
        d.decode()
        out.append(d)
    return out


def decoded(msgs: list[wgmsg]) -> list[wgmsg]:
    """encode_set's messages after a trip through the wire format."""
    return from_wire(wire(msgs))


def attrs_of(obj) -> dict:
    out: dict = {}
    for name, value in obj["attrs"]:
        assert name not in out, f"duplicate attribute {name}"
        out[name] = value
    return out


def peers_of(msg) -> list[dict]:
    return [attrs_of(p) for p in attrs_of(msg).get("WGDEVICE_A_PEERS", [])]


def nets_of(peer: dict) -> list:
    return [ip_network(i["addr"]) for i in peer.get("WGPEER_A_ALLOWEDIPS", [])]


def key_of(peer: dict) -> PublicKey:
    return PublicKey.from_b64(peer["WGPEER_A_PUBLIC_KEY"].decode())


# --- a model of the kernel's SET_DEVICE handling (not diff.apply_ops) ------------------------


def kernel_set(device: ObservedDevice, msgs) -> ObservedDevice:
    priv, port, mark = device.private_key, device.listen_port, device.fwmark
    peers = {k: replace(p, allowed_ips=frozenset()) for k, p in device.peers.items()}
    allowed = {k: set(p.allowed_ips) for k, p in device.peers.items()}
    owner = {net: k for k, nets in allowed.items() for net in nets}  # the kernel's allowed-IPs trie
    for msg in msgs:
        assert msg["cmd"] == WG_CMD_SET_DEVICE
        top = attrs_of(msg)
        assert top["WGDEVICE_A_IFNAME"] == IFNAME
        assert "WGDEVICE_A_FLAGS" not in top, "REPLACE_PEERS must never be sent"
        if "WGDEVICE_A_PRIVATE_KEY" in top:
            priv = PrivateKey.from_b64(top["WGDEVICE_A_PRIVATE_KEY"].decode())
        port = top.get("WGDEVICE_A_LISTEN_PORT", port)
        mark = top.get("WGDEVICE_A_FWMARK", mark)
        for p in peers_of(msg):
            key = key_of(p)
            flags = p.get("WGPEER_A_FLAGS", 0)
            assert flags & ~7 == 0, "unknown peer flag: the kernel answers EOPNOTSUPP"
            if flags & WGPEER_F_REMOVE_ME:
                if peers.pop(key, None) is not None:
                    for net in allowed.pop(key):
                        del owner[net]
                continue
            cur = peers.get(key)
            if cur is None:
                if flags & WGPEER_F_UPDATE_ONLY:
                    continue
                cur = ObservedPeer(key)
                allowed[key] = set()
            if "WGPEER_A_PRESHARED_KEY" in p:
                cur = replace(cur, preshared_key=PresharedKey.from_b64(p["WGPEER_A_PRESHARED_KEY"].decode()))
            if "WGPEER_A_ENDPOINT" in p:
                ep = p["WGPEER_A_ENDPOINT"]
                cur = replace(cur, endpoint=AddrPort(ipaddress.ip_address(ep["addr"]), ep["port"]))
            if flags & WGPEER_F_REPLACE_ALLOWEDIPS:
                for net in allowed[key]:
                    del owner[net]
                allowed[key] = set()
            for net in nets_of(p):
                prev = owner.get(net)
                if prev is not None and prev != key:
                    allowed[prev].discard(net)  # an exact prefix moves to its new peer
                owner[net] = key
                allowed[key].add(net)
            if "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL" in p:
                cur = replace(cur, persistent_keepalive=p["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"])
            peers[key] = cur
    final = {k: replace(p, allowed_ips=frozenset(allowed[k])) for k, p in peers.items()}
    return ObservedDevice(priv, port, mark, final)


# --- fakes for the pyroute2 sockets --------------------------------------------------------------


class FakeGenl:
    """Stands in for pyroute2.AsyncWireGuard: wire-encodes requests, answers with kernel-layout bytes."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.prid = FAMILY
        self.closed = False

    async def setup_endpoint(self) -> None:
        if not self.kernel.module:
            raise NetlinkError(errno.ENOENT, "No such file or directory")

    async def nlm_request(self, msg, msg_type, msg_flags=0, terminate=None, callback=None):
        assert msg_type == FAMILY and not self.closed
        data = to_bytes(msg, msg_flags)
        self.kernel.sent.append(data)
        req = wgmsg(data)
        req.decode()
        return self.kernel.handle(req, msg_flags, callback)

    def close(self) -> None:
        self.closed = True


class FakeKernel:
    def __init__(self, device: ObservedDevice | None = None, *, units: int = 1000) -> None:
        self.device = device
        self.units = units
        self.module = True
        self.interrupt_next = 0
        self.interrupt_done_only = False
        self.fail_set_at: tuple[int, int] | None = None  # (n-th set message, errno)
        self.sent: list[bytes] = []
        self.sets = 0
        self.dumps = 0
        self.sockets: list[FakeGenl] = []

    def socket(self) -> FakeGenl:
        s = FakeGenl(self)
        self.sockets.append(s)
        return s

    async def handle(self, req, flags, callback):
        if req["cmd"] == WG_CMD_GET_DEVICE:
            assert flags & NLM_F_DUMP
            self.dumps += 1
            if self.device is None:
                raise NetlinkError(errno.ENODEV, "No such device")
            intr = self.interrupt_next > 0
            self.interrupt_next -= 1
            buf = kernel_dump(
                self.device,
                units=self.units,
                intr=intr and not self.interrupt_done_only,
                intr_done=intr and self.interrupt_done_only,
            )
            off = 0
            while off < len(buf):
                length, mtype = struct.unpack_from("=IH", buf, off)
                m = (wgmsg if mtype == FAMILY else nlmsg)(buf[off : off + length])
                m.decode()
                off += length
                if callback is not None:
                    callback(m)
                if mtype != NLMSG_DONE:  # pyroute2 stops at DONE without yielding it
                    yield m
            return
        assert req["cmd"] == WG_CMD_SET_DEVICE and flags & NLM_F_ACK
        assert len(self.sent[-1]) <= MAX_MESSAGE_SIZE
        self.sets += 1
        if self.device is None:
            raise NetlinkError(errno.ENODEV, "No such device")
        if self.fail_set_at is not None and self.fail_set_at[0] == self.sets:
            raise NetlinkError(self.fail_set_at[1], "failed")
        self.device = kernel_set(self.device, [req])
        yield {"header": {"type": 2, "flags": 0}}


class FakeLink(dict):
    pass


class FakeIPRoute:
    def __init__(self) -> None:
        self.links: dict[str, str] = {}
        self.add_error: int | None = None
        self.calls: list[tuple] = []

    def __call__(self) -> FakeIPRoute:
        return self

    async def __aenter__(self) -> FakeIPRoute:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    async def link(self, command, **kw):
        self.calls.append((command, kw))
        name = kw["ifname"]
        if command == "get":
            if name not in self.links:
                raise NetlinkError(errno.ENODEV, "No such device")
            return [FakeLink({("linkinfo", "kind"): self.links[name]})]
        if command == "add":
            if self.add_error is not None:
                raise NetlinkError(self.add_error, "error")
            if name in self.links:
                raise NetlinkError(errno.EEXIST, "File exists")
            self.links[name] = kw["kind"]
            return []
        if command == "del":
            if name not in self.links:
                raise NetlinkError(errno.ENODEV, "No such device")
            del self.links[name]
            return []
        raise AssertionError(command)


def backend(kernel: FakeKernel, ipr: FakeIPRoute | None = None, **kw) -> KernelBackend:
    return KernelBackend(IFNAME, genl_factory=kernel.socket, iproute_factory=ipr or FakeIPRoute(), **kw)


# --- sample data ---------------------------------------------------------------------------------

EP4 = AddrPort(ipaddress.ip_address("192.0.2.1"), 51820)
EP6 = AddrPort(ipaddress.ip_address("2001:db8::7"), 51821)


def sample_device() -> ObservedDevice:
    return ObservedDevice(
        PRIV,
        51820,
        0x20,
        {
            K[0]: ObservedPeer(
                K[0],
                {ip_network("10.0.0.0/24"), ip_network("fd00::/64"), ip_network("10.9.0.1/32")},
                EP4,
                25,
                PSK,
                rx_bytes=2**40 + 3,
                tx_bytes=17,
                last_handshake=1_700_000_000.25,
            ),
            K[1]: ObservedPeer(K[1], {ip_network("fd01::1/128")}, EP6, 0, None, 0, 0, None),
            K[2]: ObservedPeer(K[2]),
        },
    )


# --- constants -----------------------------------------------------------------------------------


def test_constants_match_the_uapi_header_as_pyroute2_has_it():
    assert (WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS, WGPEER_F_UPDATE_ONLY) == (
        p2wg.WGPEER_F_REMOVE_ME,
        p2wg.WGPEER_F_REPLACE_ALLOWEDIPS,
        p2wg.WGPEER_F_UPDATE_ONLY,
    )
    assert (WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE, kw.WG_GENL_NAME) == (0, 1, "wireguard")
    assert MAX_MESSAGE_SIZE < 65536 and MAX_MESSAGE_SIZE % 4 == 0


# --- parsing dumps -------------------------------------------------------------------------------


def test_parse_single_part_dump_reads_every_field():
    dev = sample_device()
    got = parse_dump(decode_messages(kernel_dump(dev)))
    assert got == dev
    p = got.peers[K[0]]
    assert p.rx_bytes == 2**40 + 3 and p.tx_bytes == 17
    assert p.last_handshake == pytest.approx(1_700_000_000.25)
    assert p.endpoint == EP4 and got.peers[K[1]].endpoint == EP6
    assert p.preshared_key == PSK and got.peers[K[1]].preshared_key is None  # zero PSK = none
    assert got.peers[K[1]].last_handshake is None and got.peers[K[2]].endpoint is None
    assert (got.private_key, got.listen_port, got.fwmark) == (PRIV, 51820, 0x20)


def test_parse_multipart_dump_appends_continued_allowed_ips():
    dev = sample_device()
    buf = kernel_dump(dev, units=3)
    msgs = decode_messages(buf)
    parts = [m for m in msgs if m["header"]["type"] == FAMILY]
    assert len(parts) >= 3
    # the layout is the kernel's: K[0] starts in part 1 and continues with only key + allowed IPs
    cont = peers_of(parts[1])[0]
    assert key_of(cont) == K[0] and set(cont) == {"WGPEER_A_PUBLIC_KEY", "WGPEER_A_ALLOWEDIPS"}
    assert "WGDEVICE_A_LISTEN_PORT" not in attrs_of(parts[1])
    got = parse_dump(msgs)
    assert got.peers[K[0]].allowed_ips == dev.peers[K[0]].allowed_ips  # all 3, not the last part's
    assert got == dev


def test_parse_dump_without_private_key_and_empty_device():
    dev = ObservedDevice(None, 0, 0, {})
    assert parse_dump(decode_messages(kernel_dump(dev))) == dev


@pytest.mark.parametrize("where", ["parts", "done"])
def test_parse_dump_detects_dump_intr(where):
    buf = kernel_dump(sample_device(), units=3, intr=where == "parts", intr_done=where == "done")
    with pytest.raises(DumpInterrupted) as exc:
        parse_dump(decode_messages(buf))
    assert exc.value.errno == errno.EINTR and isinstance(exc.value, WireGuardError)
    with pytest.raises(DumpInterrupted):
        parse_dump([], interrupted=True)


def test_parse_dump_rejects_garbage():
    with pytest.raises(WireGuardError) as exc:
        parse_dump(decode_messages(done_message()))
    assert exc.value.errno == errno.EPROTO
    with pytest.raises(WireGuardError):
        decode_messages(kernel_dump(sample_device())[:-7])
    err = struct.pack("=IHHIIi", 20, 2, 0, 1, 1, -errno.ENODEV)
    with pytest.raises(WireGuardError) as exc:
        decode_messages(err)
    assert exc.value.errno == errno.ENODEV


# --- encoding SET_DEVICE -------------------------------------------------------------------------


def test_encode_set_round_trip_flags_and_attributes():
    ops = [
        SetDevice(PRIV, 51820, 0x20),
        RemovePeer(K[0]),
        UpdatePeer(K[1], endpoint=EP6),
        UpdatePeer(K[2], allowed_ips=frozenset({ip_network("10.1.0.0/16")}), preshared_key=ZERO_PSK),
        UpdatePeer(K[3], allowed_ips=frozenset(), persistent_keepalive=0),
        AddPeer(PeerConfig(K[4], {ip_network("fd00::/64"), ip_network("10.2.0.0/16")}, EP4, 25, PSK)),
        AddPeer(PeerConfig(K[5])),
    ]
    msgs = decoded(encode_set(IFNAME, ops))
    assert len(msgs) == 1
    top = attrs_of(msgs[0])
    assert top["WGDEVICE_A_IFNAME"] == IFNAME and "WGDEVICE_A_FLAGS" not in top
    assert PrivateKey.from_b64(top["WGDEVICE_A_PRIVATE_KEY"].decode()) == PRIV
    assert (top["WGDEVICE_A_LISTEN_PORT"], top["WGDEVICE_A_FWMARK"]) == (51820, 0x20)
    rm, ep, repl, clear, add, bare = peers_of(msgs[0])
    assert key_of(rm) == K[0] and set(rm) == {"WGPEER_A_PUBLIC_KEY", "WGPEER_A_FLAGS"}
    assert rm["WGPEER_A_FLAGS"] == WGPEER_F_REMOVE_ME
    assert ep["WGPEER_A_FLAGS"] == WGPEER_F_UPDATE_ONLY  # endpoint only: allowed IPs untouched
    assert ep["WGPEER_A_ENDPOINT"]["addr"] == "2001:db8::7" and ep["WGPEER_A_ENDPOINT"]["port"] == 51821
    assert "WGPEER_A_ALLOWEDIPS" not in ep and "WGPEER_A_PRESHARED_KEY" not in ep
    assert repl["WGPEER_A_FLAGS"] == WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS
    assert nets_of(repl) == [ip_network("10.1.0.0/16")]
    assert repl["WGPEER_A_PRESHARED_KEY"] == ZERO_PSK.b64.encode()  # zero key clears the PSK
    assert clear["WGPEER_A_FLAGS"] == WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS
    assert nets_of(clear) == [] and clear["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"] == 0
    assert add["WGPEER_A_FLAGS"] == WGPEER_F_REPLACE_ALLOWEDIPS
    assert nets_of(add) == [ip_network("10.2.0.0/16"), ip_network("fd00::/64")]
    assert add["WGPEER_A_ENDPOINT"]["addr"] == "192.0.2.1"
    assert add["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"] == 25
    assert add["WGPEER_A_PRESHARED_KEY"] == PSK.b64.encode()
    assert bare["WGPEER_A_PRESHARED_KEY"] == ZERO_PSK.b64.encode()
    assert "WGPEER_A_ENDPOINT" not in bare


def test_encode_set_nothing_to_do_and_device_only():
    assert encode_set(IFNAME, []) == []
    assert encode_set(IFNAME, [SetDevice()]) == []
    (msg,) = decoded(
        encode_set(IFNAME, [SetDevice(listen_port=1), SetDevice(fwmark=3), SetDevice(listen_port=2)])
    )
    top = attrs_of(msg)
    assert (top["WGDEVICE_A_LISTEN_PORT"], top["WGDEVICE_A_FWMARK"]) == (2, 3)
    assert "WGDEVICE_A_PEERS" not in top and "WGDEVICE_A_PRIVATE_KEY" not in top


def test_encode_set_rejects_bad_input():
    for bad in ("x" * 16, "", "a/b", "a b", "a:b", "..", "wg\u00e9"):
        with pytest.raises(ValueError, match="ifname"):
            encode_set(bad, [RemovePeer(K[0])])
    with pytest.raises(ValueError, match="ifname"):
        KernelBackend("x" * 16)
    with pytest.raises(ValueError, match="max_size"):
        KernelBackend(IFNAME, max_message_size=65536)
    with pytest.raises(ValueError, match="max_size"):
        encode_set(IFNAME, [RemovePeer(K[0])], max_size=60)
    with pytest.raises(ValueError, match="max_size"):
        encode_set(IFNAME, [RemovePeer(K[0])], max_size=70000)
    with pytest.raises(TypeError):
        encode_set(IFNAME, [object()])  # type: ignore[list-item]


def _thousand_peers() -> list:
    ops: list = [SetDevice(PRIV, 51820, 0x20)]
    for i in range(1000):
        ep = AddrPort(ipaddress.ip_address(f"10.{i // 250}.{i % 250}.1"), 51820)
        cfg = PeerConfig(PublicKey(i.to_bytes(2, "big") * 16), {ip_network(f"fd00::{i:x}/128")}, ep, 25, PSK)
        ops.append(AddPeer(cfg))
    return ops


def test_thousand_peers_are_batched_below_64k():
    ops = _thousand_peers()
    msgs = encode_set(IFNAME, ops)
    assert 2 <= len(msgs) <= 3  # batched: not one message per peer, not one oversized message
    datas = wire(msgs)
    assert all(len(d) <= MAX_MESSAGE_SIZE < 65536 for d in datas)
    back = from_wire(datas)
    keys = [key_of(p) for m in back for p in peers_of(m)]
    assert keys == [op.peer.public_key for op in ops[1:]]  # each once, in order
    assert "WGDEVICE_A_PRIVATE_KEY" in attrs_of(back[0])
    assert all("WGDEVICE_A_PRIVATE_KEY" not in attrs_of(m) for m in back[1:])
    got = kernel_set(ObservedDevice(), back)
    assert (got.private_key, got.listen_port, got.fwmark) == (PRIV, 51820, 0x20)
    assert {k: p.config() for k, p in got.peers.items()} == {op.peer.public_key: op.peer for op in ops[1:]}


def test_message_size_is_the_encoded_size():
    ops = _thousand_peers()[:60]
    msgs = encode_set(IFNAME, ops, max_size=2048)
    assert len(msgs) > 1
    assert [message_size(m) for m in msgs] == [len(d) for d in wire(msgs)]
    # and packing is tight: no message could have taken the next peer as well
    per_peer = message_size(encode_set(IFNAME, ops[1:3])[0]) - message_size(encode_set(IFNAME, ops[1:2])[0])
    assert all(message_size(m) + per_peer > 2048 for m in msgs[:-1])


@pytest.mark.parametrize(
    ("update", "count", "max_size"), [(False, 5000, MAX_MESSAGE_SIZE), (True, 600, 4096)]
)
def test_large_peer_is_split_with_replace_on_the_first_chunk_only(update, count, max_size):
    nets = {ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(count // 2)}
    nets |= {ip_network(f"fd00:{i:x}::/48") for i in range(count - count // 2)}
    op = (
        UpdatePeer(K[0], endpoint=EP4, allowed_ips=frozenset(nets))
        if update
        else AddPeer(PeerConfig(K[0], nets, EP4, 25, PSK))
    )
    msgs = encode_set(IFNAME, [RemovePeer(K[1]), op, RemovePeer(K[2])], max_size=max_size)
    assert len(msgs) >= 3
    datas = wire(msgs)
    assert all(len(d) <= max_size for d in datas)
    back = from_wire(datas)
    chunks = [p for m in back for p in peers_of(m) if key_of(p) == K[0]]
    assert len(chunks) == len(msgs)
    first_flags = WGPEER_F_REPLACE_ALLOWEDIPS | (WGPEER_F_UPDATE_ONLY if update else 0)
    assert chunks[0]["WGPEER_A_FLAGS"] == first_flags and "WGPEER_A_ENDPOINT" in chunks[0]
    for c in chunks[1:]:
        assert c["WGPEER_A_FLAGS"] == WGPEER_F_UPDATE_ONLY  # append: no REPLACE after the first chunk
        assert set(c) == {"WGPEER_A_PUBLIC_KEY", "WGPEER_A_FLAGS", "WGPEER_A_ALLOWEDIPS"}
    got = [n for c in chunks for n in nets_of(c)]
    assert len(got) == count and set(got) == nets
    # applied in order, the chunks leave exactly the new list (the old prefix is replaced)
    before = ObservedDevice(peers={K[0]: ObservedPeer(K[0], {ip_network("192.168.0.0/16")})})
    assert kernel_set(before, back).peers[K[0]].allowed_ips == nets


def test_peer_that_fits_a_fresh_message_moves_whole_instead_of_splitting():
    peer = AddPeer(PeerConfig(K[1], {ip_network(f"10.0.{i}.0/24") for i in range(20)}, EP4, 25, PSK))
    small = AddPeer(PeerConfig(K[0], {ip_network("10.1.0.0/24")}, EP4, 25, PSK))
    limit = message_size(encode_set(IFNAME, [peer])[0]) + 40
    msgs = decoded(encode_set(IFNAME, [small, peer], max_size=limit))
    assert [[key_of(p) for p in peers_of(m)] for m in msgs] == [[K[0]], [K[1]]]
    assert len(nets_of(peers_of(msgs[1])[0])) == 20


_nets = st.sampled_from(
    [ip_network(f"10.{i}.0.0/16") for i in range(6)]
    + [ip_network(f"fd00:{i}::/64") for i in range(6)]
    + [ip_network("0.0.0.0/0"), ip_network("::/0")]
)
_keys = st.sampled_from(K[:5])
_eps = st.sampled_from([None, EP4, EP6])
_psks = st.sampled_from([None, PSK, ZERO_PSK])
_nsets = st.frozensets(_nets, max_size=10)
_ops = st.one_of(
    st.builds(
        SetDevice,
        st.sampled_from([None, PRIV]),
        st.one_of(st.none(), st.integers(0, 65535)),
        st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    ),
    st.builds(RemovePeer, _keys),
    st.builds(
        UpdatePeer,
        _keys,
        _eps,
        st.one_of(st.none(), st.integers(0, 65535)),
        _psks,
        st.one_of(st.none(), _nsets),
    ),
    st.builds(
        lambda k, n, e, ka, psk: AddPeer(PeerConfig(k, n, e, ka, psk)),
        _keys,
        _nsets,
        _eps,
        st.integers(0, 65535),
        _psks,
    ),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.lists(_ops, max_size=6),
    ops=st.lists(_ops, max_size=12),
    max_size=st.sampled_from([256, 400, 1000, MAX_MESSAGE_SIZE]),
)
def test_encoded_messages_do_what_the_ops_say(start, ops, max_size):
    device = apply_ops(ObservedDevice(), start)
    datas = wire(encode_set(IFNAME, ops, max_size=max_size))
    assert all(len(d) <= max_size for d in datas)
    assert kernel_set(device, from_wire(datas)) == apply_ops(device, ops)


# --- the backend against a fake kernel -----------------------------------------------------------


def _config(n: int, ips: int = 3) -> DeviceConfig:
    peers = []
    for i in range(n):
        nets = {ip_network(f"fd{i:02x}::{j:x}/128") for j in range(ips)} | {ip_network(f"10.{i}.0.0/16")}
        ep = AddrPort(ipaddress.ip_address(f"192.0.2.{i + 1}"), 51820)
        peers.append(PeerConfig(PublicKey(bytes([i + 1]) * 32), nets, ep, 25, PSK))
    return DeviceConfig.of(PRIV, 51820, 0x20, peers)


async def test_apply_then_get_round_trip_multipart():
    k = FakeKernel(ObservedDevice(), units=7)
    wg = backend(k, max_message_size=1024)
    desired = _config(40, ips=9)
    await wg.apply(diff_device(desired, await wg.get()))
    assert k.sets > 1 and k.dumps == 1
    observed = await wg.get()
    assert observed is not None
    assert diff_device(desired, observed) == []
    assert {p.public_key: p.config() for p in observed.peers.values()} == dict(desired.peers)
    # an unchanged reconcile sends nothing at all
    before = len(k.sent)
    await wg.apply(diff_device(desired, observed))
    assert len(k.sent) == before
    await wg.close()
    assert all(s.closed for s in k.sockets)


async def test_get_retries_an_interrupted_dump():
    k = FakeKernel(sample_device(), units=3)
    k.interrupt_next = 2
    wg = backend(k)
    assert await wg.get() == sample_device()
    assert k.dumps == 3


async def test_get_sees_dump_intr_on_done_only():
    k = FakeKernel(sample_device())
    k.interrupt_next, k.interrupt_done_only = 1, True
    wg = backend(k)
    assert await wg.get() == sample_device()
    assert k.dumps == 2


async def test_get_gives_up_after_bounded_attempts():
    k = FakeKernel(sample_device())
    k.interrupt_next = 100
    wg = backend(k, dump_attempts=5)
    with pytest.raises(DumpInterrupted):
        await wg.get()
    assert k.dumps == 5


async def test_get_missing_device_is_none_and_missing_module_is_an_error():
    k = FakeKernel(None)
    assert await backend(k).get() is None
    k2 = FakeKernel(ObservedDevice())
    k2.module = False
    wg = backend(k2)
    with pytest.raises(WireGuardError) as exc:
        await wg.get()
    assert exc.value.errno == errno.ENOENT and "module" in str(exc.value)
    assert k2.sockets[0].closed
    k2.module = True  # the module got loaded (ip link add): the next call resolves the family
    assert await wg.get() == ObservedDevice()


async def test_apply_failure_names_the_message_never_the_key(caplog):
    caplog.set_level(logging.DEBUG)
    k = FakeKernel(ObservedDevice())
    k.fail_set_at = (2, errno.EINVAL)
    wg = backend(k, max_message_size=512)
    ops = [SetDevice(PRIV, 51820, 0), *[AddPeer(c) for c in _config(6).peers.values()]]
    with pytest.raises(WireGuardError) as exc:
        await wg.apply(ops)
    assert exc.value.errno == errno.EINVAL and "message 2/" in str(exc.value)
    assert k.device is not None and k.device.private_key == PRIV  # message 1 stayed applied
    text = str(exc.value) + repr(exc.value) + repr(wg) + caplog.text
    for secret in (PRIV.b64, PRIV.hex, PSK.b64, PSK.hex):
        assert secret not in text


async def test_ensure_device_creates_once_and_refuses_foreign_links():
    ipr = FakeIPRoute()
    wg = backend(FakeKernel(), ipr)
    await wg.ensure_device()
    await wg.ensure_device()
    assert ipr.links == {IFNAME: "wireguard"}
    assert [c for c, _ in ipr.calls].count("add") == 1
    assert ("add", {"ifname": IFNAME, "kind": "wireguard"}) in ipr.calls
    await wg.close(remove=True)
    assert ipr.links == {}
    ipr.links[IFNAME] = "veth"
    with pytest.raises(WireGuardError) as exc:
        await wg.ensure_device()
    assert exc.value.errno == errno.EEXIST
    await wg.close(remove=True)
    assert ipr.links == {IFNAME: "veth"}  # never delete a link that is not ours


async def test_os_errors_from_pyroute2_become_wireguard_errors():
    def missing_netns():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    wg = KernelBackend(IFNAME, netns="nope", genl_factory=missing_netns, iproute_factory=missing_netns)
    for call in (wg.ensure_device, wg.get, lambda: kernel_available("nope", iproute_factory=missing_netns)):
        with pytest.raises(WireGuardError) as exc:
            await call()
        assert exc.value.errno == errno.ENOENT and "nope" in str(exc.value)


async def test_ensure_device_without_kernel_support():
    ipr = FakeIPRoute()
    ipr.add_error = errno.EOPNOTSUPP
    with pytest.raises(WireGuardError) as exc:
        await backend(FakeKernel(), ipr).ensure_device()
    assert exc.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize(
    ("add_error", "expected"),
    [(None, True), (errno.EOPNOTSUPP, False), (errno.ENODEV, False), (errno.EPERM, WireGuardError)],
)
async def test_kernel_available(add_error, expected):
    ipr = FakeIPRoute()
    ipr.add_error = add_error
    if expected is WireGuardError:
        with pytest.raises(WireGuardError):
            await kernel_available(iproute_factory=ipr)
        return
    assert await kernel_available(iproute_factory=ipr) is expected
    assert ipr.links == {}  # the probe link is gone
    if expected:
        assert [c for c, _ in ipr.calls] == ["add", "del"]
        assert ipr.calls[0][1]["kind"] == "wireguard" and len(ipr.calls[0][1]["ifname"]) < 16
