"""Write failures (a full disk) seen through the service and the daemon: UNAVAILABLE, nothing applied,
degraded health until the journal can be written again; and the start-up report of a damaged snapshot.

The store's os.write is replaced by one that raises ENOSPC (no root needed); the same over a real
full tmpfs and real gRPC is in tests/integration/test_discovery_storage.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from discovery.server import storage
from discovery.server.main import SERVICE, Daemon, parse_args
from discovery.server.service import ClusterService, ServiceConfig
from discovery.server.state import Registry
from discovery.server.storage import Store
from spanapi.discovery.server import cluster_pb2 as pb

CID = "cluster"


class Ctx:
    """The parts of grpc.aio.ServicerContext the service uses; abort() records and raises."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def time_remaining(self) -> float:
        return 5.0

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


async def call(fn, req) -> Ctx:
    ctx = Ctx()
    try:
        await fn(req, ctx)
    except grpc.aio.AbortError:
        pass
    return ctx


def upd(aid: str, data: bytes = b"d") -> pb.AffiliateUpdateRequest:
    req = pb.AffiliateUpdateRequest(cluster_id=CID, affiliate_id=aid, affiliate_data=data)
    req.ttl.seconds = 600
    return req


class Disk:
    """The store's os.write: ENOSPC while ``full``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.real = os.write
        monkeypatch.setattr(storage.os, "write", self)

    def __call__(self, fd: int, data: bytes) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


async def test_service_answers_unavailable_and_applies_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry()
    store = Store(tmp_path / "state.binpb")
    store.load(reg)
    svc = ClusterService(reg, store, ServiceConfig(rate_limit=0, log_rpcs=False))
    assert (await call(svc.affiliate_update, upd("kept"))).code is None
    sub = reg.subscribe(CID)
    disk = Disk(monkeypatch)
    disk.full = True
    ctx = await call(svc.affiliate_update, upd("refused"))
    assert ctx.code == grpc.StatusCode.UNAVAILABLE
    assert ctx.details == "registry storage unavailable: No space left on device"
    ctx = await call(svc.affiliate_delete, pb.AffiliateDeleteRequest(cluster_id=CID, affiliate_id="kept"))
    assert ctx.code == grpc.StatusCode.UNAVAILABLE
    assert [v.id for v in reg.list(CID)] == ["kept"] and sub.drain() == []
    disk.full = False
    assert (await call(svc.affiliate_update, upd("later"))).code is None
    assert [c.id for c in sub.drain()] == ["later"]
    store.close()


def daemon(tmp_path: Path) -> Daemon:
    ns = parse_args(["--snapshot-path", str(tmp_path / "state.binpb"), "--rate-limit", "0", "--no-rpc-log"])
    return Daemon(ns)


def sample(d: Daemon, name: str, **labels: str) -> float | None:
    return d.metrics.registry.get_sample_value(name, labels)


async def test_daemon_degrades_once_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    d = daemon(tmp_path)
    d._loop = asyncio.get_running_loop()
    d.load()
    d._serving = True  # as run() does once the server listens
    await d.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert sample(d, "discovery_storage_degraded") == 0
    assert (await d._healthz(None)).status == 200  # type: ignore[arg-type]
    disk = Disk(monkeypatch)
    disk.full = True
    caplog.set_level(logging.INFO, "discovery.server")
    for i in range(5):
        ctx = await call(d.service.affiliate_update, upd(f"n{i}"))
        assert ctx.code == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(0)  # the health update task
    assert sample(d, "discovery_storage_degraded") == 1
    resp = await d._healthz(None)  # type: ignore[arg-type]
    assert resp.status == 503 and "No space left on device" in resp.text
    assert d.health._server_status[SERVICE] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert d.health._server_status[""] == health_pb2.HealthCheckResponse.NOT_SERVING
    degraded = [r for r in caplog.records if r.getMessage().startswith("storage degraded")]
    assert len(degraded) == 1 and degraded[0].levelno == logging.ERROR  # at the transition only
    await d.sync()  # the periodic probe: still full
    assert sample(d, "discovery_storage_degraded") == 1
    disk.full = False
    await d.sync()  # the probe succeeds: recovered without any client write
    await asyncio.sleep(0)
    assert sample(d, "discovery_storage_degraded") == 0
    assert (await d._healthz(None)).status == 200  # type: ignore[arg-type]
    assert d.health._server_status[SERVICE] == health_pb2.HealthCheckResponse.SERVING
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("storage ")] == [
        degraded[0].getMessage(),
        "storage recovered: the journal can be written again",
    ]
    assert d.registry.list(CID) == []
    assert d.store is not None
    d.store.close()


def test_daemon_reports_a_damaged_snapshot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = daemon(tmp_path)
    first.load()
    first.registry.update(CID, "a", b"a", [], 600, first.store)
    assert first.store is not None
    first.store.compact(first.registry)
    first.registry.update(CID, "b", b"b", [], 600, first.store)
    first.store.close()
    snap = tmp_path / "state.binpb"
    snap.write_bytes(snap.read_bytes()[:-1])
    caplog.set_level(logging.INFO, "discovery.server")
    d = daemon(tmp_path)
    report = d.load()
    assert report is not None and report.damage is not None
    assert [v.id for v in d.registry.list(CID)] == ["b"]
    (err,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert err.getMessage().startswith("snapshot damaged")
    fields = err._fields  # type: ignore[attr-defined]
    assert fields["path"] == str(snap) and fields["expected_length"] == fields["length"] + 1
    assert fields["kept_as"].startswith("state.binpb.corrupt-") and fields["affiliates_recovered"] == 1
    # the damage is logged once, at ERROR, not again among the warnings
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sample(d, "discovery_storage_load_snapshot", result="damaged") == 1
    assert sample(d, "discovery_storage_load_snapshot", result="verified") == 0
    assert sample(d, "discovery_storage_load_problems_total", file="snapshot") == 1
    assert d.store is not None
    d.store.close()
