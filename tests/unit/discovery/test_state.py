"""Unit tests for the discovery registry core (discovery/server/state.py)."""

from __future__ import annotations

import math

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.limits import Limits
from discovery.server.state import (
    AffiliateView,
    Change,
    Code,
    GcStats,
    Registry,
    RegistryError,
    SnapshotError,
)
from spanapi.discovery.storage import storage_pb2
from spanutil.testing import ManualClock

C = "cluster-1"
A = "node-a"
B = "node-b"


def ep(i: int, size: int = 16) -> bytes:
    return bytes([i % 256]) * size


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def reg(clock: ManualClock) -> Registry:
    return Registry(clock=clock)


def views(reg: Registry, cluster: str = C) -> dict[str, AffiliateView]:
    return {v.id: v for v in reg.list(cluster)}


def full_state(reg: Registry) -> dict[str, list[AffiliateView]]:
    return {cid: reg.list(cid) for cid in reg.cluster_ids()}


def expirations(reg: Registry) -> dict[tuple[str, str], object]:
    out: dict[tuple[str, str], object] = {}
    for cid in reg.cluster_ids():
        for v in reg.list(cid):
            out[(cid, v.id)] = reg.expirations(cid, v.id)
    return out


# ---------------------------------------------------------------------------- basics, merge, TTL


def test_update_creates_affiliate_and_cluster(reg: Registry) -> None:
    assert reg.stats() == (0, 0, 0, 0)
    assert reg.update(C, A, b"data", [ep(1), ep(2, 32)], 60) is True
    assert views(reg) == {A: AffiliateView(A, b"data", (ep(1), ep(2, 32)))}
    assert reg.stats() == (1, 1, 2, 0)


def test_data_replaced_and_endpoints_merged_in_order(reg: Registry) -> None:
    reg.update(C, A, b"one", [ep(1), ep(2)], 60)
    assert reg.update(C, A, b"two", [ep(2), ep(3)], 60) is True
    assert views(reg)[A] == AffiliateView(A, b"two", (ep(1), ep(2), ep(3)))
    assert reg.stats() == (1, 1, 3, 0)


@pytest.mark.parametrize("data", [None, b""])
def test_empty_data_does_not_touch_stored_data(reg: Registry, data: bytes | None) -> None:
    reg.update(C, A, b"keep", [], 60)
    reg.update(C, A, data, [ep(1)], 60)
    assert views(reg)[A].data == b"keep"


def test_endpoint_only_update_creates_dataless_affiliate(reg: Registry) -> None:
    assert reg.update(C, B, None, [ep(7)], 60) is True
    assert views(reg)[B] == AffiliateView(B, b"", (ep(7),))


def test_ttl_expiry_and_gc(reg: Registry, clock: ManualClock) -> None:
    reg.update(C, A, b"a", [ep(1)], 60)
    reg.update(C, B, b"b", [], 120)
    clock.advance(59.9)
    assert reg.gc() == GcStats(0, 0, 0)
    assert set(views(reg)) == {A, B}
    clock.advance(0.1)  # expiration == now counts as expired
    assert reg.gc() == GcStats(clusters=0, affiliates=1, endpoints=1)
    assert set(views(reg)) == {B}
    clock.advance(60)
    assert reg.gc() == GcStats(clusters=1, affiliates=1, endpoints=0)
    assert reg.stats() == (0, 0, 0, 0)


@pytest.mark.parametrize("ttl", [0.0, -5.0, -math.inf])
def test_zero_or_negative_ttl_expires_at_next_gc(reg: Registry, clock: ManualClock, ttl: float) -> None:
    reg.update(C, A, b"a", [ep(1)], ttl)
    assert reg.expirations(C, A) == (clock.t, {ep(1): clock.t})  # negative counts as 0
    assert set(views(reg)) == {A}
    assert reg.gc().affiliates == 1
    assert views(reg) == {}


def test_expiration_is_max_of_old_and_new(reg: Registry, clock: ManualClock) -> None:
    reg.update(C, A, b"a", [ep(1)], 100)
    reg.update(C, A, None, [ep(1)], 10)  # shorter TTL does not shorten anything
    clock.advance(50)
    reg.gc()
    assert views(reg)[A].endpoints == (ep(1),)
    clock.advance(50)
    reg.gc()
    assert views(reg) == {}


