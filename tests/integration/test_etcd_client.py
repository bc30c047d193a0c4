"""discovery.etcd.client against real etcd members (Debian's etcd-server 3.4, spanutil.etcdlab)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery.etcd.client import (
    Compare,
    DeleteResult,
    EtcdClient,
    EtcdCompacted,
    EtcdIndeterminate,
    EtcdLeaseNotFound,
    EtcdUnavailable,
    Event,
    EventType,
    Op,
    PutResult,
    RangeResult,
    TLSFiles,
    Watch,
)
from spanutil.etcdlab import EtcdLab, etcd_binary, free_port, make_tls
from spanutil.testing import eventually

NO_ETCD = "etcd is not installed (Debian: etcd-server, which `make sysdeps` installs; or set $ETCD_BIN)"
needs_etcd = pytest.mark.skipif(etcd_binary() is None, reason=NO_ETCD)
# Quick elections for the failover tests; frequent progress notifications.
FAST = [
    "--heartbeat-interval=50",
    "--election-timeout=500",
    "--experimental-watch-progress-notify-interval=300ms",
]


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdLab]:
    if etcd_binary() is None:
        pytest.skip(NO_ETCD)
    with EtcdLab(tmp_path_factory.mktemp("etcd1"), 1, extra_args=FAST) as lab:
        yield lab


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdLab]:
    if etcd_binary() is None:
        pytest.skip(NO_ETCD)
    with EtcdLab(tmp_path, 3, extra_args=FAST) as lab:
        yield lab


def ns_of(request: pytest.FixtureRequest) -> str:
    return f"/test/{request.node.name}/"


async def collect(w: Watch, n: int, within: float = 10.0) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(within):
        async for batch in w:
            out.extend(batch.events)
            if len(out) >= n:
                return out
    return out


@needs_etcd
async def test_put_get_range_prefix_count(etcd1: EtcdLab, request: pytest.FixtureRequest) -> None:
    ns = ns_of(request)
    async with EtcdClient(etcd1.endpoints, namespace=ns) as c:
        first = await c.put("a/1", b"v1")
        for i in range(2, 6):
            await c.put(f"a/{i}", f"v{i}")
        await c.put("b/1", b"other")
        kv = await c.get("a/1")
        assert kv is not None and (kv.key, kv.value, kv.version) == (b"a/1", b"v1", 1)
        assert kv.create_revision == kv.mod_revision == first.revision
        assert await c.get("a/nope") is None

        r = await c.range("a/", prefix=True)
        assert [k.key for k in r.kvs] == [f"a/{i}".encode() for i in range(1, 6)]
        assert r.count == 5 and not r.more

        r = await c.range("a/", prefix=True, limit=2)
        assert [k.key for k in r.kvs] == [b"a/1", b"a/2"] and r.more and r.count == 5

        r = await c.range("a/", prefix=True, count_only=True)
        assert r.count == 5 and r.kvs == []

        r = await c.range("a/3", range_end=b"\0")  # every key from a/3 on, inside the namespace
        assert [k.key for k in r.kvs] == [b"a/3", b"a/4", b"a/5", b"b/1"]

        await c.put("a/1", b"v1b")
        old = await c.get("a/1", revision=first.revision)
        assert old is not None and old.value == b"v1"
        r = await c.range("", prefix=True, revision=first.revision)
        assert [k.key for k in r.kvs] == [b"a/1"]

        d = await c.delete("a/", prefix=True, prev_kv=True)
        assert d.deleted == 5 and sorted(k.key for k in d.prev_kvs)[0] == b"a/1"
        assert (await c.range("", prefix=True, count_only=True)).count == 1

    # the namespace keeps registries apart; a client without one sees the full keys
    async with EtcdClient(etcd1.endpoints, namespace=ns + "other/") as other:
        assert (await other.range("", prefix=True)).count == 0
    async with EtcdClient(etcd1.endpoints) as raw:
        assert [k.key for k in (await raw.range(ns, prefix=True)).kvs] == [f"{ns}b/1".encode()]


@needs_etcd
async def test_put_options_and_leases(etcd1: EtcdLab, request: pytest.FixtureRequest) -> None:
    async with EtcdClient(etcd1.endpoints, namespace=ns_of(request)) as c:
        lease = await c.lease_grant(60)
        assert lease.ttl == 60
        await c.put("k", b"one")
        r = await c.put("k", b"two", prev_kv=True)
        assert r.prev_kv is not None and r.prev_kv.value == b"one"
        await c.put("k", lease=lease.id, ignore_value=True)  # move to the lease, keep the value
        kv = await c.get("k")
        assert kv is not None and (kv.value, kv.lease) == (b"two", lease.id)
        await c.put("k", b"three", ignore_lease=True)  # new value, keep the lease
        kv = await c.get("k")
        assert kv is not None and (kv.value, kv.lease) == (b"three", lease.id)

        info = await c.lease_time_to_live(lease.id, keys=True)
        assert info.granted_ttl == 60 and 0 < info.ttl <= 60 and info.keys == [b"k"]
        assert await c.lease_keepalive_once(lease.id) == 60

        await c.lease_revoke(lease.id)
        assert await c.get("k") is None
        assert (await c.lease_time_to_live(lease.id)).ttl == -1
        with pytest.raises(EtcdLeaseNotFound):
            await c.lease_keepalive_once(lease.id)
        with pytest.raises(EtcdLeaseNotFound):
            await c.lease_revoke(lease.id)


@needs_etcd
async def test_txn_compare_success_and_failure(etcd1: EtcdLab, request: pytest.FixtureRequest) -> None:
    async with EtcdClient(etcd1.endpoints, namespace=ns_of(request)) as c:
        create = [Compare.version("x", "==", 0)]
        t = await c.txn(create, [Op.put("x", b"1")], [Op.get("x")])
        assert t.succeeded and isinstance(t.responses[0], PutResult)
        t = await c.txn(create, [Op.put("x", b"2")], [Op.get("x")])
        assert not t.succeeded
        got = t.responses[0]
        assert isinstance(got, RangeResult) and got.kvs[0].value == b"1"

        rev = t.revision
        await c.put("c/a", b"")
        await c.put("c/b", b"")
        # every key under c/ created at or before rev? no: two came later
        assert not (await c.txn([Compare.create("c/", "<", rev + 1, prefix=True)])).succeeded
        assert (await c.txn([Compare.create("c/", "<", rev + 3, prefix=True)])).succeeded
        t = await c.txn(
            [Compare.value("x", "==", b"1"), Compare.lease("x", "==", 0), Compare.mod("x", "<", rev + 1)],
            [Op.delete("c/", prefix=True, prev_kv=True), Op.get("c/", prefix=True, count_only=True)],
        )
        assert t.succeeded
        deleted, count = t.responses
        assert isinstance(deleted, DeleteResult) and deleted.deleted == 2
        assert isinstance(count, RangeResult) and count.count == 0
        assert not (await c.txn([Compare.value("x", "!=", b"1")])).succeeded


@needs_etcd
async def test_lease_revoke_is_seen_by_a_watch(etcd1: EtcdLab, request: pytest.FixtureRequest) -> None:
    async with EtcdClient(etcd1.endpoints, namespace=ns_of(request)) as c:
        lease = await c.lease_grant(30)
        put = await c.put("e/1", b"v", lease=lease.id)
        async with c.watch("e/", prefix=True, start_revision=put.revision, prev_kv=True) as w:
            await c.lease_revoke(lease.id)
            events = await collect(w, 2)
        assert [(e.type, e.kv.key) for e in events] == [(EventType.PUT, b"e/1"), (EventType.DELETE, b"e/1")]
        assert events[1].prev_kv is not None and events[1].prev_kv.value == b"v"


@needs_etcd
async def test_watch_from_a_revision_gets_exactly_the_later_events(
    etcd1: EtcdLab, request: pytest.FixtureRequest
) -> None:
    async with EtcdClient(etcd1.endpoints, namespace=ns_of(request)) as c:
        revs = [(await c.put(f"w/{i}", str(i))).revision for i in range(10)]
        await c.delete("w/0")
        await c.put("elsewhere", b"")
        async with c.watch("w/", prefix=True, start_revision=revs[4] + 1) as w:
            events = await collect(w, 6)
        assert [(e.type, e.kv.key, e.revision) for e in events] == [
            *((EventType.PUT, f"w/{i}".encode(), revs[i]) for i in range(5, 10)),
            (EventType.DELETE, b"w/0", revs[9] + 1),
        ]
        # filters, and a watch "from now" with progress notifications
        async with c.watch("w/", prefix=True, filters=["noput"], progress_notify=True) as w:
            batch = await anext(w)  # a periodic progress notification (300 ms in FAST)
            assert batch.progress and batch.revision >= revs[9] + 2
            await c.put("w/1", b"again")
            await c.delete("w/1")
            await w.request_progress()
            got: list[Event] = []
            async with asyncio.timeout(5):
                async for batch in w:
                    got.extend(batch.events)
                    if got:
                        break
            assert [(e.type, e.kv.key) for e in got] == [(EventType.DELETE, b"w/1")]


@needs_etcd
async def test_closing_the_client_ends_its_watches(etcd1: EtcdLab, request: pytest.FixtureRequest) -> None:
    c = EtcdClient(etcd1.endpoints, namespace=ns_of(request))
    w = c.watch("k")
    got: list[Event] = []

    async def follow() -> None:
        async for batch in w:
            got.extend(batch.events)

    task = asyncio.create_task(follow())
    await eventually(lambda: w.next_revision > 0, "the watch is created")  # it watches from now on
    await c.put("k", b"1")
    await eventually(lambda: got, "the watch sees the put")
    await c.close()
    await asyncio.wait_for(task, 5)  # ends, no error
    assert [e.kv.value for e in got] == [b"1"]


@needs_etcd
async def test_range_above_grpc_default_receive_limit(etcd1: EtcdLab, request: pytest.FixtureRequest) -> None:
    async with EtcdClient(etcd1.endpoints, namespace=ns_of(request)) as c:
        blob = bytes(1024 * 1024)
        for i in range(5):
            await c.put(f"big/{i}", blob)
        r = await c.range("big/", prefix=True)
        assert len(r.kvs) == 5 and sum(len(k.value) for k in r.kvs) > 4 * 1024 * 1024


@needs_etcd
async def test_compaction_surfaces_with_the_compact_revision(
    etcd1: EtcdLab, request: pytest.FixtureRequest
) -> None:
    async with EtcdClient(etcd1.endpoints, namespace=ns_of(request)) as c:
        revs = [(await c.put("z", str(i))).revision for i in range(5)]
        await c.compact(revs[3])
        with pytest.raises(EtcdCompacted) as ei:
            async with c.watch("z", start_revision=revs[1]) as w:
                await anext(w)
        assert ei.value.compact_revision == revs[3]
        with pytest.raises(EtcdCompacted):
            await c.get("z", revision=revs[1])
        # from the compact revision on, history is still there
        async with c.watch("z", start_revision=revs[3]) as w:
            events = await collect(w, 2)
        assert [e.kv.value for e in events] == [b"3", b"4"]


@needs_etcd
async def test_https_with_a_client_certificate(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    with EtcdLab(tmp_path / "etcd", 1, tls=tls) as lab:
        assert lab.endpoints[0].startswith("https://127.0.0.1:")
        async with EtcdClient(lab.endpoints, tls=TLSFiles(tls.ca, tls.client_cert, tls.client_key)) as c:
            await c.put("k", "v")
            kv = await c.get("k")
            assert kv is not None and kv.value == b"v"
        # the member requires a client certificate: without one, no endpoint answers
        async with EtcdClient(lab.endpoints, tls=TLSFiles(ca=tls.ca), timeout=1.0, connect_timeout=0.3) as c:
            with pytest.raises(EtcdUnavailable):
                await c.get("k")


@needs_etcd
async def test_etcd_down_then_back_the_watch_catches_up(tmp_path: Path) -> None:
    with EtcdLab(tmp_path, 1, extra_args=FAST) as lab:
        async with EtcdClient(lab.endpoints, timeout=1.0, connect_timeout=0.3) as c:
            before = (await c.put("k", b"0")).revision
            w = c.watch("k", start_revision=before, give_up_after=None)  # keeps trying while etcd is down
            seen: list[Event] = []

            async def follow() -> None:
                async for batch in w:
                    seen.extend(batch.events)

            task = asyncio.create_task(follow())
            await eventually(lambda: seen, "the first event")
            lab.kill(lab.members[0])
            with pytest.raises(EtcdUnavailable):
                await c.put("k", b"lost")
            await asyncio.sleep(1.0)  # the watch retries meanwhile
            assert not task.done()
            await asyncio.to_thread(lab.restart, lab.members[0])
            revs = [(await c.put("k", str(i))).revision for i in range(1, 4)]
            await eventually(lambda: len(seen) >= 4, "the watch catches up after the restart")
            await w.aclose()
            await asyncio.wait_for(task, 5)
            assert [e.kv.value for e in seen] == [b"0", b"1", b"2", b"3"]
            assert [e.revision for e in seen] == [before, *revs]
            assert w.reconnects >= 1


async def test_no_endpoint_reachable_raises_within_the_deadline() -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    async with EtcdClient(dead, timeout=1.5, connect_timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="no endpoint answered"):
            await c.put("k", b"v")
        assert 1.4 < time.monotonic() - t0 < 2.5
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            async with c.watch("k") as w:
                await anext(w)
        assert time.monotonic() - t0 < 2.5


@needs_etcd
@pytest.mark.parametrize("victim", ["leader", "follower"])
async def test_failover_keeps_every_acknowledged_put_and_the_watch_whole(etcd3: EtcdLab, victim: str) -> None:
    leader = etcd3.leader()
    first = leader if victim == "leader" else next(m for m in etcd3.members if m is not leader)
    endpoints = [first.client_url] + [m.client_url for m in etcd3.members if m is not first]
    async with EtcdClient(endpoints, namespace="/fo/", timeout=8.0) as c:
        start = (await c.put("marker", b"")).revision
        assert c.current_endpoint == endpoints[0].removeprefix("http://")
        acked: dict[bytes, int] = {}
        unknown: set[bytes] = set()  # puts that raised EtcdIndeterminate: applied or not
        seen: list[Event] = []
        stop = asyncio.Event()

        async def writer(wid: int) -> None:
            i = 0
            while not stop.is_set():
                key = f"p/{wid}/{i}".encode()
                i += 1
                try:
                    r = await c.put(key, key)
                except EtcdIndeterminate:
                    unknown.add(key)
                    continue
                acked[key] = r.revision

        w = c.watch("p/", prefix=True, start_revision=start + 1)

        async def watcher() -> None:
            async for batch in w:
                seen.extend(batch.events)

        wt = asyncio.create_task(watcher())
        writers = [asyncio.create_task(writer(i)) for i in range(4)]
        await eventually(lambda: len(seen) >= 50, "watch sees the first puts")
        etcd3.kill(first)  # kill -9 the member both the puts and the watch use
        killed_at = len(acked)
        await eventually(lambda: len(acked) >= killed_at + 200, "puts go on after the kill", within=20)
        stop.set()
        await asyncio.gather(*writers)
        last = max(acked.values())
        await eventually(lambda: w.next_revision > last, "watch catches up", within=20)
        r = await c.range("p/", prefix=True)
        await eventually(lambda: w.next_revision > r.revision, "watch catches up with the range", within=20)
        await w.aclose()
        await asyncio.wait_for(wt, 5)  # aclose ends the iteration

        assert c.current_endpoint != endpoints[0].removeprefix("http://")
        assert w.reconnects >= 1
        revs = [e.revision for e in seen]
        assert revs == sorted(set(revs)), "watch events out of order or duplicated"
        stored = {k.key: k.mod_revision for k in r.kvs}
        assert {e.kv.key: e.revision for e in seen} == stored, "watch missed or invented an event"
        assert all(stored.get(k) == rev for k, rev in acked.items()), "an acknowledged put is missing"
        assert set(stored) - set(acked) <= unknown
        assert all(e.type == EventType.PUT for e in seen)
