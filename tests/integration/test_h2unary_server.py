"""spanutil.h2unary against a real discovery-service process: what it counts as acknowledged is stored,
and what the server refuses is not counted."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable

import grpc

from discovery.testing import ServerProcess
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc
from spanutil.h2unary import NO_STATUS, CountingBody, H2UnaryConnection, closed_loop

Start = Callable[..., ServerProcess]
UPDATE = "/sidero.discovery.server.Cluster/AffiliateUpdate"
CID = "h2unary"


def update_body(affiliate: str, size: int) -> CountingBody:
    data = os.urandom(size)
    req = pb.AffiliateUpdateRequest(
        cluster_id=CID, affiliate_id=affiliate, affiliate_data=data, affiliate_endpoints=[os.urandom(16)]
    )
    req.ttl.seconds = 600
    msg = req.SerializeToString()
    return CountingBody(msg, msg.index(data))


def stored_data(body: CountingBody) -> bytes:
    req = pb.AffiliateUpdateRequest()
    req.ParseFromString(body.message)
    return req.affiliate_data


def server_ok_count(srv: ServerProcess) -> float:
    metrics = srv.http_get("metrics", "/metrics").decode()
    m = re.search(
        r'grpc_server_handled_total\{[^}]*grpc_code="OK"[^}]*grpc_method="AffiliateUpdate"[^}]*\} (\S+)',
        metrics,
    )
    return float(m.group(1)) if m else 0.0


async def test_acknowledged_updates_are_stored_and_refused_ones_not_counted(discovery_server: Start) -> None:
    srv = discovery_server("--no-rpc-log")
    host, port = srv.target.rsplit(":", 1)
    conns = [await H2UnaryConnection.connect(host, int(port)) for _ in range(2)]
    good = [update_body(f"good-{i}", 500) for i in range(6)]
    bad = update_body("oversize", 3000)  # over the 2048-byte affiliate_data limit: INVALID_ARGUMENT
    result = await closed_loop(conns, UPDATE, [*good, bad], seconds=1.5)
    for c in conns:
        await c.close()

    sent_good = sum(b.calls for b in good)
    assert sent_good > 50 and bad.calls > 5
    assert result.ok == sent_good  # every well-formed update acknowledged, and only those
    assert result.statuses[grpc.StatusCode.INVALID_ARGUMENT.value[0]] == bad.calls
    assert result.failed == bad.calls
    assert server_ok_count(srv) == result.ok  # the server's own count of OK answers agrees

    async with grpc.aio.insecure_channel(srv.target) as ch:
        listing = await rpc.ClusterStub(ch).List(pb.ListRequest(cluster_id=CID))
    stored = {a.id: a.data for a in listing.affiliates}
    assert set(stored) == {f"good-{i}" for i in range(6)}  # the refused affiliate never stored
    for i, b in enumerate(good):
        assert stored[f"good-{i}"] == stored_data(b)  # the last acknowledged update, counter and all
        assert stored_data(b)[:8] == b.calls.to_bytes(8, "big")


async def test_calls_end_without_status_when_the_server_dies(discovery_server: Start) -> None:
    srv = discovery_server("--no-rpc-log")
    host, port = srv.target.rsplit(":", 1)
    conn = await H2UnaryConnection.connect(host, int(port))
    loop = asyncio.get_running_loop()
    killer = loop.call_later(0.5, srv.kill)
    result = await closed_loop([conn], UPDATE, [update_body(f"k-{i}", 100) for i in range(4)], seconds=30)
    killer.cancel()
    assert result.ok > 0
    assert result.statuses[NO_STATUS] >= 1  # in-flight calls fail, none is counted as acknowledged
    assert result.seconds < 10  # the callers stop with the connection instead of running on
    assert conn.closed is not None