def test_known_endpoint_expiration_is_extended(reg: Registry, clock: ManualClock) -> None:
    reg.update(C, A, b"a", [ep(1), ep(2)], 10)
    reg.update(C, A, None, [ep(2)], 100)
    clock.advance(50)
    assert reg.gc() == GcStats(0, 0, 1)
    assert views(reg)[A].endpoints == (ep(2),)


def test_keepalive_extends_ttl_without_notification(reg: Registry, clock: ManualClock) -> None:
    reg.update(C, A, b"a", [ep(1)], 60)
    sub = reg.subscribe(C)
    clock.advance(50)
    assert reg.update(C, A, None, [], 60) is False
    assert sub.drain() == []
    clock.advance(50)  # 100 s after creation, 50 s after the keep-alive
    reg.gc()
    assert set(views(reg)) == {A}
    # the keep-alive extends the affiliate, not its endpoints
    assert views(reg)[A].endpoints == ()
    clock.advance(10)
    reg.gc()
    assert views(reg) == {}


def test_identical_data_does_not_notify(reg: Registry) -> None:
    reg.update(C, A, b"same", [ep(1)], 60)
    sub = reg.subscribe(C)
    assert reg.update(C, A, b"same", [ep(1)], 60) is False
    assert sub.pending == 0
    assert reg.update(C, A, b"other", [ep(1)], 60) is True
    (change,) = sub.drain()
    assert change.affiliate == AffiliateView(A, b"other", (ep(1),))


def test_new_endpoint_notifies_existing_endpoint_does_not(reg: Registry) -> None:
    reg.update(C, A, b"d", [ep(1)], 60)
    sub = reg.subscribe(C)
    assert reg.update(C, A, None, [ep(1)], 60) is False
    assert sub.pending == 0
    assert reg.update(C, A, None, [ep(2)], 60) is True
    (change,) = sub.drain()
    assert change.affiliate is not None and change.affiliate.endpoints == (ep(1), ep(2))


def test_endpoint_expiry_sends_update_not_delete(reg: Registry, clock: ManualClock) -> None:
    reg.update(C, A, b"d", [ep(1)], 10)
    reg.update(C, A, None, [ep(2)], 100)
    sub = reg.subscribe(C)
    clock.advance(10)
    assert reg.gc() == GcStats(clusters=0, affiliates=0, endpoints=1)
    (change,) = sub.drain()
    assert change.id == A
    assert change.affiliate == AffiliateView(A, b"d", (ep(2),))
    assert reg.stats() == (1, 1, 1, 1)
    # a second GC has nothing more to do and sends nothing
    assert reg.gc() == GcStats(0, 0, 0)
    assert sub.drain() == []


def test_affiliate_expiry_sends_delete(reg: Registry, clock: ManualClock) -> None:
    reg.update(C, A, b"d", [ep(1)], 10)
    sub = reg.subscribe(C)
    clock.advance(11)
    reg.gc()
    (change,) = sub.drain()
    assert (change.id, change.affiliate) == (A, None)


def test_watched_empty_cluster_survives_gc_until_unsubscribed(reg: Registry) -> None:
    sub = reg.subscribe(C)
    assert reg.gc().clusters == 0
    assert reg.stats() == (1, 0, 0, 1)
    sub.close()
    sub.close()  # idempotent
    assert reg.stats() == (1, 0, 0, 0)
    assert reg.gc().clusters == 1
    assert reg.stats() == (0, 0, 0, 0)


def test_list_creates_cluster_and_gc_removes_it(reg: Registry) -> None:
    assert reg.list(C) == []
    assert list(reg.cluster_ids()) == [C]
    assert reg.gc().clusters == 1


def test_delete_is_idempotent_and_notifies_once(reg: Registry) -> None:
    reg.update(C, A, b"d", [ep(1), ep(2)], 60)
    sub = reg.subscribe(C)
    assert reg.delete(C, A) is True
    assert reg.delete(C, A) is False
    assert reg.delete("other", A) is False
    assert [(c.id, c.affiliate) for c in sub.drain()] == [(A, None)]
    assert reg.stats() == (1, 0, 0, 1)
    assert "other" not in reg.cluster_ids()


# ---------------------------------------------------------------------------- validation


LIMITS = Limits()


