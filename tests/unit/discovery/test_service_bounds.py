"""What one client can make the discovery service write: /metrics labels, log lines, status details.

Drives ``ClusterService`` handlers directly with a fake servicer context (no sockets); the
same bounds over real gRPC are in tests/integration/test_discovery_bounds.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import grpc
import pytest
from prometheus_client import generate_latest

from discovery.server.service import (
    DETAILS_CHARS,
    HELLO_VERSIONS_MAX,
    ClusterService,
    Metrics,
    ServiceConfig,
    _parser,
    normalize_version,
)
from discovery.server.state import Code, Registry, RegistryError
from spanapi.discovery.server import cluster_pb2 as pb
from spanutil.logs import CLIP_CHARS, clip

MIB = 1 << 20
HUGE = "x" * MIB


class Ctx:
    """The parts of grpc.aio.ServicerContext the service uses; abort() records and raises."""

    def __init__(self, remaining: float | None = 5.0) -> None:
        self.remaining = remaining
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def time_remaining(self) -> float | None:
        return self.remaining

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


def service(registry: Registry | None = None, **config: Any) -> tuple[ClusterService, io.StringIO]:
    """A service without request rate limit whose log lines go to the returned buffer; the
    bucket of rejected-request lines does not refill (a frozen clock) unless a test says so."""
    svc = ClusterService(registry or Registry(), None, ServiceConfig(**{"rate_limit": 0, **config}))
    out = io.StringIO()
    svc._rpc_log._stream = out
    svc._rejections.bucket._clock = lambda: 0.0
    return svc, out


def suppressed(svc: ClusterService) -> float | None:
    return svc.metrics.registry.get_sample_value("discovery_server_rejected_request_logs_suppressed_total")


async def call(fn: Any, req: Any, ctx: Ctx | None = None) -> Ctx:
    ctx = ctx or Ctx()
    try:
        await fn(req, ctx)
    except grpc.aio.AbortError:
        pass
    return ctx


def lines(svc: ClusterService, out: io.StringIO) -> list[dict[str, Any]]:
    svc.flush_logs()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def upd(cid: str, aid: str) -> pb.AffiliateUpdateRequest:
    req = pb.AffiliateUpdateRequest(cluster_id=cid, affiliate_id=aid)
    req.ttl.seconds = 60
    return req


# -- clip ------------------------------------------------------------------------------------------


def test_clip_keeps_short_text_and_marks_the_rest_in_bytes() -> None:
    assert clip("") == ""
    assert clip("a" * CLIP_CHARS) == "a" * CLIP_CHARS
    assert clip(HUGE) == "x" * CLIP_CHARS + f"\u2026(+{MIB - CLIP_CHARS} bytes)"
    # the marker counts UTF-8 bytes of what was cut, not characters
    assert clip("é" * 100, 10) == "é" * 10 + "\u2026(+180 bytes)"
    assert clip("ab\ud800cd", 2) == "ab\u2026(+5 bytes)"  # a lone surrogate does not break it


# -- Hello versions → metric labels -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "label"),
    [
        ("v1.7.0", "v1.7"),
        ("v1.8.0-alpha.1", "v1.8-pre"),
        ("v1.9.2", "v1.9"),
        ("1.9.2", "v1.9"),
        (" v1.10.3 ", "v1.10"),
        ("v1.7", "v1.7"),
        ("v1.7.6-3-gabcdef-dirty", "v1.7-pre"),
        ("v01.007.0", "v1.7"),
        ("v999.999.0-rc.1", "v999.999-pre"),
        ("v1234.5.0", "unknown"),
        ("v1.1234.0", "unknown"),
        ("v1" + "9" * 200 + ".1", "unknown"),
        ("v1.7.0-" + "a" * 200, "unknown"),  # longer than VERSION_TEXT_MAX
        ("v\u0661.\u0662", "unknown"),  # Arabic-Indic digits are not version digits
        ("kubespan-mesh/0.1", "unknown"),
        ("", "unknown"),
        (HUGE, "unknown"),
    ],
)
def test_normalize_version(version: str, label: str) -> None:
    assert normalize_version(version) == label
    assert len(normalize_version(version)) <= 12


def hello_labels(m: Metrics) -> dict[str, float]:
    return {
        s.labels["client_version"]: s.value
        for fam in m.registry.collect()
        if fam.name == "discovery_server_hello_requests"
        for s in fam.samples
        if s.name.endswith("_total")
    }


def test_hello_labels_are_bounded() -> None:
    m = Metrics()
    m.hello_version("v1.7.0")
    m.hello_version("v1.8.0-alpha.1")
    for i in range(2000):
        m.hello_version(f"v{10 + i // 100}.{i % 100}.0")
        m.hello_version(f"v{i}{'9' * 200}.{i}-attack{i}")  # the shape: unknown
    m.hello_version("v1.7.3")  # a version that has its label keeps counting there
    m.hello_version("v2.0.0")  # a version that came too late is "other"
    labels = hello_labels(m)
    assert len(labels) == HELLO_VERSIONS_MAX + 2
    assert labels["v1.7"] == 2 and labels["v1.8-pre"] == 1
    assert labels["unknown"] == 2000
    assert labels["other"] == 2000 - (HELLO_VERSIONS_MAX - 2) + 1
    assert sum(labels.values()) == 4004
    body = generate_latest(m.registry)
    print(f"/metrics after 4004 Hellos with 2002 distinct versions: {len(body)} bytes")
    assert len(body) < 24 << 10


def test_hello_versions_max_is_configurable() -> None:
    m = Metrics(hello_versions_max=2)
    for v in ("v1.7.0", "v1.8.0", "v1.9.0", "v1.10.0", "junk"):
        m.hello_version(v)
    assert hello_labels(m) == {"v1.7": 1, "v1.8": 1, "other": 2, "unknown": 1}


async def test_hello_counts_the_bounded_label_and_logs_a_clipped_version() -> None:
    svc, out = service()
    await call(svc.hello, pb.HelloRequest(cluster_id="c", client_version="v1.9.0-beta.0" + "z" * MIB))
    await call(svc.hello, pb.HelloRequest(cluster_id="c", client_version="v1.9.2"))
    assert hello_labels(svc.metrics) == {"unknown": 1, "v1.9": 1}
    rec = lines(svc, out)
    assert rec[0]["client_version"] == clip("v1.9.0-beta.0" + "z" * MIB)
    assert rec[1]["client_version"] == "v1.9.2"
    assert len(out.getvalue()) < 1024


# -- log lines and status details of rejected requests -----------------------------------------------


async def test_over_limit_ids_are_clipped_in_the_log_and_named_in_the_details() -> None:
    svc, out = service()
    ctx = await call(svc.affiliate_update, upd(HUGE, HUGE))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details == f"cluster_id: {MIB} bytes exceeds the limit of 256"
    ctx = await call(svc.affiliate_update, upd("c", HUGE))
    assert ctx.details == f"affiliate_id: {MIB} bytes exceeds the limit of 256"
    for fn, req in (
        (svc.hello, pb.HelloRequest(cluster_id=HUGE)),
        (svc.list, pb.ListRequest(cluster_id=HUGE)),
        (svc.affiliate_delete, pb.AffiliateDeleteRequest(cluster_id=HUGE, affiliate_id=HUGE)),
    ):
        ctx = await call(fn, req)
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
        assert ctx.details == f"cluster_id: {MIB} bytes exceeds the limit of 256"
    rec = lines(svc, out)
    assert [r["code"] for r in rec] == ["INVALID_ARGUMENT"] * 5
    assert rec[0]["cluster_id"] == rec[0]["affiliate_id"] == "x" * 64 + f"\u2026(+{MIB - 64} bytes)"
    assert rec[1]["cluster_id"] == "c"
    assert rec[0]["error"] == f"cluster_id: {MIB} bytes exceeds the limit of 256"
    assert max(len(line) for line in out.getvalue().splitlines()) < 600


async def test_rejected_lines_are_rate_limited_and_summarised() -> None:
    svc, out = service(reject_log_rate=10, reject_log_burst=50, reject_log_summary_interval=3600)
    for _ in range(60):
        await call(svc.affiliate_update, upd(HUGE, "a"))
    for _ in range(5):  # accepted calls are not limited by it
        await call(svc.hello, pb.HelloRequest(cluster_id="c", client_version="v1.9.0"))
    assert suppressed(svc) == 10
    assert (
        "discovery_server_rejected_request_logs_suppressed_total 10.0"
        in generate_latest(svc.metrics.registry).decode()
    )
    svc._rpc_log.flush()
    size = len(out.getvalue())
    rec = lines(svc, out)  # flush_logs() adds the summary
    print(f"log after 60 rejected calls with 1 MiB ids: {size} bytes, then a summary")
    assert size < 32 << 10
    assert sum(1 for r in rec if r.get("code") == "INVALID_ARGUMENT") == 50
    assert sum(1 for r in rec if r.get("code") == "OK") == 5
    summary = [r for r in rec if r["msg"] == "rejected-request log lines suppressed"]
    assert len(summary) == 1 and summary[0]["level"] == "warning"
    assert summary[0]["suppressed"] == 10 and summary[0]["by_code"] == {"INVALID_ARGUMENT": 10}
    svc.flush_logs()  # nothing new: no second summary
    assert sum(1 for r in lines(svc, out) if r["msg"] == "rejected-request log lines suppressed") == 1


async def test_the_summary_comes_after_the_interval_without_more_traffic() -> None:
    svc, out = service(reject_log_rate=1, reject_log_burst=1, reject_log_summary_interval=0.05)
    for _ in range(4):
        await call(svc.list, pb.ListRequest(cluster_id=""))
    await asyncio.sleep(0.2)
    svc._rpc_log.flush()
    rec = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["msg"] for r in rec] == ["rpc", "rejected-request log lines suppressed"]
    assert rec[1]["suppressed"] == 3 and rec[0]["error"] == "cluster_id: is empty (must be 1..256 bytes)"


async def test_rate_limited_calls_count_as_rejected() -> None:
    svc, out = service(rate_limit=1, rate_burst=1, reject_log_burst=2, reject_log_summary_interval=3600)
    for _ in range(5):
        ctx = await call(svc.hello, pb.HelloRequest(cluster_id=HUGE), Ctx(remaining=0.0))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    rec = lines(svc, out)
    assert [r.get("code") for r in rec[:2]] == ["INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"]
    assert rec[1]["error"].startswith("rate limit exceeded") and rec[1]["cluster_id"] == clip(HUGE)
    assert rec[2]["by_code"] == {"RESOURCE_EXHAUSTED": 3}


async def test_no_rpc_log_writes_nothing_and_suppresses_nothing() -> None:
    svc, out = service(log_rpcs=False, reject_log_burst=1)
    for _ in range(5):
        await call(svc.list, pb.ListRequest(cluster_id=HUGE))
    assert lines(svc, out) == []
    assert suppressed(svc) == 0


async def test_malformed_request_details_are_constant() -> None:
    svc, out = service()
    req = _parser(pb.HelloRequest)(b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 100)
    ctx = await call(svc.hello, req)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details == "malformed HelloRequest: cannot parse protobuf"
    assert lines(svc, out)[0]["cluster_id"] == ""


async def test_internal_errors_log_a_bounded_traceback_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Buggy(Registry):
        def validate_ids(self, *_: Any) -> None:
            raise ValueError(f"cannot handle {HUGE}")

    svc, out = service(Buggy(), reject_log_burst=3, reject_log_summary_interval=3600)
    with caplog.at_level(logging.ERROR, logger="discovery.server"):
        for _ in range(10):
            ctx = await call(svc.hello, pb.HelloRequest(cluster_id="c"))
    assert ctx.code == grpc.StatusCode.INTERNAL and ctx.details == "internal error"
    failed = [r for r in caplog.records if r.getMessage() == "rpc failed"]
    assert len(failed) == 3
    err = failed[0]._fields["error"]  # type: ignore[attr-defined]
    assert "ValueError: cannot handle xxx" in err and "in validate_ids" in err and len(err) < 8192
    rec = lines(svc, out)
    assert [r.get("code") for r in rec] == ["INTERNAL"] * 3 + [None]
    assert rec[3]["by_code"] == {"INTERNAL": 7}


async def test_status_details_are_clipped() -> None:
    """Whatever message a rejection carries, the status details (grpc-message) stay bounded."""

    class Wordy(Registry):
        def validate_ids(self, *_: Any) -> None:
            raise RegistryError(Code.INVALID_ARGUMENT, "cluster_id", "y" * MIB)

    svc, _ = service(Wordy())
    ctx = await call(svc.hello, pb.HelloRequest(cluster_id="c"))
    assert ctx.details == clip("cluster_id: " + "y" * MIB, DETAILS_CHARS)
    assert len(ctx.details.encode()) < DETAILS_CHARS + 32


async def test_calls_without_a_deadline_wait_for_a_token_at_most_rate_max_wait() -> None:
    # 1 token/s, burst 1: the second call would wait ~1 s; with no deadline it used to wait as
    # long as it took (a client could queue calls without bound); now at most rate_max_wait.
    svc, _ = service(rate_limit=1, rate_burst=1, rate_max_wait=0.5)
    first = await call(svc.hello, pb.HelloRequest(cluster_id="c"), Ctx(remaining=None))
    assert first.code is None
    second = await call(svc.hello, pb.HelloRequest(cluster_id="c"), Ctx(remaining=None))
    assert second.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert second.details == "rate limit exceeded: the wait would exceed the call deadline or 0.5 s"
    svc2, _ = service(rate_limit=4, rate_burst=1, rate_max_wait=0.5)
    await call(svc2.hello, pb.HelloRequest(cluster_id="c"), Ctx(remaining=None))
    waited = await call(svc2.hello, pb.HelloRequest(cluster_id="c"), Ctx(remaining=None))
    assert waited.code is None  # a 0.25 s wait is within the cap
