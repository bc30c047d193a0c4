"""The real asyncio DiscoveryClient against the real discovery-service process (real gRPC over loopback).

No fakes: every test starts one or more server processes (``discovery_server`` fixture) and drives them
through :class:`DiscoveryClient`, checking what the clients see and, through the raw ``List``/``Watch``
RPCs, what the server stores and sends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest

from discovery.client import DiscoveredAffiliate, DiscoveryClient
from discovery.crypto import (
    addresses_to_pb,
    decrypt_affiliate,
    decrypt_endpoint,
    endpoint_from_addr,
    endpoint_to_addr,
)
from discovery.testing import ServerProcess, self_signed_cert
from kubespan.affiliate import RemoteAffiliate
from spanapi.discovery.client import affiliate_pb2
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc
from spanutil.ipcodec import ip_to_bytes

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., ServerProcess]
View = dict[str, tuple[bytes, tuple[tuple[str, int], ...]]]


# --- test data ---------------------------------------------------------------------------------------------


def new_cluster() -> tuple[str, bytes]:
    """A Talos-like cluster id (base64 of 32 random bytes) and a fresh 32-byte secret."""
    return base64.b64encode(os.urandom(32)).decode(), os.urandom(32)


def _addrs(endpoints: Sequence[affiliate_pb2.Endpoint]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((str(ip), port) for ip, port in (endpoint_to_addr(e) for e in endpoints)))


@dataclass
class Node:
    """What one node publishes: the plaintext affiliate and its own endpoints."""

    index: int
    id: str
    affiliate: affiliate_pb2.Affiliate
    endpoints: list[affiliate_pb2.Endpoint]
    version: int = 1
    public_key: str = field(default="")

    @classmethod
    def make(cls, index: int, name: str = "node") -> Node:
        aid = f"{name}-{index:02d}-{secrets.token_hex(16)}"
        key = base64.b64encode(os.urandom(32)).decode()
        node = cls(index, aid, affiliate_pb2.Affiliate(), [], 1, key)
        node._build()
        return node

    def _build(self) -> None:
        i, v = self.index, self.version
        a = affiliate_pb2.Affiliate(
            node_id=self.id,
            hostname=f"plainhost-{i:02d}-v{v}.corp.example",
            nodename=f"plainnode-{i:02d}-v{v}",
            machine_type="controlplane" if i == 0 else "worker",
            operating_system="Talos (v1.9.5)",
            addresses=addresses_to_pb([f"10.{v}.{i}.77", f"fd00:{v:x}:{i + 1:x}::77"]),
        )
        a.kubespan.public_key = self.public_key
        a.kubespan.address = ip_to_bytes(f"fd7f:175a:b2c1:{v:x}::{i + 1:x}")
        if i == 0:  # a control plane publishes its API server port (field 8), as Talos
            a.control_plane.api_server_port = 6443
        self.affiliate = a
        self.endpoints = [
            endpoint_from_addr(f"198.51.100.{i + 1}", 51820),
            endpoint_from_addr(f"2001:db8:5ec:{v:x}::{i + 1:x}", 51820),
        ]

    def changed(self) -> Node:
        """The same node (same id and key) with new hostname/addresses and one more endpoint."""
        new = Node(self.index, self.id, affiliate_pb2.Affiliate(), [], self.version + 1, self.public_key)
        new._build()
        # The server unions endpoints (each expires on its own), so a change only adds endpoints.
        new.endpoints = [*self.endpoints, endpoint_from_addr(f"203.0.113.{self.index + 1}", 51999)]
        return new

    def expected(self) -> tuple[bytes, tuple[tuple[str, int], ...]]:
        return self.affiliate.SerializeToString(deterministic=True), _addrs(self.endpoints)

    def plaintext_needles(self) -> dict[str, bytes]:
        """Every secret this node publishes, in every form it could leak in."""
        a = self.affiliate
        out = {
            "hostname": a.hostname.encode(),
            "nodename": a.nodename.encode(),
            "public_key(b64)": a.kubespan.public_key.encode(),
            "public_key(raw)": base64.b64decode(a.kubespan.public_key),
            "kubespan_address(raw)": a.kubespan.address,
            "kubespan_address(text)": str(ipaddress.ip_address(a.kubespan.address)).encode(),
        }
        for n, raw in enumerate(a.addresses):
            out[f"address{n}(raw)"] = raw
            out[f"address{n}(text)"] = str(ipaddress.ip_address(raw)).encode()
        for n, ep in enumerate(self.endpoints):
            out[f"endpoint{n}(raw)"] = ep.ip
            out[f"endpoint{n}(text)"] = str(ipaddress.ip_address(ep.ip)).encode()
        return out


def view_of(affiliates: dict[str, DiscoveredAffiliate]) -> View:
    """What a client sees, in a comparable form: id -> (plaintext affiliate, sorted endpoint list)."""
    return {
        aid: (d.affiliate.SerializeToString(deterministic=True), _addrs(d.endpoints))
        for aid, d in affiliates.items()
    }


def expected_view(nodes: Sequence[Node], me: Node | None = None) -> View:
    return {n.id: n.expected() for n in nodes if me is None or n.id != me.id}


def client_for(
    node: Node, urls: Sequence[str], cluster_id: str, secret: bytes, **kw: object
) -> DiscoveryClient:
    return DiscoveryClient(list(urls), cluster_id=cluster_id, secret=secret, affiliate_id=node.id, **kw)  # type: ignore[arg-type]


def url(srv: ServerProcess) -> str:
    return f"http://{srv.target}"


# --- waiting helpers (every wait is bounded) ---------------------------------------------------------------


async def until(
    client: DiscoveryClient,
    pred: Callable[[dict[str, DiscoveredAffiliate]], bool],
    within: float,
    what: str,
) -> dict[str, DiscoveredAffiliate]:
    """Wait, through the public ``updates()`` iterator, until ``pred(client.affiliates)`` holds."""
    last = client.affiliates
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            if pred(last):
                return last
            async for last in client.updates():
                if pred(last):
                    return last
    raise AssertionError(
        f"{client.affiliate_id}: {what} not reached within {within}s; it sees {sorted(last)}, "
        f"stats={client.stats}, status={client.endpoint_status()}"
    )


async def sees_exactly(client: DiscoveryClient, expected: View, within: float, what: str = "") -> None:
    await until(client, lambda v: view_of(v) == expected, within, what or f"exact view of {len(expected)}")


async def poll(cond: Callable[[], bool], within: float, what: str) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not cond():  # noqa: ASYNC110 - state lives in other tasks
                await asyncio.sleep(0.05)
            return
    raise AssertionError(f"{what} not reached within {within}s")


@contextlib.asynccontextmanager
async def running(*clients: DiscoveryClient) -> AsyncIterator[tuple[DiscoveryClient, ...]]:
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)
        yield clients


async def server_list(srv: ServerProcess, cluster_id: str) -> dict[str, pb.Affiliate]:
    """The server's stored state for one cluster, through the raw List RPC."""
    async with grpc.aio.insecure_channel(srv.target) as ch:
        resp = await rpc.ClusterStub(ch).List(pb.ListRequest(cluster_id=cluster_id), timeout=5)
    return {a.id: a for a in resp.affiliates}