def bad_requests() -> list[tuple[str, dict[str, object], Code, str, str]]:
    """(name, update kwargs, code, field, text that must appear in the message)."""
    return [
        ("empty cluster", {"cluster_id": ""}, Code.INVALID_ARGUMENT, "cluster_id", "256"),
        ("long cluster", {"cluster_id": "c" * 257}, Code.INVALID_ARGUMENT, "cluster_id", "257 bytes"),
        ("utf8 cluster", {"cluster_id": "é" * 129}, Code.INVALID_ARGUMENT, "cluster_id", "258 bytes"),
        ("surrogate cluster", {"cluster_id": "\udc80"}, Code.INVALID_ARGUMENT, "cluster_id", "UTF-8"),
        ("empty affiliate", {"affiliate_id": ""}, Code.INVALID_ARGUMENT, "affiliate_id", "256"),
        ("long affiliate", {"affiliate_id": "a" * 257}, Code.INVALID_ARGUMENT, "affiliate_id", "256"),
        ("big data", {"data": b"S" * 2049}, Code.INVALID_ARGUMENT, "affiliate_data", "2048"),
        (
            "empty endpoint",
            {"endpoints": [ep(1), b""]},
            Code.INVALID_ARGUMENT,
            "affiliate_endpoints[1]",
            "empty",
        ),
        ("big endpoint", {"endpoints": [b"S" * 48]}, Code.INVALID_ARGUMENT, "affiliate_endpoints[0]", "32"),
        (
            "odd endpoint",
            {"endpoints": [ep(1), ep(2), b"S" * 17]},
            Code.INVALID_ARGUMENT,
            "affiliate_endpoints[2]",
            "16",
        ),
        ("ttl", {"ttl": 1800.5}, Code.INVALID_ARGUMENT, "ttl", "1800"),
        ("ttl inf", {"ttl": math.inf}, Code.INVALID_ARGUMENT, "ttl", "1800"),
        ("ttl nan", {"ttl": math.nan}, Code.INVALID_ARGUMENT, "ttl", "1800"),
    ]


@pytest.mark.parametrize(
    ("name", "kw", "code", "field", "text"), bad_requests(), ids=[r[0] for r in bad_requests()]
)
def test_invalid_requests(
    reg: Registry, name: str, kw: dict[str, object], code: Code, field: str, text: str
) -> None:
    args: dict[str, object] = {
        "cluster_id": C,
        "affiliate_id": A,
        "data": b"new",
        "endpoints": [ep(9)],
        "ttl": 60,
    }
    args.update(kw)
    reg.update(C, A, b"old", [ep(1)], 60)
    sub = reg.subscribe(C)
    before = (full_state(reg), expirations(reg), reg.stats())
    with pytest.raises(RegistryError) as ei:
        reg.update(**args)  # type: ignore[arg-type]
    e = ei.value
    assert (e.code, e.field) == (code, field)
    assert str(e).startswith(field + ":")
    assert text in str(e)
    assert "SSSS" not in str(e)  # never the blob contents
    assert (full_state(reg), expirations(reg), reg.stats()) == before
    assert sub.pending == 0


def test_ttl_at_limit_and_id_at_limit_are_accepted(reg: Registry) -> None:
    assert reg.update("c" * 256, "é" * 128, b"x" * 2048, [ep(1, 32)], 1800.0)
    assert reg.stats()[1] == 1


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda r: r.validate_ids(""), "cluster_id"),
        (lambda r: r.validate_ids(C, "a" * 300), "affiliate_id"),
        (lambda r: r.list("c" * 300), "cluster_id"),
        (lambda r: r.subscribe(""), "cluster_id"),
        (lambda r: r.delete(C, ""), "affiliate_id"),
    ],
)
def test_other_entry_points_validate_ids(reg: Registry, call: object, field: str) -> None:
    with pytest.raises(RegistryError) as ei:
        call(reg)  # type: ignore[operator]
    assert ei.value.code is Code.INVALID_ARGUMENT
    assert ei.value.field == field
    assert reg.stats() == (0, 0, 0, 0)


def test_validate_ids_accepts_valid(reg: Registry) -> None:
    reg.validate_ids(C)
    reg.validate_ids(C, A)


