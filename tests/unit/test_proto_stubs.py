"""The committed stubs in spanapi/ must match what scripts/genproto.py generates."""

from __future__ import annotations

import filecmp
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), "--out", str(tmp_path)], check=True
    )
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "spanapi").rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "spanapi").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == committed, "stub file list differs: run `make proto`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit"


def test_wire_names_match_talos() -> None:
    cluster = importlib.import_module("spanapi.discovery.server.cluster_pb2")
    affiliate = importlib.import_module("spanapi.discovery.client.affiliate_pb2")
    storage = importlib.import_module("spanapi.discovery.storage.storage_pb2")
    svc = cluster.DESCRIPTOR.services_by_name["Cluster"]
    assert svc.full_name == "sidero.discovery.server.Cluster"
    assert [m.name for m in svc.methods] == ["Hello", "AffiliateUpdate", "AffiliateDelete", "List", "Watch"]
    fields = {
        (m, f.name): f.number
        for mod in (cluster, affiliate, storage)
        for m, d in mod.DESCRIPTOR.message_types_by_name.items()
        for f in d.fields
    }
    assert fields[("AffiliateUpdateRequest", "ttl")] == 5
    assert fields[("AffiliateUpdateRequest", "affiliate_endpoints")] == 4
    assert fields[("HelloResponse", "client_ip")] == 2
    assert fields[("WatchResponse", "deleted")] == 2
    assert fields[("KubeSpan", "exclude_advertised_addresses")] == 4
    assert fields[("Affiliate", "control_plane")] == 8
    assert fields[("AffiliateSnapshot", "ttl")] == 5
    assert fields[("EndpointSnapshot", "ttl")] == 3
    assert affiliate.DESCRIPTOR.package == "sidero.discovery.client"
    assert storage.DESCRIPTOR.package == "sidero.discovery.storage"


def test_stubs_not_bare_proto_module() -> None:
    # proto-plus owns the top-level name `proto`; our stubs live under spanapi.
    assert not (ROOT / "proto" / "__init__.py").exists()


def test_etcd_wire_names_match_etcd_v3() -> None:
    # A real etcd answers only on its own method paths and field numbers.
    rpc = importlib.import_module("spanapi.etcd.etcdserverpb.rpc_pb2")
    kv = importlib.import_module("spanapi.etcd.mvccpb.kv_pb2")
    assert rpc.DESCRIPTOR.package == "etcdserverpb"
    assert kv.DESCRIPTOR.package == "mvccpb"
    methods = {
        f"/{s.full_name}/{m.name}" for s in rpc.DESCRIPTOR.services_by_name.values() for m in s.methods
    }
    assert {
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/Put",
        "/etcdserverpb.KV/DeleteRange",
        "/etcdserverpb.KV/Txn",
        "/etcdserverpb.KV/Compact",
        "/etcdserverpb.Watch/Watch",
        "/etcdserverpb.Lease/LeaseGrant",
        "/etcdserverpb.Lease/LeaseRevoke",
        "/etcdserverpb.Lease/LeaseKeepAlive",
        "/etcdserverpb.Lease/LeaseTimeToLive",
        "/etcdserverpb.Maintenance/Status",
    } <= methods
    fields = {
        (d.name, f.name): f.number
        for mod in (rpc, kv)
        for d in mod.DESCRIPTOR.message_types_by_name.values()
        for f in d.fields
    }
    assert fields[("Compare", "range_end")] == 64
    assert fields[("WatchResponse", "events")] == 11
    assert fields[("WatchResponse", "compact_revision")] == 5
    assert fields[("WatchCreateRequest", "prev_kv")] == 6
    assert fields[("PutRequest", "ignore_lease")] == 6
    assert fields[("RangeRequest", "count_only")] == 9
    assert fields[("LeaseTimeToLiveResponse", "grantedTTL")] == 4
    assert fields[("KeyValue", "lease")] == 6
    assert fields[("Event", "prev_kv")] == 3