class RawWatcher:
    """A raw Watch stream on the server that records every message after the snapshot."""

    def __init__(self, srv: ServerProcess, cluster_id: str) -> None:
        self.srv = srv
        self.cluster_id = cluster_id
        self.snapshot: pb.WatchResponse | None = None
        self.messages: list[tuple[float, pb.WatchResponse]] = []
        self.ended = False
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> RawWatcher:
        self._channel = grpc.aio.insecure_channel(self.srv.target)
        call = rpc.ClusterStub(self._channel).Watch(pb.WatchRequest(cluster_id=self.cluster_id))
        async with asyncio.timeout(5):
            self.snapshot = await call.read()

        async def reader() -> None:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    self.ended = True
                    return
                self.messages.append((time.monotonic(), msg))

        self._task = asyncio.create_task(reader())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None and self._channel is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task
        await self._channel.close()


def _self_signed(path: Path, cn: str) -> bytes:
    """Self-signed ECDSA P-256 certificate for ``localhost``, written as tls.crt / tls.key."""
    cert, key = self_signed_cert("localhost", cn)
    (path / "tls.key").write_bytes(key)
    (path / "tls.crt").write_bytes(cert)
    return cert


# --- 1. five clients: publish, see each other, change, delete ------------------------------------------------


async def test_five_clients_publish_change_and_delete(discovery_server: Start) -> None:
    srv = discovery_server()
    cid, secret = new_cluster()
    nodes = [Node.make(i) for i in range(5)]
    clients = [client_for(n, [url(srv)], cid, secret) for n in nodes]
    async with asyncio.timeout(30), running(*clients):
        for n, c in zip(nodes, clients, strict=True):
            assert await c.set_local_data(n.affiliate, n.endpoints)
        for n, c in zip(nodes, clients, strict=True):
            await sees_exactly(c, expected_view(nodes, me=n), 10, "the other 4, decrypted")
            assert n.id not in c.affiliates
            assert c.stats.decrypt_failures == 0 and c.stats.malformed_blobs == 0
        assert set(await server_list(srv, cid)) == {n.id for n in nodes}
        # node 0's control_plane (field 8) went through the registry and is decoded by the others
        cp = clients[1].affiliates[nodes[0].id].affiliate
        # field 8 (tag 0x42), 3 bytes: ControlPlane field 1 (tag 0x08) = varint 6443 (0xab 0x32)
        assert cp.HasField("control_plane") and b"\x42\x03\x08\xab\x32" in cp.SerializeToString()
        assert RemoteAffiliate.from_pb(cp).api_server_port == 6443
        assert RemoteAffiliate.from_pb(clients[0].affiliates[nodes[1].id].affiliate).api_server_port is None

        # node 2 changes its data: everyone else sees the new plaintext and the added endpoint
        nodes[2] = nodes[2].changed()
        assert await clients[2].set_local_data(nodes[2].affiliate, nodes[2].endpoints)
        for n, c in zip(nodes, clients, strict=True):
            if n is not nodes[2]:
                await sees_exactly(c, expected_view(nodes, me=n), 10, "node 2's change")
        seen = clients[0].affiliates[nodes[2].id]
        assert seen.affiliate.hostname == "plainhost-02-v2.corp.example"
        assert len(seen.endpoints) == 3

        # node 4 deletes itself: it disappears for the others and from the server
        gone = nodes.pop(4)
        async with asyncio.timeout(10):
            await clients[4].delete_local_affiliate()
        assert clients[4].stats.deletes == 1
        assert gone.id not in await server_list(srv, cid)
        for n, c in zip(nodes, clients[:4], strict=True):
            await sees_exactly(c, expected_view(nodes, me=n), 10, "node 4 gone")