def test_affiliate_limit(reg: Registry) -> None:
    for i in range(1024):
        reg.update(C, f"n{i}", None, [], 60)
    sub = reg.subscribe(C)
    before = (full_state(reg), reg.stats())
    with pytest.raises(RegistryError) as ei:
        reg.update(C, "one-too-many", b"d", [ep(1)], 60)
    assert (ei.value.code, ei.value.field) == (Code.RESOURCE_EXHAUSTED, "affiliates")
    assert "1024" in str(ei.value)
    assert (full_state(reg), reg.stats()) == before
    assert sub.pending == 0
    # existing affiliates can still be updated; another cluster is unaffected
    assert reg.update(C, "n5", b"d", [ep(1)], 60)
    assert reg.update("other", "x", b"d", [], 60)
    reg.delete(C, "n0")
    assert reg.update(C, "one-too-many", b"d", [], 60)


def test_endpoint_limit(reg: Registry) -> None:
    eps = [ep(i) for i in range(63)]
    reg.update(C, A, b"old", eps, 60)
    # duplicates inside one request count once: 63 + 1 = 64
    assert reg.update(C, A, None, [ep(100), ep(100), ep(1)], 60)
    assert reg.stats()[2] == 64
    sub = reg.subscribe(C)
    before = (full_state(reg), expirations(reg), reg.stats())
    with pytest.raises(RegistryError) as ei:
        reg.update(C, A, b"new data", [ep(1), ep(200)], 120)
    assert (ei.value.code, ei.value.field) == (Code.RESOURCE_EXHAUSTED, "affiliate_endpoints")
    assert "65" in str(ei.value) and "64" in str(ei.value)
    # no partial update (upstream would have replaced the data and notified)
    assert (full_state(reg), expirations(reg), reg.stats()) == before
    assert sub.pending == 0
    # re-sending known endpoints is fine at the limit
    assert reg.update(C, A, b"new data", [ep(1), ep(2)], 60) is True


def test_new_affiliate_with_too_many_endpoints(reg: Registry) -> None:
    with pytest.raises(RegistryError) as ei:
        reg.update(C, A, b"d", [ep(i) for i in range(65)], 60)
    assert ei.value.field == "affiliate_endpoints"
    assert reg.stats() == (0, 0, 0, 0)  # not even the cluster was created


def test_rejection_does_not_create_cluster(reg: Registry) -> None:
    with pytest.raises(RegistryError):
        reg.update(C, A, b"d", [b"x"], 60)
    assert list(reg.cluster_ids()) == []


# ---------------------------------------------------------------------------- watchers


def test_subscription_snapshot_is_atomic(reg: Registry) -> None:
    reg.update(C, A, b"a", [], 60)
    sub = reg.subscribe(C)
    reg.update(C, B, b"b", [], 60)
    assert [v.id for v in sub.snapshot] == [A]
    assert [c.id for c in sub.drain()] == [B]
    assert reg.stats()[3] == 1


def test_change_object_shared_between_subscribers(reg: Registry) -> None:
    subs = [reg.subscribe(C) for _ in range(3)]
    reg.update(C, A, b"a", [ep(1)], 60)
    changes = [s.drain() for s in subs]
    assert all(len(c) == 1 for c in changes)
    assert changes[0][0] is changes[1][0] is changes[2][0]
    assert isinstance(changes[0][0], Change) and changes[0][0].wire is None
    # other clusters' watchers get nothing
    other = reg.subscribe("other")
    reg.update(C, A, b"b", [], 60)
    assert other.drain() == []


def test_waker_called_per_queued_change(reg: Registry) -> None:
    sub = reg.subscribe(C)
    calls: list[int] = []
    sub.waker = lambda: calls.append(sub.pending)
    reg.update(C, A, b"1", [], 60)
    reg.update(C, A, b"1", [], 60)  # no change, no wake
    reg.update(C, A, b"2", [], 60)
    reg.delete(C, A)
    assert calls == [1, 2, 3]


def test_drain_coalesces_last_wins_in_order_of_last_occurrence(reg: Registry) -> None:
    sub = reg.subscribe(C)
    reg.update(C, A, b"a1", [], 60)
    reg.update(C, B, b"b1", [], 60)
    reg.update(C, A, b"a2", [], 60)
    reg.update(C, "c", b"c1", [], 60)
    reg.delete(C, B)
    out = sub.drain()
    assert [(c.id, c.affiliate.data if c.affiliate else None) for c in out] == [
        (A, b"a2"),
        ("c", b"c1"),
        (B, None),
    ]
    assert sub.drain() == []
    reg.update(C, B, b"b2", [], 60)
    assert [c.id for c in sub.drain()] == [B]


