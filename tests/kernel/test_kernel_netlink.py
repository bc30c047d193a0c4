"""The generic-netlink codec (kubespan.wireguard.kernel) against the real WireGuard module.

The unit tests check the codec against recorded message layouts; here the kernel answers: large
devices come back over multi-part dumps and must read back equal, a peer whose allowed IPs do not fit
in one message is split on the way in and on the way out, REPLACE_ALLOWEDIPS replaces and the
continuation chunks append, an interrupted dump is retried, and what the kernel refuses becomes a
clear WireGuardError. Each test works on a WireGuard link in its own lab namespace; no traffic.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_DUMP
from pyroute2.netlink.generic.wireguard import wgmsg

from kubespan.identity import generate_private_key
from kubespan.wireguard import kernel as kw
from kubespan.wireguard.backend import sync
from kubespan.wireguard.diff import AddPeer, SetDevice, UpdatePeer
from kubespan.wireguard.kernel import DumpInterrupted, KernelBackend, WireGuardError, encode_set
from kubespan.wireguard.types import AddrPort, DeviceConfig, PeerConfig, PresharedKey, PublicKey
from netns.lab import Lab, Node

pytestmark = [pytest.mark.root, pytest.mark.kernel, pytest.mark.timeout(600)]

IFNAME = "kubespan"
PORT = 51820


@pytest.fixture
def node() -> Iterator[Node]:
    with Lab() as lab:
        yield lab.node("wg")


def mesh_config(n: int, seed: int = 1) -> DeviceConfig:
    """``n`` peers shaped like a KubeSpan mesh: PSK, keepalive 25, an endpoint (every fifth IPv6), a
    mesh /128 and a node /32 each, every third a pod /24; no prefix shared between peers."""
    rng = random.Random(seed)
    psk = PresharedKey(rng.randbytes(32))
    mesh = ipaddress.IPv6Network("fd7f:175a:b97c:5602::/64")
    peers = []
    for i in range(n):
        nets = [
            ipaddress.ip_network(f"{mesh.network_address + (i + 1) * 65536}/128"),
            ipaddress.ip_network(f"10.{64 + (i >> 8)}.{i & 255}.1/32"),
        ]
        if i % 3 == 0:
            nets.append(ipaddress.ip_network(f"172.{16 + (i >> 8)}.{i & 255}.0/24"))
        endpoint = AddrPort.parse(
            f"[2001:db8::{i + 1:x}]:{PORT}" if i % 5 == 0 else f"192.0.{2 + (i >> 8)}.{i & 255}:{PORT}"
        )
        peers.append(PeerConfig(generate_private_key().public_key(), frozenset(nets), endpoint, 25, psk))
    return DeviceConfig.of(generate_private_key(), PORT, 0x20, peers)


def configs(observed: Any) -> dict[PublicKey, PeerConfig]:
    return {k: p.config() for k, p in observed.peers.items()}


class CountingBackend(KernelBackend):
    """Records the family messages (dump parts) of every GET_DEVICE answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dumps: list[list[Any]] = []

    async def _request(self, msg: Any, flags: int, callback: Any = None) -> list[Any]:
        parts = await super()._request(msg, flags, callback)
        if flags & NLM_F_DUMP:
            self.dumps.append([p for p in parts if p["header"]["type"] >= 0x10])
        return parts


async def fresh(node: Node, **kwargs: Any) -> CountingBackend:
    wg = CountingBackend(IFNAME, netns=node.ns, **kwargs)
    await wg.ensure_device()
    return wg


def wg_dump(node: Node) -> list[list[str]]:
    """``wg show kubespan dump`` (the C tool, an independent reader): one row per peer."""
    rows = node.run("wg", "show", IFNAME, "dump", timeout=120).stdout.splitlines()
    return [r.split("\t") for r in rows[1:]]


def parts_with_peer(dump: list[Any], key: PublicKey) -> int:
    n = 0
    for part in dump:
        for name, value in part["attrs"]:
            if name == "WGDEVICE_A_PEERS" and any(
                dict(item["attrs"]).get("WGPEER_A_PUBLIC_KEY") == key.b64.encode() for item in value
            ):
                n += 1
    return n


