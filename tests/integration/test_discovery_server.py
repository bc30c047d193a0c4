"""The real discovery-service process over real gRPC on loopback, driven with the raw stubs."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from discovery.testing import ServerProcess, self_signed_cert
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc

Start = Callable[..., ServerProcess]
CID = "integration-cluster"


def upd(
    aid: str, data: bytes | None = None, endpoints: tuple[bytes, ...] = (), ttl: int = 1800, cid: str = CID
):
    req = pb.AffiliateUpdateRequest(cluster_id=cid, affiliate_id=aid, affiliate_endpoints=list(endpoints))
    if data is not None:
        req.affiliate_data = data
    req.ttl.seconds = ttl
    return req


async def http_get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.read()


async def listing(stub: rpc.ClusterStub, cid: str = CID) -> dict[str, tuple[bytes, list[bytes]]]:
    resp = await stub.List(pb.ListRequest(cluster_id=cid), timeout=5)
    return {a.id: (a.data, list(a.endpoints)) for a in resp.affiliates}


async def test_rpc_semantics(discovery_server: Start) -> None:
    srv = discovery_server()
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)
        hello = await stub.Hello(pb.HelloRequest(cluster_id=CID, client_version="v1.9.0"), timeout=5)
        assert hello.client_ip == bytes([127, 0, 0, 1])
        assert not hello.HasField("redirect")

        watch = stub.Watch(pb.WatchRequest(cluster_id=CID), timeout=30)
        first = await watch.read()
        assert list(first.affiliates) == [] and not first.deleted  # snapshot, even when empty

        e1, e2 = os.urandom(16), os.urandom(32)
        await stub.AffiliateUpdate(upd("a", b"data-1", (e1,)), timeout=5)
        msg = await watch.read()
        assert [(a.id, a.data, list(a.endpoints)) for a in msg.affiliates] == [("a", b"data-1", [e1])]

        # endpoints merge by bytes; identical data and a known endpoint notify nobody
        await stub.AffiliateUpdate(upd("a", b"data-1", (e1,)), timeout=5)
        await stub.AffiliateUpdate(upd("a", None, (e2,)), timeout=5)
        msg = await watch.read()
        assert msg.affiliates[0].data == b"data-1"
        assert list(msg.affiliates[0].endpoints) == [e1, e2]
        assert await listing(stub) == {"a": (b"data-1", [e1, e2])}

        # endpoint-only update creates a data-less affiliate (what nodes do for each other)
        await stub.AffiliateUpdate(upd("b", None, (e1,)), timeout=5)
        msg = await watch.read()
        assert msg.affiliates[0].id == "b" and msg.affiliates[0].data == b""

        await stub.AffiliateDelete(pb.AffiliateDeleteRequest(cluster_id=CID, affiliate_id="a"), timeout=5)
        msg = await watch.read()
        assert msg.deleted and [a.id for a in msg.affiliates] == ["a"]
        # idempotent
        await stub.AffiliateDelete(pb.AffiliateDeleteRequest(cluster_id=CID, affiliate_id="a"), timeout=5)
        assert set(await listing(stub)) == {"b"}
        watch.cancel()


async def test_validation_codes_and_no_partial_mutation(discovery_server: Start) -> None:
    srv = discovery_server()
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)
        await stub.AffiliateUpdate(upd("keep", b"original", (b"\x01" * 16,)), timeout=5)
        before = await listing(stub)
        cases = [
            (upd("x", cid=""), grpc.StatusCode.INVALID_ARGUMENT, "cluster_id"),
            (upd("x", cid="c" * 257), grpc.StatusCode.INVALID_ARGUMENT, "cluster_id"),
            (upd(""), grpc.StatusCode.INVALID_ARGUMENT, "affiliate_id"),
            (upd("a" * 257), grpc.StatusCode.INVALID_ARGUMENT, "affiliate_id"),
            (upd("keep", b"z" * 2049), grpc.StatusCode.INVALID_ARGUMENT, "2048"),
            (upd("keep", b"new", (b"e" * 33,)), grpc.StatusCode.INVALID_ARGUMENT, "affiliate_endpoints"),
            (upd("keep", b"new", (b"e" * 15,)), grpc.StatusCode.INVALID_ARGUMENT, "affiliate_endpoints"),
            (upd("keep", b"new", ttl=31 * 60), grpc.StatusCode.INVALID_ARGUMENT, "ttl"),
            (
                upd("keep", b"new", tuple(i.to_bytes(16, "big") for i in range(2, 67))),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "64",
            ),
        ]
        for req, code, needle in cases:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.AffiliateUpdate(req, timeout=5)
            assert ei.value.code() == code, (needle, ei.value.details())
            assert needle in (ei.value.details() or ""), ei.value.details()
        assert await listing(stub) == before
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.Hello(pb.HelloRequest(cluster_id=""), timeout=5)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.Watch(pb.WatchRequest(cluster_id="")).read()
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # malformed protobuf on the wire
        raw = ch.unary_unary("/sidero.discovery.server.Cluster/AffiliateUpdate")
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await raw(b"\xff\xff\xff\xff", timeout=5)
        assert ei.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
        assert await listing(stub) == before


async def test_cluster_affiliate_limit(discovery_server: Start) -> None:
    srv = discovery_server()
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)
        await asyncio.gather(*(stub.AffiliateUpdate(upd(f"n{i}", b"d"), timeout=30) for i in range(1024)))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.AffiliateUpdate(upd("one-too-many", b"d"), timeout=5)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(await listing(stub)) == 1024
        await stub.AffiliateUpdate(upd("n5", b"still fine"), timeout=5)  # existing ones may update


async def test_rate_limit(discovery_server: Start) -> None:
    srv = discovery_server(rate_limit=1)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)
        for _ in range(60):
            await stub.Hello(pb.HelloRequest(cluster_id=CID), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.Hello(pb.HelloRequest(cluster_id=CID), timeout=0.5)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # with a deadline that covers the wait, the call waits for a token and succeeds
        await stub.Hello(pb.HelloRequest(cluster_id=CID), timeout=3)


async def test_proxy_headers_only_from_trusted_proxies(discovery_server: Start) -> None:
    md = (("x-real-ip", "203.0.113.7"),)
    plain = discovery_server()
    trusting = discovery_server("--trusted-proxy", "127.0.0.0/8", state_dir=None)
    for srv, expected in ((plain, bytes([127, 0, 0, 1])), (trusting, bytes([203, 0, 113, 7]))):
        async with grpc.aio.insecure_channel(srv.target) as ch:
            hello = await rpc.ClusterStub(ch).Hello(pb.HelloRequest(cluster_id=CID), metadata=md, timeout=5)
            assert hello.client_ip == expected
    async with grpc.aio.insecure_channel(trusting.target) as ch:
        xff = (("x-forwarded-for", "2001:db8::5, 10.0.0.1"),)
        hello = await rpc.ClusterStub(ch).Hello(pb.HelloRequest(cluster_id=CID), metadata=xff, timeout=5)
        assert hello.client_ip == bytes.fromhex("20010db8000000000000000000000005")
    # the per-RPC log line names the same client address (cached per connection, forwarded per call)
    peers: list[str] = []
    for _ in range(50):  # per-RPC lines are written in batches (spanutil.logs.FLUSH_INTERVAL)
        peers = [r["peer"] for r in trusting.lines() if r.get("msg") == "rpc"]
        if len(peers) >= 2:
            break
        await asyncio.sleep(0.1)
    assert peers == ["203.0.113.7", "2001:db8::5"]


async def test_redirect(discovery_server: Start) -> None:
    srv = discovery_server("--redirect-endpoint", "discovery.example.net:443", state_dir=None)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        hello = await rpc.ClusterStub(ch).Hello(pb.HelloRequest(cluster_id=CID), timeout=5)
        assert hello.redirect.endpoint == "discovery.example.net:443"


def _self_signed(path: Path, cn: str) -> bytes:
    """Write a fresh certificate and key atomically (the server reloads on change); return the cert."""
    cert, key = self_signed_cert("localhost", cn)
    (path / "tls.key.tmp").write_bytes(key)
    (path / "tls.crt.tmp").write_bytes(cert)
    os.replace(path / "tls.key.tmp", path / "tls.key")
    os.replace(path / "tls.crt.tmp", path / "tls.crt")
    return cert


async def _tls_hello(port: int, root: bytes) -> bytes:
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as ch:
        hello = await rpc.ClusterStub(ch).Hello(pb.HelloRequest(cluster_id=CID), timeout=5)
        return hello.client_ip


async def test_tls_and_certificate_reload(discovery_server: Start, tmp_path: Path) -> None:
    first = _self_signed(tmp_path, "first")
    srv = discovery_server(
        "--certificate-path",
        str(tmp_path / "tls.crt"),
        "--key-path",
        str(tmp_path / "tls.key"),
        state_dir=None,
    )
    port = srv.ports["grpc"]
    assert await _tls_hello(port, first) == bytes([127, 0, 0, 1])
    # plaintext h2c is refused on a TLS listener
    async with grpc.aio.insecure_channel(srv.target) as ch:
        with pytest.raises(grpc.aio.AioRpcError):
            await rpc.ClusterStub(ch).Hello(pb.HelloRequest(cluster_id=CID), timeout=2)
    await asyncio.sleep(0.05)
    second = _self_signed(tmp_path, "second")
    assert await _tls_hello(port, second) == bytes([127, 0, 0, 1])  # new connections get the new certificate
    with pytest.raises(grpc.aio.AioRpcError):
        await _tls_hello(port, first)


async def test_kill9_loses_no_acknowledged_update(discovery_server: Start, tmp_path: Path) -> None:
    state = tmp_path / "durable"
    srv = discovery_server("--snapshot-interval", "1s", state_dir=state)
    acked: dict[str, bytes] = {}
    deleted: set[str] = set()
    in_flight: set[str] = set()  # the call the kill interrupted: applied or not, both are correct
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = rpc.ClusterStub(ch)
            i = 0
            while not stop.is_set() and i < 5000:
                aid = f"w{w}-{i % 40}"
                data = f"{w}:{i}".encode()
                try:
                    if i % 17 == 16:
                        await stub.AffiliateDelete(
                            pb.AffiliateDeleteRequest(cluster_id=CID, affiliate_id=aid), timeout=5
                        )
                        acked.pop(aid, None)
                        deleted.add(aid)
                    else:
                        await stub.AffiliateUpdate(upd(aid, data, (i.to_bytes(16, "big"),)), timeout=5)
                        acked[aid] = data
                        deleted.discard(aid)
                except grpc.aio.AioRpcError:
                    # the server died under us: this call was not acknowledged, but it may have
                    # reached the journal before the kill (the answer is what got lost)
                    in_flight.add(aid)
                    acked.pop(aid, None)
                    deleted.discard(aid)
                    return
                i += 1

    tasks = [asyncio.create_task(writer(w)) for w in range(4)]
    await asyncio.sleep(2.5)  # spans at least one compaction
    srv.kill()
    stop.set()
    await asyncio.gather(*tasks)
    assert len(acked) > 20
    again = discovery_server(state_dir=state)
    async with grpc.aio.insecure_channel(again.target) as ch:
        got = await listing(rpc.ClusterStub(ch))
    missing = {k for k, v in acked.items() if got.get(k, (None,))[0] != v}
    assert not missing, f"{len(missing)} acknowledged updates lost, e.g. {sorted(missing)[:5]}"
    back = deleted & set(got)
    assert not back, (
        f"acknowledged deletes came back: {sorted(back)} (in flight at the kill: {sorted(in_flight)})"
    )


async def test_graceful_restart_and_corrupt_snapshot(discovery_server: Start, tmp_path: Path) -> None:
    state = tmp_path / "graceful"
    srv = discovery_server(state_dir=state)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        await rpc.ClusterStub(ch).AffiliateUpdate(upd("persisted", b"blob", (b"\x02" * 16,)), timeout=5)
    assert srv.stop() == 0
    snap = state / "state.binpb"
    assert snap.exists() and snap.stat().st_mode & 0o077 == 0
    again = discovery_server(state_dir=state)
    async with grpc.aio.insecure_channel(again.target) as ch:
        assert await listing(rpc.ClusterStub(ch)) == {"persisted": (b"blob", [b"\x02" * 16])}
    assert again.stop() == 0
    for p in state.iterdir():
        p.write_bytes(b"\x0a\xff\xff garbage" * 3)
    third = discovery_server(state_dir=state)
    problems = [r for r in third.lines() if r.get("msg") == "state file problem (skipped)"]
    assert problems, "a corrupt state file must be reported"
    async with grpc.aio.insecure_channel(third.target) as ch:
        assert await listing(rpc.ClusterStub(ch)) == {}


async def test_expiry_notifies_watchers(discovery_server: Start) -> None:
    srv = discovery_server("--gc-interval", "200ms", state_dir=None)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)
        await stub.AffiliateUpdate(upd("long", b"x", ttl=600), timeout=5)
        await stub.AffiliateUpdate(upd("short", b"y", ttl=1), timeout=5)
        await stub.AffiliateUpdate(upd("long", None, (b"\x03" * 16,), ttl=1), timeout=5)
        watch = stub.Watch(pb.WatchRequest(cluster_id=CID), timeout=20)
        snap = await watch.read()
        assert {a.id for a in snap.affiliates} == {"long", "short"}
        events: dict[str, pb.Affiliate | None] = {}
        while len(events) < 2:
            msg = await watch.read()
            for a in msg.affiliates:
                events[a.id] = None if msg.deleted else a
        assert events["short"] is None  # expired affiliate: delete
        long = events["long"]
        assert (
            long is not None and long.data == b"x" and list(long.endpoints) == []
        )  # expired endpoint: update
        watch.cancel()
        assert set(await listing(stub)) == {"long"}


async def test_health_reflection_pages_and_metrics(discovery_server: Start) -> None:
    srv = discovery_server(state_dir=None)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        await rpc.ClusterStub(ch).Hello(pb.HelloRequest(cluster_id=CID, client_version="v1.9.2"), timeout=5)
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        stream = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for resp in stream:
            names = {s.name for s in resp.list_services_response.service}
            assert "sidero.discovery.server.Cluster" in names
            break
    base = f"http://127.0.0.1:{srv.ports['landing']}"
    assert b"Discovery service" in (await http_get(base + "/"))[1]
    assert json.loads((await http_get(base + "/stats"))[1])["affiliates"] == 0
    assert await http_get(base + "/healthz") == (200, b"ok\n")
    assert (await http_get(base + "/inspect?clusterID=" + CID))[0] == 404
    metrics = (await http_get(f"http://127.0.0.1:{srv.ports['metrics']}/metrics"))[1].decode()
    for name in (
        'discovery_server_hello_requests_total{client_version="v1.9"} 1.0',
        "discovery_state_clusters",
        "discovery_state_subscriptions",
        "discovery_storage_operations_total",
        "grpc_server_handling_seconds_bucket",
    ):
        assert name in metrics, name
    rpc_lines: list[dict] = []
    for _ in range(50):  # per-RPC lines are written in batches (spanutil.logs.FLUSH_INTERVAL)
        rpc_lines = [r for r in srv.lines() if r.get("msg") == "rpc"]
        if rpc_lines:
            break
        await asyncio.sleep(0.1)
    assert rpc_lines and rpc_lines[0]["method"] == "Hello" and rpc_lines[0]["code"] == "OK"
    assert rpc_lines[0]["cluster_id"] == CID and "duration_ms" in rpc_lines[0]
    assert rpc_lines[0]["peer"] == "127.0.0.1"


async def test_slow_watcher_is_aborted_with_lost_update(discovery_server: Start) -> None:
    srv = discovery_server(state_dir=None)
    # a fixed 64 KiB HTTP/2 window (no BDP probing) so that a reader that stops reading stalls the server
    small_window = [("grpc.http2.bdp_probe", 0)]
    async with (
        grpc.aio.insecure_channel(srv.target, options=small_window) as ch,
        grpc.aio.insecure_channel(srv.target) as writer_ch,
    ):
        stub, writer = rpc.ClusterStub(ch), rpc.ClusterStub(writer_ch)
        watch = stub.Watch(pb.WatchRequest(cluster_id=CID), timeout=60)
        await watch.read()  # the snapshot; then stop reading
        for i in range(400):
            await writer.AffiliateUpdate(upd(f"n{i % 50}", os.urandom(2000)), timeout=5)
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            async with asyncio.timeout(30):
                while True:
                    msg = await watch.read()
                    assert msg is not grpc.aio.EOF, "stream ended without an error"
                    received += 1
        assert ei.value.code() == grpc.StatusCode.ABORTED
        assert "lost update" in (ei.value.details() or "")
        assert received < 400
        # a fresh watch starts over with a full snapshot
        again = stub.Watch(pb.WatchRequest(cluster_id=CID), timeout=10)
        ids: set[str] = set()
        while len(ids) < 50:  # ~100 KB: split into chunks of SNAPSHOT_CHUNK_BYTES
            ids.update(a.id for a in (await again.read()).affiliates)
        assert len(ids) == 50
        again.cancel()


def test_grpc_options_accept_talos_keepalive_pings() -> None:
    from discovery.server.main import GRPC_OPTIONS

    opts = dict(GRPC_OPTIONS)
    # Talos pings every max(10 s, TTL/10) = 3 min; grpc-core's default would GOAWAY it (too_many_pings)
    assert opts["grpc.http2.min_ping_interval_without_data_ms"] <= 10_000
    assert opts["grpc.http2.max_ping_strikes"] == 0
    assert opts["grpc.keepalive_permit_without_calls"] == 1


def test_grpc_options_ping_clients_and_bound_dead_connections() -> None:
    from discovery.server.main import GRPC_OPTIONS, grpc_options, parse_args

    opts = dict(GRPC_OPTIONS)
    # our own pings detect half-open connections within keepalive time + timeout (< 1 min)
    assert opts["grpc.keepalive_time_ms"] + opts["grpc.keepalive_timeout_ms"] <= 60_000
    # grpc-core times pings out after ping_timeout_ms, not keepalive_timeout_ms: keep them equal
    assert opts["grpc.http2.ping_timeout_ms"] == opts["grpc.keepalive_timeout_ms"]
    assert opts["grpc.http2.max_pings_without_data"] == 0  # idle watches are pinged forever
    ns = parse_args(["--keepalive-time", "45s", "--keepalive-timeout", "10s"])
    custom = dict(grpc_options(ns.keepalive_time, ns.keepalive_timeout))
    assert custom["grpc.keepalive_time_ms"] == 45_000
    assert custom["grpc.keepalive_timeout_ms"] == custom["grpc.http2.ping_timeout_ms"] == 10_000
    assert custom["grpc.http2.min_ping_interval_without_data_ms"] <= 10_000  # Talos-compatible still