def test_watcher_overflow_marks_lost(clock: ManualClock) -> None:
    reg = Registry(Limits(watch_buffer=4), clock=clock)
    slow = reg.subscribe(C)
    fast = reg.subscribe(C)
    woken: list[bool] = []
    slow.waker = lambda: woken.append(slow.lost)
    for i in range(4):
        reg.update(C, A, bytes([i]), [], 60)
        fast.drain()
    assert slow.lost is False and slow.pending == 4
    reg.update(C, A, b"x", [], 60)
    assert slow.lost is True
    assert woken[-1] is True
    assert fast.lost is False and len(fast.drain()) == 1
    assert reg.stats()[3] == 1  # the lost subscriber no longer counts nor receives
    reg.update(C, A, b"y", [], 60)
    assert slow.pending == 0 and slow.drain() == []
    slow.close()
    assert reg.stats()[3] == 1
    fast.close()
    assert reg.stats()[3] == 0


def test_lost_is_per_raw_count_even_for_one_id(clock: ManualClock) -> None:
    reg = Registry(Limits(watch_buffer=2), clock=clock)
    sub = reg.subscribe(C)
    for i in range(3):
        reg.update(C, A, bytes([i]), [], 60)
    assert sub.lost


def test_fanout_to_1024_watchers(reg: Registry) -> None:
    subs = [reg.subscribe(C) for _ in range(1024)]
    assert reg.update(C, A, b"d", [ep(1)], 60)
    first = subs[0].drain()[0]
    assert all(s.drain() == [first] for s in subs[1:])


# ---------------------------------------------------------------------------- snapshots


def test_snapshot_round_trip_relative_ttls(clock: ManualClock) -> None:
    reg = Registry(clock=clock)
    reg.update(C, A, b"a" * 500, [ep(1)], 100)
    reg.update(C, A, None, [ep(2, 32)], 300)
    reg.update(C, B, None, [ep(3)], 50)  # data-less
    reg.update("gone", "x", b"x", [], 5)
    reg.subscribe("watched-only")  # empty clusters are not written
    clock.advance(10)
    data, nc, na, ne = reg.export_snapshot_with_counts()
    assert (nc, na, ne) == (1, 2, 3)
    assert reg.export_snapshot() == data

    snap = storage_pb2.StateSnapshot.FromString(data)
    assert snap.SerializeToString() == data  # byte-identical to the protobuf encoder
    assert [c.id for c in snap.clusters] == [C]
    a = {x.id: x for x in snap.clusters[0].affiliates}
    assert not a[A].HasField("expiration") and not a[A].endpoints[0].HasField("expiration")
    assert a[A].ttl == duration_pb2.Duration(seconds=290)
    assert [(e.data, e.ttl.seconds) for e in a[A].endpoints] == [(ep(1), 90), (ep(2, 32), 290)]
    assert a[B].data == b"" and a[B].ttl.seconds == 40

    other_clock = ManualClock(50_000.0)  # a different process: monotonic origin differs
    reg2 = Registry(clock=other_clock)
    assert reg2.import_snapshot(data) == (1, 2, 3)
    assert full_state(reg2) == {C: reg.list(C)}
    exp, eps = reg2.expirations(C, A)  # type: ignore[misc]
    assert exp == pytest.approx(50_290.0)
    assert eps == {ep(1): pytest.approx(50_090.0), ep(2, 32): pytest.approx(50_290.0)}
    assert reg2.stats() == (1, 2, 3, 0)


def test_snapshot_import_elapsed_reduces_ttls(clock: ManualClock) -> None:
    reg = Registry(clock=clock)
    reg.update(C, A, b"a", [ep(1)], 100)
    reg.update(C, B, b"b", [], 30)
    data = reg.export_snapshot()
    reg2 = Registry(clock=ManualClock(0.0))
    assert reg2.import_snapshot(data, elapsed=40) == (1, 1, 1)
    assert reg2.expirations(C, A) == (pytest.approx(60.0), {ep(1): pytest.approx(60.0)})
    assert reg2.expirations(C, B) is None


