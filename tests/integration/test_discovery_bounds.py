"""A real discovery-service over loopback gRPC: what hostile requests can make it write.

/metrics stays small after thousands of distinct client versions, the log grows by kilobytes
(not the megabytes sent) for requests with the longest IDs a request may carry, status details of
a rejected request are short and name the field and the limit, and a request longer than
``--max-request-size`` is refused before it is parsed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import grpc

from discovery.server.service import HELLO_VERSIONS_MAX
from discovery.testing import ServerProcess
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc
from spanutil.logs import clip

Start = Callable[..., ServerProcess]
MIB = 1 << 20
# The longest IDs a request can carry under the default --max-request-size (64 KiB), two per request.
HUGE = 30_000
BIG_MESSAGES = [("grpc.max_send_message_length", 8 * MIB), ("grpc.max_receive_message_length", 8 * MIB)]
METRICS_BOUND = 32 << 10
LOG_GROWTH_BOUND = 100 << 10


async def test_metrics_stay_bounded_after_thousands_of_versions(discovery_server: Start) -> None:
    srv = discovery_server(state_dir=None, rate_limit=0)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)
        await stub.Hello(pb.HelloRequest(cluster_id="c", client_version="v1.7.0"), timeout=5)
        await stub.Hello(pb.HelloRequest(cluster_id="c", client_version="v1.8.0-alpha.1"), timeout=5)
        for start in range(0, 2000, 200):
            await asyncio.gather(
                *(
                    stub.Hello(
                        pb.HelloRequest(
                            cluster_id="c",
                            # half valid-looking and all distinct, half the long digit runs
                            client_version=f"v{i % 1000}.{i // 1000}.0" if i % 2 else f"v{i}{'9' * 200}.{i}",
                        ),
                        timeout=10,
                    )
                    for i in range(start, start + 200)
                )
            )
    body = await asyncio.to_thread(srv.http_get, "metrics", "/metrics")
    text = body.decode()
    labels = re.findall(r'^discovery_server_hello_requests_total\{client_version="([^"]*)"\}', text, re.M)
    print(f"/metrics after 2002 Hellos with 2002 distinct versions: {len(body)} bytes, {len(labels)} labels")
    assert len(labels) <= HELLO_VERSIONS_MAX + 2
    assert {"v1.7", "v1.8-pre", "other", "unknown"} <= set(labels)
    assert all(len(label) <= 12 for label in labels)
    assert len(body) < METRICS_BOUND
    counts = dict(
        re.findall(r'^discovery_server_hello_requests_total\{client_version="([^"]*)"\} (\S+)', text, re.M)
    )
    assert sum(float(v) for v in counts.values()) == 2002
    assert float(counts["unknown"]) == 1000


async def test_log_and_details_stay_bounded_for_huge_ids(discovery_server: Start) -> None:
    # the default request rate limit (15/s, burst 60): the 60 calls below all get through it
    srv = discovery_server(state_dir=None, rate_limit=15)
    huge = "x" * HUGE
    async with grpc.aio.insecure_channel(srv.target, options=BIG_MESSAGES) as ch:
        stub = rpc.ClusterStub(ch)
        await stub.Hello(pb.HelloRequest(cluster_id="c", client_version="v1.9.0"), timeout=5)
        await asyncio.sleep(0.3)  # per-RPC lines are written in batches (spanutil.logs.FLUSH_INTERVAL)
        before = srv.log_path.stat().st_size

        async def update(i: int) -> grpc.aio.AioRpcError | None:
            req = pb.AffiliateUpdateRequest(cluster_id=huge if i % 2 else "c", affiliate_id=huge)
            req.ttl.seconds = 60
            try:
                await stub.AffiliateUpdate(req, timeout=20)
            except grpc.aio.AioRpcError as e:
                return e
            return None

        t0 = asyncio.get_running_loop().time()
        errors = [e for e in await asyncio.gather(*(update(i) for i in range(60))) if e is not None]
        took = asyncio.get_running_loop().time() - t0
        await asyncio.sleep(0.3)
        growth = srv.log_path.stat().st_size - before
        # an accepted call with a long client_version is logged (clipped) after all that
        await stub.Hello(pb.HelloRequest(cluster_id="c", client_version="v1.9.0" + "z" * HUGE), timeout=5)
    print(
        f"log growth after 60 calls with {HUGE}-byte ids in {took:.2f} s: {growth} bytes (bound {LOG_GROWTH_BOUND})"
    )
    assert growth < LOG_GROWTH_BOUND

    assert len(errors) == 60 and {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert {e.details() for e in errors} == {
        f"cluster_id: {HUGE} bytes exceeds the limit of 256",
        f"affiliate_id: {HUGE} bytes exceeds the limit of 256",
    }
    for e in errors:
        trailer = sum(len(k) + len(v) for k, v in e.trailing_metadata() or ())
        assert trailer + len(e.details().encode()) < 256

    assert srv.stop() == 0  # graceful: the summary of suppressed lines is written at shutdown
    records = srv.lines()
    rejected = [r for r in records if r.get("msg") == "rpc" and r.get("code") == "INVALID_ARGUMENT"]
    summary = [r for r in records if r.get("msg") == "rejected-request log lines suppressed"]
    # 50 lines at once, then 10 per second (ServiceConfig.reject_log_*): how many more got a line
    # depends on how long the 60 calls took; the summary accounts for the rest
    print(f"{len(rejected)} rejected calls logged, summaries: {summary}")
    assert 50 <= len(rejected) <= 60
    assert len(rejected) + sum(r["suppressed"] for r in summary) == 60
    assert all(len(r["affiliate_id"]) < 100 and r["error"].endswith("limit of 256") for r in rejected)
    assert any(r["cluster_id"] == clip(huge) for r in rejected)
    hello = [r for r in records if r.get("msg") == "rpc" and r.get("method") == "Hello"]
    assert hello[-1]["code"] == "OK" and hello[-1]["client_version"] == clip("v1.9.0" + "z" * HUGE)


async def test_requests_longer_than_the_limit_are_refused_unparsed(discovery_server: Start) -> None:
    srv = discovery_server(state_dir=None, rate_limit=0)
    async with grpc.aio.insecure_channel(srv.target, options=BIG_MESSAGES) as ch:
        stub = rpc.ClusterStub(ch)
        req = pb.AffiliateUpdateRequest(cluster_id="c", affiliate_id="x" * MIB)
        try:
            await stub.AffiliateUpdate(req, timeout=5)
            raise AssertionError("a 1 MiB request was accepted")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "65536" in (e.details() or ""), e.details()  # the limit is named
        # the largest valid request still fits
        ok = pb.AffiliateUpdateRequest(
            cluster_id="c" * 256,
            affiliate_id="a" * 256,
            affiliate_data=b"d" * 2048,
            affiliate_endpoints=[b"e" * 32] * 64,
        )
        ok.ttl.seconds = 60
        await stub.AffiliateUpdate(ok, timeout=5)
        listed = await stub.List(pb.ListRequest(cluster_id="c" * 256), timeout=5)
        assert [a.id for a in listed.affiliates] == ["a" * 256]
