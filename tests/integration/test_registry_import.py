"""Moving from the embedded store to etcd (issue 15): ``discovery-service --store etcd --import-snapshot FILE
--import-only`` against a real etcd member. State written through an embedded server, stopped with SIGTERM
(final snapshot), imported, then served by an etcd replica: List and Watch show the same affiliates and
endpoints, byte for byte, with their remaining TTLs; what expired while the registry was stopped is not
imported; a second import writes nothing; a damaged or missing snapshot is refused with exit 2, naming
the file, before anything is written; affiliate data never reaches the log."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from discovery.etcd.client import EtcdClient
from discovery.server.etcdstore import escape_id
from discovery.testing import ServerProcess
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc
from spanutil.etcdlab import EtcdLab, etcd_binary

NO_ETCD = "etcd is not installed (Debian: etcd-server, which `make sysdeps` installs; or set $ETCD_BIN)"
pytestmark = pytest.mark.skipif(etcd_binary() is None, reason=NO_ETCD)
PREFIX = "/import-test/"


def _upd(cid: str, aid: str, data: bytes | None, eps: list[bytes], ttl: int) -> pb.AffiliateUpdateRequest:
    req = pb.AffiliateUpdateRequest(cluster_id=cid, affiliate_id=aid, affiliate_endpoints=eps)
    if data is not None:
        req.affiliate_data = data
    req.ttl.seconds = ttl
    return req


def _import(lab: EtcdLab, snapshot: Path | str, log: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "discovery.server.main", "--store", "etcd", "--etcd-prefix", PREFIX]
    for url in lab.endpoints:
        cmd += ["--etcd-endpoint", url]
    cmd += ["--import-snapshot", str(snapshot), "--import-only"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    with log.open("a") as f:
        f.write(res.stderr)
    return res


def _state(affs: list[pb.Affiliate] | object) -> dict[str, tuple[bytes, frozenset[bytes]]]:
    return {a.id: (a.data, frozenset(a.endpoints)) for a in affs}  # type: ignore[attr-defined]


async def _registry_keys(lab: EtcdLab) -> list[tuple[bytes, int, int]]:
    async with EtcdClient(lab.endpoints, namespace=PREFIX) as raw:
        kvs = [*(await raw.range("c/", prefix=True)).kvs, *(await raw.range("l/", prefix=True)).kvs]
    return sorted((kv.key, kv.mod_revision, kv.lease) for kv in kvs)


async def test_import_embedded_snapshot_into_etcd(tmp_path: Path) -> None:
    state = tmp_path / "state"
    secrets = {f"n{i}": os.urandom(48) for i in range(5)}
    eps = {f"n{i}": [os.urandom(32), os.urandom(16)] for i in range(5)}
    short_ep = os.urandom(16)
    want: dict[str, dict[str, tuple[bytes, frozenset[bytes]]]] = {}

    embedded = ServerProcess(state, log_path=tmp_path / "embedded.log").start()
    try:
        async with grpc.aio.insecure_channel(embedded.target) as ch:
            stub = rpc.ClusterStub(ch)
            for aid, data in secrets.items():
                await stub.AffiliateUpdate(_upd("alpha", aid, data, eps[aid], 600), timeout=10)
            await stub.AffiliateUpdate(_upd("alpha", "n0", None, [short_ep], 2), timeout=10)  # expires
            await stub.AffiliateUpdate(_upd("alpha", "gone", b"short-lived", [], 2), timeout=10)  # expires
            await stub.AffiliateUpdate(_upd("beta", "mid", None, [eps["n1"][1]], 40), timeout=10)
            for cid in ("alpha", "beta"):
                listed = await stub.List(pb.ListRequest(cluster_id=cid), timeout=10)
                want[cid] = _state(listed.affiliates)
    finally:
        assert embedded.stop() == 0  # SIGTERM: the final snapshot
    snapshot = state / "state.binpb"
    assert snapshot.exists()
    # What expires while the registry is stopped must not be imported.
    want["alpha"].pop("gone")
    want["alpha"]["n0"] = (secrets["n0"], frozenset(eps["n0"]))
    await asyncio.sleep(2.5)

    with EtcdLab(tmp_path / "etcd", 1) as lab:
        log = tmp_path / "import.log"
        t0 = time.monotonic()
        res = _import(lab, snapshot, log)
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr[-3000:]
        print(f"import: {res.stdout.strip()} ({took:.1f} s)")
        assert "imported 2 clusters, 6 affiliates, 11 endpoints (6 written, 0 already in etcd)" in res.stdout
        assert "skipped as expired: 1 affiliates, 1 endpoints" in res.stdout

        async with EtcdClient(lab.endpoints, namespace=PREFIX) as raw:
            # Remaining TTLs: the 40 s affiliate's key sits on a lease ending within (40 - elapsed,
            # 40 + one 60 s bucket]; the 600 s ones on a lease of at most 600 + 60 s.
            mid = await raw.get(f"c/beta/a/{escape_id('mid')}")
            n1 = await raw.get("c/alpha/a/n1")
            assert mid is not None and n1 is not None
            mid_ttl = (await raw.lease_time_to_live(mid.lease)).ttl
            n1_ttl = (await raw.lease_time_to_live(n1.lease)).ttl
            assert 40 - 15 < mid_ttl <= 40 + 60, mid_ttl
            assert 600 - 15 < n1_ttl <= 600 + 60, n1_ttl
            assert mid_ttl < 200

        replica = ServerProcess(
            None,
            "--store",
            "etcd",
            "--etcd-prefix",
            PREFIX,
            "--etcd-endpoint",
            lab.endpoints[0],
            log_path=tmp_path / "replica.log",
        ).start()
        try:
            async with grpc.aio.insecure_channel(replica.target) as ch:
                stub = rpc.ClusterStub(ch)
                watches = {}
                for cid in ("alpha", "beta"):
                    listed = await stub.List(pb.ListRequest(cluster_id=cid), timeout=10)
                    assert _state(listed.affiliates) == want[cid], cid  # same ciphertext bytes
                    watches[cid] = stub.Watch(pb.WatchRequest(cluster_id=cid))
                    snap = await asyncio.wait_for(watches[cid].read(), 10)
                    assert _state(snap.affiliates) == want[cid], cid

                # A node republishes to the replica: newer data, which a later import must not undo.
                newer = os.urandom(48)
                await stub.AffiliateUpdate(_upd("alpha", "n3", newer, eps["n3"], 600), timeout=10)
                msg = await asyncio.wait_for(watches["alpha"].read(), 10)
                assert [(a.id, a.data) for a in msg.affiliates] == [("n3", newer)]
                want["alpha"]["n3"] = (newer, frozenset(eps["n3"]))

                # A second import is a no-op: no registry key or lease key written again (the
                # replica's own barrier keys, s/..., aside), no watcher hears anything.
                before = await _registry_keys(lab)
                again = _import(lab, snapshot, log)
                assert again.returncode == 0, again.stderr[-3000:]
                assert "(0 written, 6 already in etcd)" in again.stdout, again.stdout
                assert await _registry_keys(lab) == before
                listed = await stub.List(pb.ListRequest(cluster_id="alpha"), timeout=10)
                assert _state(listed.affiliates) == want["alpha"]
                for w in watches.values():
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(w.read(), 1.0)
                    w.cancel()
        finally:
            replica.kill()

        # Damaged snapshot (checksum no longer matches the journal's checkpoint): refused, file named.
        bad_dir = tmp_path / "bad"
        shutil.copytree(state, bad_dir)
        raw_bytes = bytearray((bad_dir / "state.binpb").read_bytes())
        raw_bytes[len(raw_bytes) // 2] ^= 0xFF
        (bad_dir / "state.binpb").write_bytes(bytes(raw_bytes))
        # A damaged journal record beside an intact snapshot (a torn tail): refused too, segment named.
        torn_dir = tmp_path / "torn"
        shutil.copytree(state, torn_dir)
        segment = sorted(torn_dir.glob("state.binpb.journal.*"))[-1]
        with segment.open("ab") as f:
            f.write(b"\xd5\x1a\x40\x00\x00\x00torn")
        # An upstream-style snapshot with no journal that does not decode; and no file at all.
        garbage = tmp_path / "garbage" / "state.binpb"
        garbage.parent.mkdir()
        garbage.write_bytes(b"\xff\xff\xff\xff not a snapshot")
        for path, needle in (
            (bad_dir / "state.binpb", "damaged"),
            (garbage, "corrupt"),
            (torn_dir / "state.binpb", f"journal {torn_dir}/{segment.name}"),
            (tmp_path / "nowhere" / "state.binpb", "no such file"),
        ):
            res = _import(lab, path, log)
            assert res.returncode == 2, (path, res.returncode, res.stderr[-2000:])
            assert str(path.parent) in res.stderr and needle in res.stderr, res.stderr[-2000:]
        assert sorted(os.listdir(bad_dir)) == sorted(os.listdir(state))  # the source files untouched

        text = log.read_bytes()
        for secret in secrets.values():
            assert secret not in text and secret.hex().encode() not in text
        for ep in eps["n2"]:
            assert ep.hex().encode() not in text