# --- 2. fifty clients in one process --------------------------------------------------------------------------


async def test_fifty_clients_converge(discovery_server: Start, capsys: pytest.CaptureFixture[str]) -> None:
    srv = discovery_server("--no-rpc-log")
    cid, secret = new_cluster()
    nodes = [Node.make(i) for i in range(50)]
    clients = [client_for(n, [url(srv)], cid, secret) for n in nodes]
    for n, c in zip(nodes, clients, strict=True):
        await c.set_local_data(n.affiliate, n.endpoints)
    t0 = time.monotonic()
    async with asyncio.timeout(60), running(*clients):
        await asyncio.gather(*(until(c, lambda v: len(v) == 49, 45, "49 peers") for c in clients))
        elapsed = time.monotonic() - t0
        with capsys.disabled():
            print(f"\n[50 clients] all converged to 49 peers in {elapsed:.2f} s")
        for n, c in zip(nodes, clients, strict=True):
            assert view_of(c.affiliates) == expected_view(nodes, me=n)
            assert c.stats.decrypt_failures == 0 and c.stats.reconnects == 0
        assert len(await server_list(srv, cid)) == 50


# --- 3. a client with the wrong secret ------------------------------------------------------------------------


async def test_wrong_secret_is_skipped_and_counted(discovery_server: Start) -> None:
    srv = discovery_server()
    cid, secret = new_cluster()
    a, b, x = Node.make(0), Node.make(1), Node.make(2, "intruder")
    ca, cb = (client_for(n, [url(srv)], cid, secret) for n in (a, b))
    cx = client_for(x, [url(srv)], cid, os.urandom(32))
    async with asyncio.timeout(30), running(ca, cb, cx):
        for n, c in ((a, ca), (b, cb), (x, cx)):
            await c.set_local_data(n.affiliate, n.endpoints)
        await poll(
            lambda: ca.stats.decrypt_failures >= 1 and cb.stats.decrypt_failures >= 1,
            10,
            "the good clients received the intruder's blob",
        )
        await poll(lambda: cx.stats.decrypt_failures >= 2, 10, "the intruder received both good blobs")
        await sees_exactly(ca, expected_view([b]), 10)
        await sees_exactly(cb, expected_view([a]), 10)
        assert cx.affiliates == {}
        assert set(await server_list(srv, cid)) == {a.id, b.id, x.id}
        # no crash, no reconnect: sessions stay up and keep working
        for c in (ca, cb, cx):
            assert c.connected and c.stats.reconnects == 0 and c.stats.malformed_blobs == 0
        b2 = b.changed()
        await cb.set_local_data(b2.affiliate, b2.endpoints)
        await sees_exactly(ca, expected_view([b2]), 10, "a later change still arrives")
        assert cx.affiliates == {}