async def test_thousand_peers_applied_and_dumped_back_equal(node: Node) -> None:
    desired = mesh_config(1000)
    wg = await fresh(node)
    try:
        ops = await sync(wg, desired)
        messages = encode_set(IFNAME, ops)
        assert len(messages) > 1, "1000 peers must need several SET_DEVICE messages"
        wg.dumps.clear()
        observed = await wg.get()
        assert observed is not None
        assert len(wg.dumps[-1]) > 1, "a 1000-peer device must come back in a multi-part dump"
        print(f"1000 peers: {len(messages)} SET messages, dump in {len(wg.dumps[-1])} parts")
        assert observed.private_key == desired.private_key
        assert (observed.listen_port, observed.fwmark) == (PORT, 0x20)
        assert configs(observed) == dict(desired.peers)
        assert await sync(wg, desired) == []  # read back equal: nothing left to do

        rows = wg_dump(node)  # the wg tool agrees
        assert len(rows) == 1000
        by_key = {PublicKey.from_b64(r[0]): r for r in rows}
        for key, peer in list(desired.peers.items())[::97]:
            assert str(peer.endpoint) == by_key[key][2]
            assert {ipaddress.ip_network(a) for a in by_key[key][3].split(",")} == peer.allowed_ips
    finally:
        await wg.close(remove=True)


