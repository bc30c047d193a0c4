"""The etcd store's fast path (issue 15): an update of an affiliate the mirror knows is one guarded Txn
planned on the mirror's view (no read first), shared with other affiliates' writes; a stale view, a
lost compare or a refused validation falls back to the read path, so the results are the read path's."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from discovery.etcd.client import EtcdClient
from discovery.limits import Limits
from discovery.server.etcdkeys import affiliate_key
from discovery.server.etcdstore import EtcdBackend
from discovery.server.state import RegistryError
from spanutil.etcdlab import EtcdLab, etcd_binary

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed")
CID = "fast-cluster"
EP = [bytes([i]) * 16 for i in range(1, 9)]


async def _stored(b: EtcdBackend, aid: str) -> tuple[bytes, tuple[bytes, ...]] | None:
    views = {v.id: v for v in await b.list(CID)}
    v = views.get(aid)
    return None if v is None else (v.data, v.endpoints)


async def test_a_known_affiliate_is_updated_without_a_read(replicas) -> None:
    (a, b) = await replicas(2)
    assert await a.update(CID, "x", b"v1", [EP[0]], 30)
    assert (a.fast_updates, a.slow_updates) == (0, 1)  # new: read first (cluster limit)
    for i in range(2, 6):
        assert await a.update(CID, "x", f"v{i}".encode(), [EP[0], EP[1]], 30)
    assert a.fast_updates == 4 and a.slow_updates == 1
    # read-your-writes here, and on the other replica through etcd
    assert [v.data for v in a.mirror.list(CID)] == [b"v5"]
    assert await _stored(b, "x") == (b"v5", (EP[0], EP[1]))
    # an unchanged refresh writes nothing
    rev = (await a.client.range("c/", prefix=True)).revision
    assert await a.update(CID, "x", b"v5", [EP[0], EP[1]], 30) is False
    assert (await a.client.range("c/", prefix=True)).revision == rev


async def test_a_stale_view_falls_back_to_the_read_path(replicas) -> None:
    (a, b) = await replicas(2)
    assert await a.update(CID, "x", b"v1", [EP[0]], 30)
    old = a._known[(CID, "x")]
    stale = dataclasses.replace(old, endpoints=dict(old.endpoints))
    assert await b.update(CID, "x", b"v2", [EP[0], EP[1]], 30)
    await a._barrier()
    # as if a's mirror had not applied b's write yet
    a._known[(CID, "x")] = stale
    slow = a.slow_updates
    assert await a.update(CID, "x", b"v3", [EP[0], EP[2]], 30)
    assert a.slow_updates == slow + 1
    assert await _stored(b, "x") == (b"v3", (EP[0], EP[1], EP[2]))


async def test_a_stale_view_of_a_deleted_affiliate_recreates_it(replicas) -> None:
    (a, b) = await replicas(2)
    assert await a.update(CID, "x", b"v1", [EP[0]], 30)
    old = a._known[(CID, "x")]
    stale = dataclasses.replace(old, endpoints=dict(old.endpoints))
    assert await b.delete(CID, "x")
    await a._barrier()
    a._known[(CID, "x")] = stale  # a still believes x is there, unchanged
    assert a._known_snap(CID, "x") is not None
    fast, slow = a.fast_updates, a.slow_updates
    assert await a.update(CID, "x", b"v1", [EP[0]], 30) is True  # not an acknowledged no-op
    assert (a.fast_updates, a.slow_updates) == (fast, slow + 1)
    assert await _stored(b, "x") == (b"v1", (EP[0],))


async def test_endpoint_limit_is_exact_when_replicas_race_on_one_affiliate(replicas) -> None:
    reps = await replicas(2, limits=Limits(endpoints_per_affiliate_max=4))
    assert await reps[0].update(CID, "x", b"d", [EP[0]], 30)
    for r in reps:
        await r._barrier()

    async def add(i: int) -> bool:
        try:
            await reps[i % 2].update(CID, "x", b"d", [EP[0], EP[i]], 30)
            return True
        except RegistryError:
            return False

    ok = await asyncio.gather(*(add(i) for i in range(1, 8)))
    stored = await _stored(reps[0], "x")
    assert stored is not None and len(stored[1]) == 4 and sum(ok) == 3
    assert {EP[i] for i in range(1, 8) if ok[i - 1]} | {EP[0]} == set(stored[1])


async def test_concurrent_writes_share_txns_one_per_affiliate(replicas, etcd: EtcdLab) -> None:
    (a, b) = await replicas(2)
    aids = [f"n{i}" for i in range(40)]
    await asyncio.gather(*(a.update(CID, aid, b"0", [EP[0]], 30) for aid in aids))
    shared = a.commits.txns, a.commits.writes
    # two updates of the same affiliate at once, and many affiliates
    await asyncio.gather(
        *(a.update(CID, aid, f"{aid}-1".encode(), [EP[0]], 30) for aid in aids),
        a.update(CID, "n0", b"n0-2", [EP[0]], 30),
    )
    txns, writes = a.commits.txns - shared[0], a.commits.writes - shared[1]
    assert writes >= 40 and txns < writes
    got = {v.id: v.data for v in await b.list(CID)}
    assert got["n0"] in (b"n0-1", b"n0-2")
    assert all(got[aid] == f"{aid}-1".encode() for aid in aids[1:])
    async with EtcdClient(etcd.endpoints, namespace=a.client.namespace) as c:
        kv = await c.get(affiliate_key(CID, "n1"))
        assert kv is not None and kv.value == b"n1-1"