# --- 4. the server is blind ---------------------------------------------------------------------------------


def _leaks(blob: bytes, needles: dict[str, bytes]) -> list[str]:
    return [name for name, needle in needles.items() if needle and needle in blob]


async def test_server_stores_no_plaintext(discovery_server: Start) -> None:
    srv = discovery_server()
    cid, secret = new_cluster()
    nodes = [Node.make(i) for i in range(3)]
    clients = [client_for(n, [url(srv)], cid, secret) for n in nodes]
    needles = {f"{n.id}:{k}": v for n in nodes for k, v in n.plaintext_needles().items()}
    # positive control: the binary/wire forms of the needles are found in what the clients encrypt
    for n in nodes:
        plain = n.affiliate.SerializeToString() + b"".join(e.SerializeToString() for e in n.endpoints)
        wire_forms = {
            k: v for k, v in n.plaintext_needles().items() if "text" not in k and "key(raw)" not in k
        }
        assert len(wire_forms) == 8 and _leaks(plain, wire_forms) == list(wire_forms)
    async with asyncio.timeout(30), running(*clients):
        for n, c in zip(nodes, clients, strict=True):
            await c.set_local_data(n.affiliate, n.endpoints)
        for n, c in zip(nodes, clients, strict=True):
            await sees_exactly(c, expected_view(nodes, me=n), 10)
        stored = await server_list(srv, cid)
        assert set(stored) == {n.id for n in nodes}
        for n in nodes:
            a = stored[n.id]
            # GCM: nonce(12) + ciphertext + tag(16); endpoints: AES-ECB blocks
            assert len(a.data) == len(n.affiliate.SerializeToString(deterministic=True)) + 28
            assert decrypt_affiliate(secret, a.data) == n.affiliate  # it IS our data, encrypted
            assert len(a.endpoints) == 2 and all(len(e) in (16, 32) for e in a.endpoints)
            assert sorted(_addrs([decrypt_endpoint(secret, e) for e in a.endpoints])) == list(n.expected()[1])
            for blob in (a.data, *a.endpoints):
                assert not _leaks(blob, needles), f"plaintext in the stored blob of {n.id}"
            assert not _leaks(a.id.encode(), {k: v for k, v in needles.items() if "id" not in k})
    # what the server persisted and logged is just as blind
    assert srv.stop() == 0
    assert srv.state_dir is not None
    files = [p for p in srv.state_dir.rglob("*") if p.is_file()]
    assert files, "the server persisted nothing"
    for p in files:
        assert not _leaks(p.read_bytes(), needles), f"plaintext in {p.name}"
    assert srv.log_path is not None
    assert not _leaks(srv.log_path.read_bytes(), needles), "plaintext in the server log"


