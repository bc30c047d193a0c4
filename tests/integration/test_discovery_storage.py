"""Storage failures of a real discovery-service over real gRPC: a full disk (a small tmpfs, root only)
and a damaged snapshot at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery.server.main import SERVICE
from discovery.testing import ServerProcess
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc

Start = Callable[..., ServerProcess]
CID = "storage-cluster"
NOSPACE = "registry storage unavailable: No space left on device"


def upd(aid: str, data: bytes = b"d", cid: str = CID) -> pb.AffiliateUpdateRequest:
    req = pb.AffiliateUpdateRequest(cluster_id=cid, affiliate_id=aid, affiliate_data=data)
    req.ttl.seconds = 1800
    return req


async def listing(stub: rpc.ClusterStub) -> dict[str, bytes]:
    resp = await stub.List(pb.ListRequest(cluster_id=CID), timeout=5)
    return {a.id: a.data for a in resp.affiliates}


async def http(srv: ServerProcess, port: str, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{srv.ports[port]}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, (await resp.read()).decode()


async def health(ch: grpc.aio.Channel, service: str) -> int:
    resp = await health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return resp.status


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def journal_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir() if ".journal." in p.name)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (a disk that can really fill up); unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the disk-full test")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path) -> Path:
    """Fill the file system up to the last byte; returns the filler (delete it to free the space)."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as ei:
        (mnt / "probe").write_bytes(b"x" * 8192)
    assert ei.value.errno == errno.ENOSPC
    (mnt / "probe").unlink(missing_ok=True)
    return filler