def test_snapshot_import_legacy_absolute_timestamps(clock: ManualClock) -> None:
    wall = 1_700_000_000.0
    snap = storage_pb2.StateSnapshot()
    c = snap.clusters.add(id=C)
    a = c.affiliates.add(id=A, data=b"d", expiration=timestamp_pb2.Timestamp(seconds=int(wall) + 120))
    a.endpoints.add(data=ep(1), expiration=timestamp_pb2.Timestamp(seconds=int(wall) + 60, nanos=500_000_000))
    a.endpoints.add(data=ep(2), expiration=timestamp_pb2.Timestamp(seconds=int(wall) - 1))  # expired
    c.affiliates.add(id=B, data=b"d", expiration=timestamp_pb2.Timestamp(seconds=int(wall) - 10))  # expired
    c.affiliates.add(id="no-ttl", data=b"d")  # neither ttl nor expiration: treated as expired
    reg = Registry(clock=clock)
    assert reg.import_snapshot(snap.SerializeToString(), now_wall=wall) == (1, 1, 1)
    assert reg.expirations(C, A) == (pytest.approx(1120.0), {ep(1): pytest.approx(1060.5)})
    assert set(views(reg)) == {A}


def test_snapshot_import_enforces_limits(clock: ManualClock) -> None:
    limits = Limits(affiliates_per_cluster_max=2, endpoints_per_affiliate_max=2)
    ttl = duration_pb2.Duration(seconds=60)
    snap = storage_pb2.StateSnapshot()
    snap.clusters.add(id="", affiliates=[storage_pb2.AffiliateSnapshot(id="x", ttl=ttl)])
    c = snap.clusters.add(id=C)
    c.affiliates.add(id="", ttl=ttl)
    c.affiliates.add(id="big", data=b"SECRET" * 400, ttl=ttl)
    a = c.affiliates.add(id=A, data=b"d", ttl=duration_pb2.Duration(seconds=99_999))
    for blob in (b"SECRET", ep(1), ep(2), ep(3)):
        a.endpoints.add(data=blob, ttl=ttl)
    c.affiliates.add(id=B, ttl=ttl)
    c.affiliates.add(id="third", ttl=ttl)
    problems: list[str] = []
    reg = Registry(limits, clock=clock)
    assert reg.import_snapshot(snap.SerializeToString(), problems=problems) == (1, 2, 2)
    assert set(views(reg)) == {A, B}
    assert views(reg)[A].endpoints == (ep(1), ep(2))
    assert reg.expirations(C, A)[0] == pytest.approx(1000.0 + 1800)  # type: ignore[index]  # clamped
    text = "\n".join(problems)
    assert "SECRET" not in text
    for needle in (
        "cluster_id",
        "affiliate_id",
        "affiliate_data",
        "affiliate_endpoints[0]",
        "affiliates",
        "limit of 2",
    ):
        assert needle in text
    assert len(problems) == 6


def test_snapshot_import_merges_into_existing_state(reg: Registry, clock: ManualClock) -> None:
    reg.update(C, A, b"old", [ep(1)], 100)
    other = Registry(clock=clock)
    other.update(C, A, b"new", [ep(2)], 10)
    sub = reg.subscribe(C)
    reg.import_snapshot(other.export_snapshot())
    assert views(reg)[A] == AffiliateView(A, b"new", (ep(1), ep(2)))
    assert reg.expirations(C, A)[0] == pytest.approx(1100.0)  # type: ignore[index]
    assert [c.affiliate for c in sub.drain()] == [views(reg)[A]]


@pytest.mark.parametrize("blob", [b"\xff", b"\x0a\x05ab", b"\x0a\x03\x0a\x01\xff"])
def test_snapshot_import_rejects_garbage_atomically(reg: Registry, blob: bytes) -> None:
    reg.update(C, A, b"d", [], 60)
    before = full_state(reg)
    with pytest.raises(SnapshotError):
        reg.import_snapshot(blob)
    assert full_state(reg) == before


def test_replay_update_applies_at_past_time(reg: Registry) -> None:
    reg.replay_update(C, A, b"d", [ep(1)], 100, age=30)
    assert reg.expirations(C, A) == (pytest.approx(1070.0), {ep(1): pytest.approx(1070.0)})