# --- 5. expiry of a client that went away without deleting ----------------------------------------------------


async def test_closed_client_expires_after_ttl(discovery_server: Start) -> None:
    srv = discovery_server("--gc-interval", "200ms")
    cid, secret = new_cluster()
    stay, leave = Node.make(0), Node.make(1)
    c_stay = client_for(stay, [url(srv)], cid, secret)
    c_leave = client_for(leave, [url(srv)], cid, secret, ttl=2.0)
    async with asyncio.timeout(30), c_stay:
        await c_stay.set_local_data(stay.affiliate, stay.endpoints)
        async with c_leave:
            await c_leave.set_local_data(leave.affiliate, leave.endpoints)
            await sees_exactly(c_stay, expected_view([leave]), 10)
            await asyncio.sleep(1.5)  # past one TTL/2 refresh: the entry is kept alive while running
            assert leave.id in c_stay.affiliates
        assert c_leave.stats.deletes == 0
        closed = time.monotonic()
        assert leave.id in await server_list(srv, cid), "close() must not delete the affiliate"
        await until(c_stay, lambda v: leave.id not in v, 6, "the closed client expired")
        took = time.monotonic() - closed
        assert leave.id not in await server_list(srv, cid)
        assert stay.id in await server_list(srv, cid)
        print(f"expired {took:.2f} s after close (ttl 2 s)")


# --- 6. Hello redirect ------------------------------------------------------------------------------------------


async def test_redirect_to_other_server(discovery_server: Start) -> None:
    b = discovery_server()
    a = discovery_server("--redirect-endpoint", b.target)
    cid, secret = new_cluster()
    moved, peer = Node.make(0), Node.make(1)
    c_moved = client_for(moved, [url(a)], cid, secret)
    c_peer = client_for(peer, [url(b)], cid, secret)
    async with asyncio.timeout(30), running(c_moved, c_peer):
        await c_moved.set_local_data(moved.affiliate, moved.endpoints)
        await c_peer.set_local_data(peer.affiliate, peer.endpoints)
        await sees_exactly(c_moved, expected_view([peer]), 10, "peer on B seen through the redirect")
        await sees_exactly(c_peer, expected_view([moved]), 10)
        on_b, on_a = await server_list(b, cid), await server_list(a, cid)
        assert set(on_b) == {moved.id, peer.id}
        assert decrypt_affiliate(secret, on_b[moved.id].data) == moved.affiliate
        assert on_a == {}
        assert c_moved.stats.redirects == 1
        status = c_moved.endpoint_status()[url(a)]
        assert status.target == b.target and status.connected and not status.secure


# --- 7. server killed and replaced: clients reconnect and re-publish ---------------------------------------------


async def _stored_plaintexts(srv: ServerProcess, cid: str, secret: bytes) -> dict[str, bytes]:
    try:
        stored = await server_list(srv, cid)
    except grpc.aio.AioRpcError:
        return {}
    return {
        aid: decrypt_affiliate(secret, a.data).SerializeToString(deterministic=True)
        for aid, a in stored.items()
        if a.data
    }