async def test_disk_full_refuses_writes_degrades_and_recovers(
    discovery_server: Start, small_tmpfs: Path
) -> None:
    state = small_tmpfs / "state"
    srv = discovery_server(state_dir=state)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)
        await stub.AffiliateUpdate(upd("before"), timeout=5)
        watch = stub.Watch(pb.WatchRequest(cluster_id=CID), timeout=60)
        assert [a.id for a in (await watch.read()).affiliates] == ["before"]
        acked = {"before": b"d"}
        filler = fill(small_tmpfs)

        # The current segment's last page may still take a record or two; then the disk is full.
        refused: list[str] = []
        for i in range(50):
            aid, data = f"fill-{i}", os.urandom(1500)
            try:
                await stub.AffiliateUpdate(upd(aid, data), timeout=5)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == NOSPACE, e
                refused.append(aid)
                break
            acked[aid] = data
        assert refused, "the disk never filled up"
        files = journal_files(state)
        for i in range(5):  # every further write is refused, and leaves no new segment behind
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.AffiliateUpdate(upd(f"refused-{i}"), timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and ei.value.details() == NOSPACE
            refused.append(f"refused-{i}")
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.AffiliateDelete(
                pb.AffiliateDeleteRequest(cluster_id=CID, affiliate_id="before"), timeout=5
            )
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert journal_files(state) == files
        assert await listing(stub) == acked  # nothing refused is listed; the refused delete did not happen

        # degraded: gRPC health, /healthz, the gauge, one log line
        assert await health(ch, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await health(ch, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        status, text = await http(srv, "landing", "/healthz")
        assert status == 503 and "No space left on device" in text
        assert metric((await http(srv, "metrics", "/metrics"))[1], "discovery_storage_degraded") == 1
        degraded = [r for r in srv.lines() if str(r.get("msg", "")).startswith("storage degraded")]
        assert len(degraded) == 1 and degraded[0]["level"] == "error", degraded

        # space comes back: the periodic probe recovers without any client write
        filler.unlink()
        for _ in range(100):
            if await health(ch, SERVICE) == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        assert await health(ch, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert await health(ch, "") == health_pb2.HealthCheckResponse.SERVING
        assert await http(srv, "landing", "/healthz") == (200, "ok\n")
        assert metric((await http(srv, "metrics", "/metrics"))[1], "discovery_storage_degraded") == 0
        assert [r for r in srv.lines() if str(r.get("msg", "")).startswith("storage recovered")]

        await stub.AffiliateUpdate(upd("after", b"a"), timeout=5)
        acked["after"] = b"a"
        seen: list[str] = []
        while "after" not in seen:  # the watcher got what was acknowledged, never what was refused
            seen += [a.id for a in (await watch.read()).affiliates]
        assert set(seen) == set(acked) - {"before"}
        watch.cancel()
    srv.kill()
    again = discovery_server(state_dir=state)
    async with grpc.aio.insecure_channel(again.target) as ch:
        assert await listing(rpc.ClusterStub(ch)) == acked


async def test_compaction_on_a_full_disk_keeps_state_consistent(
    discovery_server: Start, small_tmpfs: Path
) -> None:
    state = small_tmpfs / "state"
    srv = discovery_server("--snapshot-interval", "200ms", state_dir=state)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = rpc.ClusterStub(ch)
        acked = {}
        for i in range(20):
            acked[f"n{i}"] = f"data-{i}".encode()
            await stub.AffiliateUpdate(upd(f"n{i}", acked[f"n{i}"]), timeout=5)
        await asyncio.sleep(0.5)  # a compaction or two succeed
        filler = fill(small_tmpfs)
        files = sorted(os.listdir(state))
        await asyncio.sleep(1.5)  # compactions fail, one after the other
        assert [r for r in srv.lines() if str(r.get("msg", "")).startswith("snapshot failed")]
        assert sorted(os.listdir(state)) == files  # no segment or temp file left behind per attempt
        assert await listing(stub) == acked
    srv.kill()
    filler.unlink()
    again = discovery_server(state_dir=state)
    problems = [r for r in again.lines() if r.get("level") in ("warning", "error")]
    assert not problems, problems
    async with grpc.aio.insecure_channel(again.target) as ch:
        assert await listing(rpc.ClusterStub(ch)) == acked


async def test_damaged_snapshot_is_reported_set_aside_and_not_served(
    discovery_server: Start, tmp_path: Path
) -> None:
    state = tmp_path / "damaged"
    srv = discovery_server(state_dir=state)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        for aid in ("a", "b", "c"):
            await rpc.ClusterStub(ch).AffiliateUpdate(upd(aid, b"in-the-snapshot-" + aid.encode()), timeout=5)
    assert srv.stop() == 0  # graceful: everything in the snapshot, with its checkpoint
    srv = discovery_server(state_dir=state)
    async with grpc.aio.insecure_channel(srv.target) as ch:
        await rpc.ClusterStub(ch).AffiliateUpdate(upd("b", b"in-the-journal"), timeout=5)
    srv.kill()  # b's update is only in the journal
    snap = state / "state.binpb"
    good = snap.read_bytes()
    pos = good.index(b"in-the-snapshot-a")
    bad = good[:pos] + b"X" + good[pos + 1 :]  # one flipped byte: still decodes, data silently wrong
    snap.write_bytes(bad)

    third = discovery_server(state_dir=state)
    async with grpc.aio.insecure_channel(third.target) as ch:
        assert await listing(rpc.ClusterStub(ch)) == {"b": b"in-the-journal"}  # no corrupted data served
    (err,) = [r for r in third.lines() if str(r.get("msg", "")).startswith("snapshot damaged")]
    assert err["level"] == "error" and err["path"] == str(snap)
    assert (err["length"], err["expected_length"]) == (len(bad), len(good))
    assert err["crc32"] != err["expected_crc32"]
    assert err["affiliates_recovered"] == 1 and err["affiliates_lost_readable"] == 2
    assert "held 1 clusters / 3 affiliates" in err["problem"]
    aside = state / err["kept_as"]
    assert aside.read_bytes() == bad
    metrics = (await http(third, "metrics", "/metrics"))[1]
    assert metric(metrics, 'discovery_storage_load_snapshot{result="damaged"}') == 1
    assert metric(metrics, 'discovery_storage_load_problems_total{file="snapshot"}') == 1
    # a verified snapshot of what was recovered was written at start-up
    third.kill()
    fourth = discovery_server(state_dir=state)
    assert not [r for r in fourth.lines() if r.get("level") in ("warning", "error")]
    assert next(r for r in fourth.lines() if r.get("msg") == "state restored")["snapshot"] == "verified"
    assert aside.read_bytes() == bad