def test_replay_update_prunes_expired_endpoints_first(clock: ManualClock) -> None:
    reg = Registry(Limits(endpoints_per_affiliate_max=2), clock=clock)
    reg.replay_update(C, A, b"d", [ep(1), ep(2)], 10, age=100)  # endpoints expired at now - 90
    reg.replay_update(C, A, None, [], 200, age=95)  # keep-alive: the affiliate lives on
    # accepted 50 s ago, when GC had dropped ep(1)/ep(2): must not hit the endpoint limit
    assert reg.replay_update(C, A, None, [ep(3), ep(4)], 100, age=50) is True
    assert views(reg)[A] == AffiliateView(A, b"d", (ep(3), ep(4)))
    assert reg.stats() == (1, 1, 2, 0)
    # the live path at "now" would have rejected the same merge
    live = Registry(Limits(endpoints_per_affiliate_max=2), clock=clock)
    live.update(C, A, b"d", [ep(1), ep(2)], 100)
    with pytest.raises(RegistryError):
        live.update(C, A, None, [ep(3), ep(4)], 100)


def test_replay_update_starts_over_when_the_affiliate_had_expired(reg: Registry) -> None:
    reg.replay_update(C, A, b"d", [ep(1)], 10, age=100)
    reg.replay_update(C, A, None, [ep(3)], 100, age=50)
    assert views(reg)[A] == AffiliateView(A, b"", (ep(3),))  # the old data was gone by then


def test_replay_update_frees_expired_affiliates_for_capacity(clock: ManualClock) -> None:
    reg = Registry(Limits(affiliates_per_cluster_max=1), clock=clock)
    reg.replay_update(C, A, b"a", [], 10, age=100)
    assert reg.replay_update(C, B, b"b", [], 100, age=50) is True
    assert set(views(reg)) == {B}
    assert reg.stats() == (1, 1, 0, 0)
    with pytest.raises(RegistryError) as ei:  # a live competitor still counts
        reg.replay_update(C, "third", b"c", [], 100, age=0)
    assert ei.value.field == "affiliates"


# ---------------------------------------------------------------------------- property test

SMALL = Limits(
    cluster_id_max=3,
    affiliate_id_max=3,
    affiliate_data_max=4,
    endpoint_max=32,
    endpoints_per_affiliate_max=3,
    affiliates_per_cluster_max=3,
    ttl_max=100.0,
    watch_buffer=1000,
)