async def test_reconnect_after_kill9_to_empty_server_on_same_port(
    discovery_server: Start, tmp_path: Path
) -> None:
    first = discovery_server()
    port = first.ports["grpc"]
    cid, secret = new_cluster()
    nodes = [Node.make(i) for i in range(2)]
    clients = [client_for(n, [f"http://127.0.0.1:{port}"], cid, secret) for n in nodes]
    async with asyncio.timeout(60), running(*clients):
        for n, c in zip(nodes, clients, strict=True):
            await c.set_local_data(n.affiliate, n.endpoints)
        for n, c in zip(nodes, clients, strict=True):
            await sees_exactly(c, expected_view(nodes, me=n), 10)
        refreshes = [c.stats.refreshes for c in clients]

        first.kill()
        await poll(lambda: not any(c.connected for c in clients), 10, "clients notice the dead server")
        empty = tmp_path / "empty-state"
        assert not empty.exists()
        second = await asyncio.to_thread(discovery_server, "--addr", f"127.0.0.1:{port}", state_dir=empty)
        cmd = second.command()
        assert cmd.count("--addr") == 2 and cmd[cmd.index("--addr") + 1] == "127.0.0.1:0"
        assert second.ports["grpc"] == port, "argparse must take the last --addr"

        # no call from the test: the clients reconnect (backoff) and re-publish their full data
        want = {n.id: n.affiliate.SerializeToString(deterministic=True) for n in nodes}
        async with asyncio.timeout(20):
            while await _stored_plaintexts(second, cid, secret) != want:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await poll(lambda: all(c.connected for c in clients), 10, "clients connected to the new server")
        for c, before in zip(clients, refreshes, strict=True):
            assert c.stats.reconnects >= 1 and c.stats.refreshes > before
        stored = await server_list(second, cid)
        for n in nodes:
            assert sorted(_addrs([decrypt_endpoint(secret, e) for e in stored[n.id].endpoints])) == list(
                n.expected()[1]
            )
        # they see each other through the new server: a newcomer is seen by both and sees both
        late = Node.make(2, "late")
        async with client_for(late, [f"http://127.0.0.1:{port}"], cid, secret) as c_late:
            await c_late.set_local_data(late.affiliate, late.endpoints)
            await sees_exactly(c_late, expected_view(nodes), 10)
            for n, c in zip(nodes, clients, strict=True):
                await sees_exactly(c, expected_view([*nodes, late], me=n), 10)


# --- 8. TLS -----------------------------------------------------------------------------------------------------


async def test_tls_with_custom_ca(discovery_server: Start, tmp_path: Path) -> None:
    _self_signed(tmp_path, "localhost")
    crt = tmp_path / "tls.crt"
    srv = discovery_server("--certificate-path", str(crt), "--key-path", str(tmp_path / "tls.key"))
    tls_url = f"https://localhost:{srv.ports['grpc']}"
    cid, secret = new_cluster()
    nodes = [Node.make(i) for i in range(2)]
    clients = [client_for(n, [tls_url], cid, secret, tls_ca=crt) for n in nodes]
    untrusting = client_for(Node.make(9, "untrusting"), [tls_url], cid, secret)  # system roots only
    async with asyncio.timeout(30), running(*clients, untrusting):
        for n, c in zip(nodes, clients, strict=True):
            await c.set_local_data(n.affiliate, n.endpoints)
        for n, c in zip(nodes, clients, strict=True):
            await sees_exactly(c, expected_view(nodes, me=n), 10)
            assert c.public_ip == ipaddress.IPv4Address("127.0.0.1")
            status = c.endpoint_status()[tls_url]
            assert status.secure and status.connected
        await poll(
            lambda: untrusting.endpoint_status()[tls_url].last_error is not None, 10, "TLS failure reported"
        )
        assert not untrusting.connected and untrusting.public_ip is None


# --- 9. several discovery endpoints at once ----------------------------------------------------------------------


