"""The asyncio discovery client against an in-test fake of the Cluster service (grpc.aio on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from discovery import crypto
from discovery.client import (
    DiscoveryClient,
    ExponentialBackoff,
    jitter,
    parse_endpoint_url,
    redirect_target,
    schedule,
)
from discovery.testing import self_signed_cert
from spanapi.discovery.client import affiliate_pb2
from spanapi.discovery.server import cluster_pb2, cluster_pb2_grpc
from spanutil.ipcodec import ip_to_bytes
from spanutil.testing import eventually

pytestmark = pytest.mark.timeout(20)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
CLUSTER = "test-cluster"
ME = "node-me"


# --- fake Cluster service ----------------------------------------------------------------------------------


class FakeCluster(cluster_pb2_grpc.ClusterServicer):
    """Just enough of the registry: one cluster, upstream merge rules, snapshot-then-delta watches."""

    def __init__(self, *, client_ip: bytes = b"", redirect: str | None = None) -> None:
        self.client_ip = client_ip
        self.redirect = redirect
        self.data: dict[str, bytes] = {}
        self.endpoints: dict[str, list[bytes]] = {}
        self.hellos: list[cluster_pb2.HelloRequest] = []
        self.updates: list[cluster_pb2.AffiliateUpdateRequest] = []
        self.deletes: list[cluster_pb2.AffiliateDeleteRequest] = []
        self.watchers: list[asyncio.Queue[cluster_pb2.WatchResponse]] = []

    # test-side helpers
    def affiliate(self, aid: str) -> cluster_pb2.Affiliate:
        return cluster_pb2.Affiliate(
            id=aid, data=self.data.get(aid, b""), endpoints=self.endpoints.get(aid, [])
        )

    def put(self, aid: str, data: bytes | None = None, endpoints: list[bytes] = ()) -> None:  # type: ignore[assignment]
        changed = False
        if data:
            self.data[aid] = data
            changed = True
        eps = self.endpoints.setdefault(aid, [])
        self.data.setdefault(aid, b"")
        for e in endpoints:
            if e not in eps:
                eps.append(e)
                changed = True
        if changed:
            self.send(cluster_pb2.WatchResponse(affiliates=[self.affiliate(aid)]))

    def remove(self, aid: str) -> None:
        self.data.pop(aid, None)
        self.endpoints.pop(aid, None)
        self.send(cluster_pb2.WatchResponse(affiliates=[cluster_pb2.Affiliate(id=aid)], deleted=True))

    def send(self, msg: cluster_pb2.WatchResponse) -> None:
        for q in self.watchers:
            q.put_nowait(msg)

    # RPCs
    async def Hello(self, request: cluster_pb2.HelloRequest, context: Any) -> cluster_pb2.HelloResponse:
        self.hellos.append(request)
        resp = cluster_pb2.HelloResponse(client_ip=self.client_ip)
        if self.redirect:
            resp.redirect.endpoint = self.redirect
        return resp

    async def AffiliateUpdate(
        self, request: cluster_pb2.AffiliateUpdateRequest, context: Any
    ) -> cluster_pb2.AffiliateUpdateResponse:
        self.updates.append(request)
        self.put(request.affiliate_id, request.affiliate_data, list(request.affiliate_endpoints))
        return cluster_pb2.AffiliateUpdateResponse()

    async def AffiliateDelete(
        self, request: cluster_pb2.AffiliateDeleteRequest, context: Any
    ) -> cluster_pb2.AffiliateDeleteResponse:
        self.deletes.append(request)
        self.remove(request.affiliate_id)
        return cluster_pb2.AffiliateDeleteResponse()

    async def Watch(
        self, request: cluster_pb2.WatchRequest, context: Any
    ) -> AsyncIterator[cluster_pb2.WatchResponse]:
        q: asyncio.Queue[cluster_pb2.WatchResponse] = asyncio.Queue()
        snapshot = cluster_pb2.WatchResponse(affiliates=[self.affiliate(a) for a in self.data])
        self.watchers.append(q)  # registered atomically with the snapshot (no await in between)
        try:
            yield snapshot
            while True:
                yield await q.get()
        finally:
            self.watchers.remove(q)

    def full_updates(self, aid: str = ME) -> list[cluster_pb2.AffiliateUpdateRequest]:
        return [u for u in self.updates if u.affiliate_id == aid and u.affiliate_data]

    def keepalives(self, aid: str = ME) -> list[cluster_pb2.AffiliateUpdateRequest]:
        return [u for u in self.updates if u.affiliate_id == aid and not u.HasField("affiliate_data")]


@asynccontextmanager
async def serve(
    fake: FakeCluster, port: int = 0, creds: grpc.ServerCredentials | None = None
) -> AsyncIterator[int]:
    server = grpc.aio.server()
    cluster_pb2_grpc.add_ClusterServicer_to_server(fake, server)
    if creds is None:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(grace=None)


def make_client(*urls: str, **kw: Any) -> DiscoveryClient:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.2)
    kw.setdefault("coalesce_delay", 0.0)
    return DiscoveryClient(list(urls), cluster_id=CLUSTER, secret=KEY, affiliate_id=ME, **kw)


ClientFactory = Callable[..., DiscoveryClient]


@pytest.fixture
async def clients() -> AsyncIterator[ClientFactory]:
    """:func:`make_client`, every client it made closed at teardown."""
    made: list[DiscoveryClient] = []

    def make(*urls: str, **kw: Any) -> DiscoveryClient:
        made.append(make_client(*urls, **kw))
        return made[-1]

    yield make
    for c in made:
        await c.close()


def aff(name: str, **kw: Any) -> affiliate_pb2.Affiliate:
    fields: dict[str, Any] = {"node_id": name, "hostname": f"{name}.example", "nodename": name}
    return affiliate_pb2.Affiliate(**(fields | kw))


def ep(ip: str, port: int = 51820) -> affiliate_pb2.Endpoint:
    return crypto.endpoint_from_addr(ip, port)


def enc(a: affiliate_pb2.Affiliate, key: bytes = KEY) -> bytes:
    return crypto.encrypt_affiliate(key, a)


def enc_ep(e: affiliate_pb2.Endpoint) -> bytes:
    return crypto.encrypt_endpoint(KEY, e)


# --- tests -------------------------------------------------------------------------------------------------


async def test_hello_reports_public_ip_and_publishes() -> None:
    fake = FakeCluster(client_ip=ipaddress.IPv4Address("203.0.113.5").packed)
    seen: list[object] = []
    async with serve(fake) as port:
        async with make_client(f"http://127.0.0.1:{port}", on_public_ip=seen.append) as c:
            async with asyncio.timeout(5):
                assert await c.wait_connected()
            assert c.connected
            assert c.public_ip == ipaddress.IPv4Address("203.0.113.5")
            assert seen == [ipaddress.IPv4Address("203.0.113.5")]
            assert fake.hellos[0].cluster_id == CLUSTER
            assert fake.hellos[0].client_version == "kubespan-mesh/0.1"
            assert fake.updates == []  # nothing to publish yet

            mine = aff("me", addresses=[ip_to_bytes("10.0.0.1")])
            assert await c.set_local_data(mine, [ep("10.0.0.1"), ep("2001:db8::1")])
            await eventually(lambda: len(fake.full_updates()) == 1)
            u = fake.full_updates()[0]
            assert u.cluster_id == CLUSTER
            assert u.ttl.ToTimedelta() == datetime.timedelta(minutes=30)
            assert crypto.decrypt_affiliate(KEY, u.affiliate_data) == mine
            assert [crypto.decrypt_endpoint(KEY, b) for b in u.affiliate_endpoints] == [
                ep("10.0.0.1"),
                ep("2001:db8::1"),
            ]
            status = c.endpoint_status()[f"http://127.0.0.1:{port}"]
            assert status.connected and status.public_ip == ipaddress.IPv4Address("203.0.113.5")


async def test_snapshot_delta_delete_and_own_id_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="discovery.client")
    fake = FakeCluster()
    fake.put("peer-b", enc(aff("b")), [enc_ep(ep("192.0.2.2"))])
    fake.put(ME, enc(aff("stale-me")))  # our own entry from a previous life: never reported
    async with serve(fake) as port, make_client(f"http://127.0.0.1:{port}") as c:
        it = c.updates()
        snap = await asyncio.wait_for(anext(it), 5)
        assert set(snap) == {"peer-b"}
        assert snap["peer-b"].affiliate == aff("b")
        assert snap["peer-b"].endpoint_addrs() == [(ipaddress.IPv4Address("192.0.2.2"), 51820)]

        fake.put("peer-c", enc(aff("c")))
        snap = await asyncio.wait_for(anext(it), 5)
        assert set(snap) == {"peer-b", "peer-c"}

        fake.put("peer-b", None, [enc_ep(ep("198.51.100.2", 1234))])  # endpoint merged by the server
        snap = await asyncio.wait_for(anext(it), 5)
        assert [e.port for e in snap["peer-b"].endpoints] == [51820, 1234]

        fake.remove("peer-b")
        snap = await asyncio.wait_for(anext(it), 5)
        assert set(snap) == {"peer-c"}
        assert set(c.affiliates) == {"peer-c"}
        assert c.stats.decrypt_failures == 0 and c.stats.malformed_blobs == 0
        await c.set_local_data(aff("me"), [ep("10.0.0.1")])
        await eventually(lambda: len(fake.full_updates()) == 1)
    # Logs: one line per event, and neither the key nor any decrypted content.
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "discovery connected" in text
    assert all("\n" not in r.getMessage() for r in caplog.records)
    for secret in (
        KEY.hex(),
        base64.b64encode(KEY).decode(),
        "b.example",
        "c.example",
        "me.example",
        "10.0.0.1",
    ):
        assert secret not in text


async def test_data_less_affiliates_skipped() -> None:
    fake = FakeCluster()
    fake.put("harvested-only", None, [enc_ep(ep("192.0.2.9"))])
    fake.put("peer-b", enc(aff("b")))
    async with serve(fake) as port, make_client(f"http://127.0.0.1:{port}") as c:
        await eventually(lambda: "peer-b" in c.affiliates)
        assert set(c.affiliates) == {"peer-b"}


async def test_undecryptable_and_malformed_blobs_skipped_and_counted() -> None:
    fake = FakeCluster()
    fake.put("wrong-key", enc(aff("x"), key=OTHER_KEY))
    fake.put("too-short", b"\x01" * 10)
    fake.put("bad-endpoints", enc(aff("y")), [b"", b"\x00" * 17, enc_ep(ep("192.0.2.3"))])
    fake.put("good", enc(aff("g")))
    async with serve(fake) as port, make_client(f"http://127.0.0.1:{port}") as c:
        await eventually(lambda: "good" in c.affiliates)
        assert set(c.affiliates) == {"good", "bad-endpoints"}
        assert c.affiliates["bad-endpoints"].endpoint_addrs() == [(ipaddress.IPv4Address("192.0.2.3"), 51820)]
        assert c.stats.decrypt_failures == 1
        assert c.stats.malformed_blobs == 3  # short data + empty endpoint + misaligned endpoint

        # A tampered delta for a known affiliate is skipped; the session stays up.
        blob = bytearray(enc(aff("g2")))
        blob[-1] ^= 1
        fake.send(cluster_pb2.WatchResponse(affiliates=[cluster_pb2.Affiliate(id="good", data=bytes(blob))]))
        await eventually(lambda: c.stats.decrypt_failures == 2)
        assert c.affiliates["good"].affiliate == aff("g")
        assert c.connected and c.stats.reconnects == 0


async def test_redirect_followed_keeping_tls_mode() -> None:
    target = FakeCluster(client_ip=ipaddress.IPv6Address("2001:db8::7").packed)
    async with serve(target) as target_port:
        origin = FakeCluster(redirect=f"127.0.0.1:{target_port}")
        async with serve(origin) as origin_port:
            url = f"http://127.0.0.1:{origin_port}"
            async with make_client(url) as c:
                await c.set_local_data(aff("me"))
                async with asyncio.timeout(5):
                    await c.wait_connected()
                await eventually(lambda: len(target.full_updates()) == 1)
                assert len(origin.hellos) == 1 and origin.updates == [] and origin.watchers == []
                assert len(target.hellos) == 1
                assert c.stats.redirects == 1
                assert c.public_ip == ipaddress.IPv6Address("2001:db8::7")
                status = c.endpoint_status()[url]
                assert status.target == f"127.0.0.1:{target_port}" and not status.secure


async def test_redirect_loop_is_an_error() -> None:
    fake = FakeCluster()
    async with serve(fake) as port:
        fake.redirect = f"127.0.0.1:{port}"  # redirects to itself
        async with make_client(f"http://127.0.0.1:{port}") as c:
            await eventually(lambda: c.stats.reconnects >= 1)
            assert not c.connected
            assert "RedirectLoopError" in (c.endpoint_status()[f"http://127.0.0.1:{port}"].last_error or "")


async def test_keepalive_without_data_when_nothing_changed() -> None:
    fake = FakeCluster()
    async with serve(fake) as port, make_client(f"http://127.0.0.1:{port}", ttl=1.0) as c:
        await c.set_local_data(aff("me"), [ep("10.0.0.1")])
        # the client counts a keep-alive when its answer arrives, after the server has seen it
        await eventually(lambda: len(fake.keepalives()) >= 2 and c.stats.keepalives >= 2)
        assert len(fake.full_updates()) == 1
        ka = fake.keepalives()[0]
        assert ka.ttl.ToTimedelta() == datetime.timedelta(seconds=1)
        # no data (watchers are not notified) but our own endpoints, which expire on their own TTL
        assert not ka.HasField("affiliate_data")
        assert [crypto.decrypt_endpoint(KEY, e) for e in ka.affiliate_endpoints] == [ep("10.0.0.1")]
        assert c.stats.refreshes == 1 and c.stats.keepalives >= 2

        # Identical data is de-duplicated: no new full update, no fresh nonce.
        assert not await c.set_local_data(aff("me"), [ep("10.0.0.1")])
        await asyncio.sleep(0.1)
        assert len(fake.full_updates()) == 1
        # A change is published at once.
        assert await c.set_local_data(aff("me", hostname="renamed"), [ep("10.0.0.1")])
        await eventually(lambda: len(fake.full_updates()) == 2)
        assert crypto.decrypt_affiliate(KEY, fake.full_updates()[1].affiliate_data).hostname == "renamed"


async def test_full_data_after_reconnect_and_snapshot_replaces(clients: ClientFactory) -> None:
    first = FakeCluster()
    first.put("peer-old", enc(aff("old")))
    async with serve(first) as port:
        c = clients(f"http://127.0.0.1:{port}", snapshot_grace=1.0)
        await c.set_local_data(aff("me"), [ep("10.0.0.1")], {"peer-x": [ep("192.0.2.50")]})
        await c.start()
        await eventually(lambda: "peer-old" in c.affiliates and len(first.full_updates()) == 1)
        await eventually(lambda: [u.affiliate_id for u in first.updates].count("peer-x") == 1)
    # The server is gone; a fresh one with different state comes back on the same port.
    await eventually(lambda: not c.connected)
    assert "peer-old" in c.affiliates  # the cached view survives a short outage
    second = FakeCluster()
    second.put("peer-new", enc(aff("new")))
    async with serve(second, port):
        await eventually(lambda: len(second.full_updates()) == 1 and "peer-new" in c.affiliates)
        # A server that restarted empty must not make us drop everyone at once: entries the new
        # snapshot lacks are kept for the grace period, then the snapshot's view wins.
        assert set(c.affiliates) == {"peer-new", "peer-old"}
        await eventually(lambda: set(c.affiliates) == {"peer-new"})
        u = second.full_updates()[0]
        assert crypto.decrypt_affiliate(KEY, u.affiliate_data) == aff("me")
        assert len(u.affiliate_endpoints) == 1
        await eventually(lambda: [u.affiliate_id for u in second.updates].count("peer-x") == 1)
        assert c.stats.reconnects >= 1


async def test_explicit_delete_during_grace_is_immediate(clients: ClientFactory) -> None:
    first = FakeCluster()
    first.put("peer-a", enc(aff("a")))
    first.put("peer-b", enc(aff("b")))
    async with serve(first) as port:
        c = clients(f"http://127.0.0.1:{port}", snapshot_grace=30.0)
        await c.start()
        await eventually(lambda: set(c.affiliates) == {"peer-a", "peer-b"})
    await eventually(lambda: not c.connected)
    second = FakeCluster()
    second.put("peer-a", enc(aff("a")))
    async with serve(second, port):
        await eventually(lambda: c.connected)
        assert set(c.affiliates) == {"peer-a", "peer-b"}  # b kept (unconfirmed) for the grace period
        second.remove("peer-b")
        await eventually(lambda: set(c.affiliates) == {"peer-a"})  # a real delete applies at once


async def test_cache_dropped_after_ttl_without_connection(clients: ClientFactory) -> None:
    fake = FakeCluster()
    fake.put("peer-b", enc(aff("b")))
    async with serve(fake) as port:
        c = clients(f"http://127.0.0.1:{port}", ttl=1.0)
        await c.start()
        await eventually(lambda: "peer-b" in c.affiliates)
    await eventually(lambda: not c.connected)
    assert "peer-b" in c.affiliates  # kept through a short outage...
    await eventually(lambda: not c.affiliates)  # ...but not past the TTL: the server forgot it too


async def test_own_affiliate_missing_is_republished() -> None:
    fake = FakeCluster()
    async with serve(fake) as port, make_client(f"http://127.0.0.1:{port}") as c:
        await c.set_local_data(aff("me"))
        await eventually(lambda: len(fake.full_updates()) == 1 and c.connected)
        fake.remove(ME)  # e.g. expired or deleted by someone else
        await eventually(lambda: len(fake.full_updates()) == 2)
        assert fake.data[ME]


async def test_other_endpoints_published_when_changed_and_bounded() -> None:
    fake = FakeCluster()
    async with serve(fake) as port:
        async with make_client(f"http://127.0.0.1:{port}", max_other_affiliates_per_refresh=2) as c:
            others = {f"peer-{i}": [ep(f"192.0.2.{i}")] for i in range(3)}
            others[ME] = [ep("192.0.2.99")]  # our own id is never published as "other"
            await c.set_local_data(aff("me"), [], others)

            def other_updates() -> list[cluster_pb2.AffiliateUpdateRequest]:
                return [u for u in fake.updates if u.affiliate_id != ME]

            await eventually(lambda: len(other_updates()) == 3)
            for u in other_updates():
                assert not u.affiliate_data
                assert [crypto.decrypt_endpoint(KEY, b) for b in u.affiliate_endpoints] == others[
                    u.affiliate_id
                ]
            assert "peer-0" not in c.affiliates  # endpoint-only entries carry no data
            # Unchanged: nothing is re-sent.
            assert not await c.set_local_data(aff("me"), [], others)
            # One set changes: only that one is sent, the own affiliate is not re-published.
            others["peer-1"] = [ep("192.0.2.1"), ep("192.0.2.101")]
            assert await c.set_local_data(aff("me"), [], others)
            await eventually(lambda: len(other_updates()) == 4)
            assert other_updates()[-1].affiliate_id == "peer-1"
            assert len(fake.full_updates()) == 1
            assert c.stats.other_endpoint_updates == 4


async def test_two_endpoints_merged() -> None:
    one, two = FakeCluster(), FakeCluster()
    one.put("peer-b", enc(aff("b")), [enc_ep(ep("192.0.2.2"))])
    two.put("peer-b", enc(aff("b")), [enc_ep(ep("198.51.100.2"))])
    two.put("peer-c", enc(aff("c")))
    async with serve(one) as p1, serve(two) as p2:
        async with make_client(f"http://127.0.0.1:{p1}", f"127.0.0.1:{p2}") as c:
            await c.set_local_data(aff("me"))
            async with asyncio.timeout(5):
                assert await c.wait_connected(all_endpoints=True)
            await eventually(lambda: "peer-c" in c.affiliates and len(c.affiliates["peer-b"].endpoints) == 2)
            assert {str(ip) for ip, _ in c.affiliates["peer-b"].endpoint_addrs()} == {
                "192.0.2.2",
                "198.51.100.2",
            }
            # Both registries got our data.
            await eventually(lambda: len(one.full_updates()) == 1 and len(two.full_updates()) == 1)
            # Newest data wins across endpoints.
            two.put("peer-b", enc(aff("b", operating_system="newer")))
            await eventually(lambda: c.affiliates["peer-b"].affiliate.operating_system == "newer")
            # Gone from one registry but still in the other: kept, with that registry's endpoints only.
            one.remove("peer-b")
            await eventually(lambda: len(c.affiliates["peer-b"].endpoints) == 1)
            two.remove("peer-b")
            await eventually(lambda: "peer-b" not in c.affiliates)


async def test_delete_local_affiliate() -> None:
    fake = FakeCluster()
    async with serve(fake) as port, make_client(f"http://127.0.0.1:{port}", ttl=1.0) as c:
        await c.set_local_data(aff("me"))
        await eventually(lambda: len(fake.full_updates()) == 1 and c.connected)
        async with asyncio.timeout(5):
            await c.delete_local_affiliate()
        assert [d.affiliate_id for d in fake.deletes] == [ME]
        assert ME not in fake.data
        n = len(fake.updates)
        await asyncio.sleep(0.7)  # past TTL/2: no keep-alive, no republish after our own delete echo
        assert len(fake.updates) == n
        await c.set_local_data(aff("me"))
        await eventually(lambda: len(fake.full_updates()) == 2)


async def test_on_change_callback() -> None:
    fake = FakeCluster()
    fake.put("peer-b", enc(aff("b")))
    got: list[set[str]] = []

    async def on_change(snapshot: dict[str, object]) -> None:
        got.append(set(snapshot))

    async with serve(fake) as port, make_client(f"http://127.0.0.1:{port}", on_change=on_change):
        await eventually(lambda: got == [{"peer-b"}])
        fake.remove("peer-b")
        await eventually(lambda: got[-1] == set())


async def test_updates_iterator_ends_on_close() -> None:
    fake = FakeCluster()
    async with serve(fake) as port:
        c = make_client(f"http://127.0.0.1:{port}")
        await c.start()

        async def consume() -> int:
            return len([s async for s in c.updates()])

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        await c.close()
        assert await asyncio.wait_for(task, 2) == 0


def _self_signed(tmp: Path) -> tuple[Path, bytes, bytes]:
    cert_pem, key_pem = self_signed_cert("discovery.test")
    ca = tmp / "ca.pem"
    ca.write_bytes(cert_pem)
    return ca, cert_pem, key_pem


async def test_tls_endpoint_with_custom_ca(tmp_path: Path) -> None:
    ca, cert_pem, key_pem = _self_signed(tmp_path)
    fake = FakeCluster()
    fake.put("peer-b", enc(aff("b")))
    creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
    async with serve(fake, creds=creds) as port:
        async with make_client(f"https://127.0.0.1:{port}", tls_ca=ca, tls_server_name="discovery.test") as c:
            await eventually(lambda: "peer-b" in c.affiliates)
            assert c.endpoint_status()[f"https://127.0.0.1:{port}"].secure


# --- pure pieces -------------------------------------------------------------------------------------------


def test_backoff_schedule_math() -> None:
    mid = schedule(14, rand=lambda: 0.5)
    assert mid[:4] == pytest.approx([0.5, 0.75, 1.125, 1.6875])
    assert max(mid) == 60.0 and mid[-1] == 60.0  # the interval is capped at 60 s
    low = schedule(3, rand=lambda: 0.0)
    high = schedule(3, rand=lambda: 1.0)
    assert low == pytest.approx([0.25, 0.375, 0.5625])  # -50 %
    assert high == pytest.approx([0.75, 1.125, 1.6875])  # +50 %
    assert jitter(60.0, 0.5, 0.999999) == pytest.approx(90.0, abs=1e-3)  # jitter stays on at the cap

    values = iter([0.5, 0.5, 0.5, 0.5])
    b = ExponentialBackoff(rand=lambda: next(values))
    b.next_delay()
    b.next_delay()
    assert b.interval == pytest.approx(1.125)
    b.reset()
    assert b.next_delay() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="randomization"):
        ExponentialBackoff(randomization=1.5)


def test_endpoint_urls_like_talos() -> None:
    t = parse_endpoint_url("https://discovery.talos.dev/")
    assert (t.target, t.secure) == ("discovery.talos.dev:443", True)
    assert parse_endpoint_url("grpc://d.example").secure
    t = parse_endpoint_url("http://10.0.0.1")
    assert (t.target, t.secure) == ("10.0.0.1:80", False)
    t = parse_endpoint_url("[fd00::1]:3000")
    assert (t.target, t.secure) == ("[fd00::1]:3000", False)
    assert redirect_target("d2.example:3001", secure=True).target == "d2.example:3001"
    assert redirect_target("d2.example", secure=True).port == 443
    for bad in ("", "ftp://x", "host-without-port", "http://x/path", "http://u:p@x", "http://x:99999"):
        with pytest.raises(ValueError, match="discovery endpoint"):
            parse_endpoint_url(bad)


def test_constructor_validation() -> None:
    ok: dict[str, Any] = {"cluster_id": CLUSTER, "secret": KEY, "affiliate_id": ME}
    with pytest.raises(ValueError, match="ttl"):
        DiscoveryClient(["http://x"], **ok, ttl=3600)
    with pytest.raises(ValueError, match="at least one"):
        DiscoveryClient([], **ok)
    with pytest.raises(ValueError, match="twice"):
        DiscoveryClient(["http://x", "http://x"], **ok)
    with pytest.raises(ValueError, match="affiliate_id"):
        DiscoveryClient(["http://x"], cluster_id=CLUSTER, secret=KEY, affiliate_id="")
    with pytest.raises(crypto.SecretError):
        DiscoveryClient(["http://x"], cluster_id=CLUSTER, secret="bm90IGEga2V5", affiliate_id=ME)
    c = DiscoveryClient(
        ["http://x"],
        cluster_id=CLUSTER,
        secret=crypto.parse_secret("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="),
        affiliate_id=ME,
    )
    assert "AAEC" not in repr(c) and CLUSTER not in repr(c)


async def test_oversized_affiliate_rejected_without_state_change() -> None:
    c = make_client("http://127.0.0.1:1")
    assert await c.set_local_data(aff("me"))
    with pytest.raises(crypto.AffiliateTooLargeError):
        await c.set_local_data(aff("me", operating_system="x" * 3000))
    assert not await c.set_local_data(aff("me"))  # the previous data is still current


async def test_grace_timer_is_cancelled_by_close() -> None:
    c = make_client("http://127.0.0.1:1", snapshot_grace=0.1)
    s = c._sessions[0]
    known = cluster_pb2.Affiliate(id="peer-a", data=enc(aff("a")))
    c._merge(s._apply(cluster_pb2.WatchResponse(affiliates=[known]), snapshot=True))
    # a reconnect snapshot without it: kept for the grace period, a timer drops it afterwards
    c._merge(s._apply(cluster_pb2.WatchResponse(affiliates=[]), snapshot=True))
    assert "peer-a" in c.affiliates
    version = c.version
    await c.close()
    await asyncio.sleep(0.3)
    assert c.version == version and "peer-a" in c.affiliates, "nothing runs after close()"


async def test_grace_timer_drops_unconfirmed_entries_at_their_deadline() -> None:
    c = make_client("http://127.0.0.1:1", snapshot_grace=0.2)
    try:
        s = c._sessions[0]
        a = cluster_pb2.Affiliate(id="peer-a", data=enc(aff("a")))
        b = cluster_pb2.Affiliate(id="peer-b", data=enc(aff("b")))
        c._merge(s._apply(cluster_pb2.WatchResponse(affiliates=[a, b]), snapshot=True))
        c._merge(s._apply(cluster_pb2.WatchResponse(affiliates=[b]), snapshot=True))  # a unconfirmed
        await asyncio.sleep(0.1)
        c._merge(s._apply(cluster_pb2.WatchResponse(affiliates=[]), snapshot=True))  # b too, later
        await eventually(lambda: "peer-a" not in c.affiliates, within=0.2)
        assert "peer-b" in c.affiliates, "b keeps its own grace period"
        await eventually(lambda: not c.affiliates, within=0.4)
    finally:
        await c.close()