ids = st.sampled_from(["", "a", "b", "c", "d", "abcd", "é"])
blobs = st.sampled_from([b"", b"x" * 16, b"y" * 16, b"z" * 32, b"w" * 16, b"v" * 16, b"q" * 17, b"r" * 48])
ops = st.one_of(
    st.tuples(
        st.just("update"),
        ids,
        ids,
        st.one_of(st.none(), st.binary(max_size=6)),
        st.lists(blobs, max_size=5),
        st.sampled_from([-1.0, 0.0, 5.0, 50.0, 100.0, 101.0]),
    ),
    st.tuples(st.just("delete"), ids, ids),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 10.0, 60.0])),
    st.tuples(st.just("gc")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
def test_property_limits_hold_and_rejections_change_nothing(seq: list[tuple[object, ...]]) -> None:
    clock = ManualClock()
    reg = Registry(SMALL, clock=clock)
    subs = {cid: reg.subscribe(cid) for cid in ("a", "b")}
    for op in seq:
        kind = op[0]
        if kind == "tick":
            clock.advance(op[1])  # type: ignore[arg-type]
            continue
        if kind == "gc":
            reg.gc()
            continue
        before = (full_state(reg), expirations(reg), reg.stats(), {k: s.pending for k, s in subs.items()})
        try:
            if kind == "update":
                reg.update(*op[1:])  # type: ignore[arg-type]
            else:
                reg.delete(*op[1:])  # type: ignore[arg-type]
        except RegistryError:
            after = (full_state(reg), expirations(reg), reg.stats(), {k: s.pending for k, s in subs.items()})
            assert after == before
        # invariants
        n_aff = n_ep = 0
        for cid in reg.cluster_ids():
            affs = reg.list(cid)
            assert len(affs) <= SMALL.affiliates_per_cluster_max
            assert len(cid.encode()) <= SMALL.cluster_id_max
            for v in affs:
                assert 1 <= len(v.id.encode()) <= SMALL.affiliate_id_max
                assert len(v.data) <= SMALL.affiliate_data_max
                assert len(v.endpoints) <= SMALL.endpoints_per_affiliate_max
                assert len(set(v.endpoints)) == len(v.endpoints)
                assert all(0 < len(e) <= 32 and len(e) % 16 == 0 for e in v.endpoints)
                n_aff += 1
                n_ep += len(v.endpoints)
        assert reg.stats() == (len(tuple(reg.cluster_ids())), n_aff, n_ep, 2)
    # replaying the drained changes onto the subscription snapshot reproduces list()
    for cid, sub in subs.items():
        model = {v.id: v for v in sub.snapshot}
        for ch in sub.drain():
            if ch.affiliate is None:
                model.pop(ch.id, None)
            else:
                model[ch.id] = ch.affiliate
        assert model == {v.id: v for v in reg.list(cid)}


def test_rejections_name_field_and_limit_never_the_request(clock: ManualClock) -> None:
    """Every RegistryError for an over-limit request is short and quotes nothing the client sent
    (the service passes str(e) to the client as status details and into its log)."""
    huge = "Q" * (1 << 20)
    blob = b"Q" * (1 << 20)
    reg = Registry(Limits(affiliates_per_cluster_max=1, endpoints_per_affiliate_max=1), clock=clock)
    reg.update(C, A, b"d", [ep(1)], 60)
    cases = [
        (lambda: reg.update(huge, A, None, [], 60), f"cluster_id: {1 << 20} bytes exceeds the limit of 256"),
        (
            lambda: reg.update(C, huge, None, [], 60),
            f"affiliate_id: {1 << 20} bytes exceeds the limit of 256",
        ),
        (lambda: reg.update(C, "é" * 200, None, [], 60), "affiliate_id: 400 bytes exceeds the limit of 256"),
        (
            lambda: reg.update(C, A, blob, [], 60),
            f"affiliate_data: {1 << 20} bytes exceeds the limit of 2048",
        ),
        (
            lambda: reg.update(C, A, None, [blob], 60),
            f"affiliate_endpoints[0]: {1 << 20} bytes exceeds the limit of 32",
        ),
        (
            lambda: reg.update(C, A, None, [b"Q" * 17], 60),
            "affiliate_endpoints[0]: 17 bytes is not a multiple of 16",
        ),
        (
            lambda: reg.update(C, A, None, [ep(2)], 60),
            "affiliate_endpoints: 2 endpoints exceeds the limit of 1",
        ),
        (
            lambda: reg.update(C, B, None, [], 60),
            "affiliates: the cluster already holds 1 affiliates, the limit is 1",
        ),
        (lambda: reg.update(C, A, None, [], 1e300), "ttl: 1e+300 s exceeds the limit of 1800 s"),
        (lambda: reg.delete(huge, huge), f"cluster_id: {1 << 20} bytes exceeds the limit of 256"),
        (lambda: reg.delete(C, huge), f"affiliate_id: {1 << 20} bytes exceeds the limit of 256"),
        (lambda: reg.list(huge), f"cluster_id: {1 << 20} bytes exceeds the limit of 256"),
        (lambda: reg.subscribe(huge), f"cluster_id: {1 << 20} bytes exceeds the limit of 256"),
        (lambda: reg.validate_ids(huge), f"cluster_id: {1 << 20} bytes exceeds the limit of 256"),
        (lambda: reg.validate_ids(C, huge), f"affiliate_id: {1 << 20} bytes exceeds the limit of 256"),
    ]
    for fn, message in cases:
        with pytest.raises(RegistryError) as info:
            fn()
        assert str(info.value) == message
        assert "QQ" not in str(info.value) and len(str(info.value)) < 100
    # snapshot import problems (logged at start-up) are as bounded
    snap = storage_pb2.StateSnapshot()
    snap.clusters.add(id=huge)
    snap.clusters.add(id=C).affiliates.add(id=huge, ttl=duration_pb2.Duration(seconds=60))
    problems: list[str] = []
    Registry(clock=clock).import_snapshot(snap.SerializeToString(), problems=problems)
    assert len(problems) == 2
    assert all("QQ" not in p and len(p) < 120 for p in problems), problems
