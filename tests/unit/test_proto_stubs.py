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