async def test_peer_with_5000_allowed_ips_split_and_replaced(node: Node) -> None:
    key = generate_private_key().public_key()
    first = frozenset(ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24") for i in range(5000))
    second = frozenset(ipaddress.ip_network(f"fd00:{i:x}::/64") for i in range(5000))
    wg = await fresh(node)
    try:
        base = DeviceConfig.of(generate_private_key(), PORT, 0, [PeerConfig(key, first)])
        ops = await sync(wg, base)
        assert len(encode_set(IFNAME, ops)) >= 2, "5000 allowed IPs must be split across messages"
        wg.dumps.clear()
        observed = await wg.get()
        assert observed is not None and observed.peers[key].allowed_ips == first
        assert parts_with_peer(wg.dumps[-1], key) >= 2, "the kernel continues the peer in later parts"

        # AddPeer on an existing peer: REPLACE_ALLOWEDIPS in the first chunk, the rest appended
        other = generate_private_key().public_key()
        await wg.apply([AddPeer(PeerConfig(other, frozenset({ipaddress.ip_network("192.0.2.0/24")})))])
        replaced = DeviceConfig.of(
            base.private_key,
            PORT,
            0,
            [PeerConfig(key, second), PeerConfig(other, frozenset({ipaddress.ip_network("192.0.2.0/24")}))],
        )
        await wg.apply([AddPeer(replaced.peers[key])])
        observed = await wg.get()
        assert observed is not None and observed.peers[key].allowed_ips == second
        assert configs(observed) == dict(replaced.peers)

        # UpdatePeer with allowed_ips replaces the whole list; without, leaves it alone
        three = frozenset(ipaddress.ip_network(n) for n in ("10.1.0.0/16", "fd01::/64", "192.0.2.77/32"))
        await wg.apply([UpdatePeer(key, allowed_ips=three)])
        observed = await wg.get()
        assert observed is not None and observed.peers[key].allowed_ips == three
        await wg.apply([UpdatePeer(key, persistent_keepalive=7)])
        observed = await wg.get()
        assert observed is not None
        assert observed.peers[key].allowed_ips == three and observed.peers[key].persistent_keepalive == 7
        # an allowed IP belongs to one peer: given to key, it leaves other
        await wg.apply([UpdatePeer(key, allowed_ips=three | {ipaddress.ip_network("192.0.2.0/24")})])
        observed = await wg.get()
        assert observed is not None and observed.peers[other].allowed_ips == frozenset()
        assert len(wg_dump(node)) == 2
    finally:
        await wg.close(remove=True)


def slow_reader(netns: str) -> Any:
    """A generic-netlink socket with a small receive buffer: the kernel builds each dump part only when
    the previous one has been read, so a change made while the first part is handled lands mid-dump."""

    def make() -> Any:
        from pyroute2 import AsyncWireGuard

        return AsyncWireGuard(netns=netns, flags=0, rcvbuf=8192)

    return make


class Meddling(KernelBackend):
    """Changes the device (with the wg tool) while its first ``times`` dumps are half read."""

    def __init__(self, node: Node, churn: PublicKey, times: int, **kwargs: Any) -> None:
        super().__init__(IFNAME, netns=node.ns, genl_factory=slow_reader(node.ns), **kwargs)
        self.node, self.churn, self.times, self.changes = node, churn, times, 0

    def meddle(self) -> None:
        self.changes += 1
        if self.changes % 2:
            self.node.run(
                "wg", "set", IFNAME, "peer", self.churn.b64, "allowed-ips", f"10.250.{self.changes}.0/24"
            )
        else:
            self.node.run("wg", "set", IFNAME, "peer", self.churn.b64, "remove")

    async def _request(self, msg: Any, flags: int, callback: Any = None) -> list[Any]:
        if not flags & NLM_F_DUMP or self.times <= 0:
            return await super()._request(msg, flags, callback)
        self.times -= 1
        first = True

        def on_part(part: Any) -> bool:
            nonlocal first
            if first:
                first = False
                self.meddle()  # blocks the loop: no further part is read (or built) meanwhile
            return callback(part) if callback is not None else False

        return await super()._request(msg, flags, on_part)


async def test_interrupted_dump_is_retried(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    desired = mesh_config(1000, seed=2)
    wg = await fresh(node)
    await sync(wg, desired)
    churn = generate_private_key().public_key()
    caplog.set_level(logging.DEBUG, logger="kubespan.wireguard")
    once = Meddling(node, churn, times=1, dump_attempts=1)
    retrying = Meddling(node, churn, times=3, dump_attempts=5)
    try:
        # a change while the dump is read: the kernel flags the later parts NLM_F_DUMP_INTR, which a
        # single attempt reports as DumpInterrupted...
        with pytest.raises(DumpInterrupted) as info:
            await once.get()
        assert info.value.errno == errno.EINTR and "interrupted" in str(info.value)
        caplog.clear()
        # ...and retries turn into a consistent snapshot: the 1000 peers and the churning peer as the
        # last change left it, never a mix of two generations
        observed = await retrying.get()
        assert observed is not None
        got = configs(observed)
        churned = got.pop(churn, None)
        assert got == dict(desired.peers)
        assert (churned is None) == (retrying.changes % 2 == 0)
        retried = sum("wireguard dump interrupted" in r.getMessage() for r in caplog.records)
        print(f"{retrying.changes} changes during dumps; {retried} interrupted dumps retried")
        assert retried == 3
    finally:
        await once.close()
        await retrying.close()
        await wg.close(remove=True)


class Tampered(wgmsg):
    """A SET_DEVICE message whose bytes are changed after encoding, to send what the codec cannot."""

    edit: Any = None

    def encode(self) -> Any:
        result = super().encode()
        data = bytearray(self.data)
        type(self).edit(data)
        self.data = data
        return result


def tamper(msg: wgmsg, edit: Any) -> wgmsg:
    cls = type("T", (Tampered,), {"edit": staticmethod(edit)})
    out = cls()
    out["cmd"], out["version"], out["attrs"] = msg["cmd"], msg["version"], msg["attrs"]
    return out


def shorten_attr(data: bytearray, value: bytes) -> None:
    """Make the attribute holding ``value`` (a 32-byte key) claim 31 bytes (its padded size is unchanged,
    so every enclosing length stays right)."""
    at = data.find(value)
    assert at >= 4 and int.from_bytes(data[at - 4 : at - 2], sys.byteorder) == 36
    data[at - 4 : at - 2] = (35).to_bytes(2, sys.byteorder)


async def apply_tampered(
    wg: KernelBackend, ops: list[Any], edit: Any, monkeypatch: pytest.MonkeyPatch
) -> WireGuardError:
    real = kw.encode_set
    monkeypatch.setattr(kw, "encode_set", lambda *a, **k: [tamper(m, edit) for m in real(*a, **k)])
    try:
        with pytest.raises(WireGuardError) as info:
            await wg.apply(ops)
    finally:
        monkeypatch.setattr(kw, "encode_set", real)
    return info.value


async def test_kernel_refusals_become_clear_errors(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    wg = await fresh(node)
    try:
        priv = generate_private_key()
        peer = generate_private_key().public_key()
        await wg.apply([SetDevice(priv, PORT, 0)])

        # a private key of 31 bytes: the family's attribute policy (exact length 32) refuses it (6.1 says
        # ERANGE, with an extended ack naming the policy)
        bad = generate_private_key()
        e = await apply_tampered(wg, [SetDevice(bad)], lambda d: shorten_attr(d, bad.raw), monkeypatch)
        print(f"31-byte private key: {e}")
        assert e.errno in (errno.EINVAL, errno.ERANGE)
        assert f"configuring {IFNAME}: message 1/1 failed: {os.strerror(e.errno)}" in str(e)
        assert bad.b64 not in str(e) and priv.b64 not in str(e)
        # a peer key of 31 bytes: refused, nothing added
        e = await apply_tampered(
            wg, [AddPeer(PeerConfig(peer))], lambda d: shorten_attr(d, peer.raw), monkeypatch
        )
        print(f"31-byte peer key: {e}")
        assert e.errno in (errno.EINVAL, errno.ERANGE) and peer.b64 not in str(e) and priv.b64 not in str(e)
        observed = await wg.get()
        assert observed is not None and observed.peers == {} and observed.private_key == priv

        # an IPv4 allowed IP with prefix length 33
        net = ipaddress.ip_network("10.9.9.0/24")

        def bad_cidr(d: bytearray) -> None:
            at = d.find(net.network_address.packed)
            # WGALLOWEDIP_A_IPADDR (8 bytes) is followed by WGALLOWEDIP_A_CIDR_MASK: header, then the u8
            assert d[at + 4 + 2] == 3 and d[at + 8] == 24
            d[at + 8] = 33

        e = await apply_tampered(wg, [AddPeer(PeerConfig(peer, frozenset({net})))], bad_cidr, monkeypatch)
        print(f"IPv4 allowed IP /33: {e}")
        assert e.errno == errno.EINVAL

        # too many allowed IPs for one message: the nested attribute's 16-bit length cannot hold 6000
        # entries, so the codec splits them (the kernel takes them all) instead of sending a length
        # that wraps around
        many = frozenset(ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24") for i in range(6000))
        msgs = encode_set(IFNAME, [AddPeer(PeerConfig(peer, many))])
        assert len(msgs) >= 3 and all(kw.message_size(m) <= kw.MAX_MESSAGE_SIZE for m in msgs)
        await wg.apply([AddPeer(PeerConfig(peer, many))])
        observed = await wg.get()
        assert observed is not None and observed.peers[peer].allowed_ips == many

        # a listen port another device holds: EADDRINUSE
        holder = KernelBackend("kubespan2", netns=node.ns)
        await holder.ensure_device()
        node.run("ip", "link", "set", "kubespan2", "up")
        node.run("ip", "link", "set", IFNAME, "up")
        try:
            await holder.apply([SetDevice(generate_private_key(), PORT + 1, 0)])
            with pytest.raises(WireGuardError) as info:
                await wg.apply([SetDevice(listen_port=PORT + 1)])
            assert info.value.errno == errno.EADDRINUSE, info.value
            assert "Address already in use" in str(info.value)
        finally:
            await holder.close(remove=True)
        # the device is still ours and usable after every refusal
        assert (await wg.get()) is not None
    finally:
        await wg.close(remove=True)