async def test_multiple_endpoints_merged(discovery_server: Start) -> None:
    s1, s2 = discovery_server(), discovery_server()
    cid, secret = new_cluster()
    a, b, c, d = (Node.make(i, name) for i, name in enumerate("abcd"))
    ca = client_for(a, [url(s1), url(s2)], cid, secret)
    cb = client_for(b, [url(s2)], cid, secret)
    cc = client_for(c, [url(s1)], cid, secret)
    cd = client_for(d, [url(s1), url(s2)], cid, secret)  # observer on both
    async with asyncio.timeout(30), running(ca, cb, cc, cd):
        for n, cl in ((a, ca), (b, cb), (c, cc), (d, cd)):
            await cl.set_local_data(n.affiliate, n.endpoints)
        await sees_exactly(cd, expected_view([a, b, c]), 10, "B and C merged from both servers")
        await sees_exactly(ca, expected_view([b, c, d]), 10)
        await sees_exactly(cb, expected_view([a, d]), 10)  # only server 2
        await sees_exactly(cc, expected_view([a, d]), 10)  # only server 1
        assert set(await server_list(s1, cid)) == {a.id, c.id, d.id}
        assert set(await server_list(s2, cid)) == {a.id, b.id, d.id}
        for cl in (ca, cd):
            assert all(st.connected for st in cl.endpoint_status().values())
        # an update published to both arrives once, not duplicated
        a2 = a.changed()
        await ca.set_local_data(a2.affiliate, a2.endpoints)
        await sees_exactly(cd, expected_view([a2, b, c]), 10, "A's change merged")
        assert len(cd.affiliates[a.id].endpoints) == 3


# --- 10. TTL-only keep-alives ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "with_endpoints",
    [
        pytest.param(False, id="data-only"),
        pytest.param(True, id="with-endpoints"),
    ],
)
async def test_keepalive_keeps_entry_without_notifying(discovery_server: Start, with_endpoints: bool) -> None:
    ttl = 2.0
    srv = discovery_server("--gc-interval", "200ms")
    cid, secret = new_cluster()
    k, peer = Node.make(0, "keepalive"), Node.make(1, "peer")
    if not with_endpoints:
        k.endpoints = []
    ck = client_for(k, [url(srv)], cid, secret, ttl=ttl)
    cp = client_for(peer, [url(srv)], cid, secret)
    async with asyncio.timeout(40), running(ck, cp):
        await ck.set_local_data(k.affiliate, k.endpoints)
        await sees_exactly(cp, expected_view([k]), 10)
        async with RawWatcher(srv, cid) as watcher:
            assert watcher.snapshot is not None
            snap = {a.id: a for a in watcher.snapshot.affiliates}
            assert set(snap) == {k.id} and snap[k.id].data  # the peer publishes nothing
            before = ck.stats.as_dict()
            await asyncio.sleep(3.5 * ttl)
            after = ck.stats.as_dict()
            # the entry (and all it carries) is alive after 3.5 TTLs, and nobody was notified
            stored = await server_list(srv, cid)
            assert k.id in stored, "the keep-alives did not keep the entry alive"
            assert stored[k.id].data == snap[k.id].data, "the data was re-sent (new nonce)"
            assert sorted(stored[k.id].endpoints) == sorted(snap[k.id].endpoints), "endpoints changed"
            assert [m for _, m in watcher.messages] == [], "watchers were notified of keep-alives"
            assert after["keepalives"] - before["keepalives"] >= 4, (before, after)
            assert after["refreshes"] == before["refreshes"], (before, after)
            assert view_of(cp.affiliates) == expected_view([k])
            # positive control: the watch is live, a real change is delivered
            k2 = k.changed()
            if not with_endpoints:
                k2.endpoints = []
            await ck.set_local_data(k2.affiliate, k2.endpoints)
            await poll(lambda: bool(watcher.messages), 5, "the change reaches the raw watcher")
            msg = watcher.messages[0][1]
            assert not msg.deleted and [a.id for a in msg.affiliates] == [k.id]
            assert decrypt_affiliate(secret, msg.affiliates[0].data) == k2.affiliate
            assert not watcher.ended
