"""The registry's store interface (discovery.server.backend): the same semantics on both backends,
the embedded one and etcd (a real single etcd member from spanutil.etcdlab), through the async API the
service awaits (issue 15)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from discovery.limits import Limits
from discovery.server.backend import Backend, EmbeddedBackend
from discovery.server.etcdstore import EtcdBackend
from discovery.server.state import Registry, RegistryError
from discovery.server.storage import Store
from spanutil.etcdlab import EtcdLab

CID = "store-cluster"
E = [bytes([i]) * 16 for i in range(1, 80)]
_prefixes = itertools.count()


async def etcd_backend(lab: EtcdLab, limits: Limits | None = None, prefix: str | None = None) -> EtcdBackend:
    b = EtcdBackend(
        lab.endpoints,
        prefix=prefix or f"/store-test-{next(_prefixes)}/",
        bucket=2,
        limits=limits or Limits(),
        probe_interval=0.2,
    )
    await b.start()
    assert await b.wait_ready(10), b.health()
    return b


@pytest.fixture(params=["embedded", "etcd"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    """Factory: ``await make(limits=None)`` → a started backend of the parametrized kind."""
    made: list[Backend] = []
    stores: list[Store] = []

    async def factory(limits: Limits | None = None) -> Backend:
        if request.param == "embedded":
            store = Store(tmp_path / f"state-{len(stores)}.binpb")
            stores.append(store)
            b: Backend = EmbeddedBackend(Registry(limits or Limits()), store)
        else:
            b = await etcd_backend(request.getfixturevalue("etcd"), limits)
        made.append(b)
        return b

    yield factory
    for b in made:
        await b.stop()
    for s in stores:
        s.close()


def listing(views: list) -> dict[str, tuple[bytes, list[bytes]]]:
    return {v.id: (v.data, list(v.endpoints)) for v in views}


async def pending(sub, n: int = 1, within: float = 5.0) -> list:
    """Wait until ``sub`` has at least ``n`` queued changes; drain them."""
    woken = asyncio.Event()
    sub.waker = woken.set
    async with asyncio.timeout(within):
        while sub.pending < n:
            woken.clear()
            await woken.wait()
    return sub.drain()


async def test_update_merge_list_and_delete(make) -> None:
    b = await make()
    assert await b.update(CID, "a", b"data-1", [E[0]], 600)
    assert not await b.update(CID, "a", b"data-1", [E[0]], 600)  # nothing new
    assert await b.update(CID, "a", None, [E[1]], 600)  # endpoints merge
    assert await b.update(CID, "b", None, [E[0]], 600)  # data-less affiliate
    assert listing(await b.list(CID)) == {"a": (b"data-1", [E[0], E[1]]), "b": (b"", [E[0]])}
    assert await b.update(CID, "a", b"data-2", [], 600)
    assert (await b.list(CID))[0].data == b"data-2"
    assert await b.delete(CID, "a")
    assert not await b.delete(CID, "a")  # idempotent
    assert not await b.delete("never-seen", "x")
    assert listing(await b.list(CID)) == {"b": (b"", [E[0]])}
    assert await b.list("other") == []


async def test_watch_snapshot_then_changes_without_repeats(make) -> None:
    b = await make()
    await b.update(CID, "a", b"x", [E[0]], 600)
    sub = await b.subscribe(CID)
    assert listing(sub.snapshot) == {"a": (b"x", [E[0]])}
    await b.update(CID, "a", b"x", [E[0]], 600)  # identical: nobody is told
    await b.update(CID, "a", None, [E[1]], 600)
    changes = await pending(sub)
    assert [(c.id, c.affiliate.endpoints) for c in changes] == [("a", (E[0], E[1]))]
    await b.delete(CID, "a")
    changes = await pending(sub)
    assert [(c.id, c.affiliate) for c in changes] == [("a", None)]
    await asyncio.sleep(0.05)
    assert sub.pending == 0
    sub.close()


@pytest.mark.parametrize(
    ("args", "field", "needle"),
    [
        (("", "x", None, [], 60), "cluster_id", "is empty"),
        (("c" * 257, "x", None, [], 60), "cluster_id", "257 bytes exceeds the limit of 256"),
        ((CID, "", None, [], 60), "affiliate_id", "is empty"),
        ((CID, "keep", b"z" * 2049, [], 60), "affiliate_data", "2049 bytes exceeds the limit of 2048"),
        ((CID, "keep", b"n", [b"e" * 33], 60), "affiliate_endpoints[0]", "33 bytes exceeds the limit of 32"),
        ((CID, "keep", b"n", [E[0], b"e" * 15], 60), "affiliate_endpoints[1]", "not a multiple of 16"),
        ((CID, "keep", b"n", [], 31 * 60), "ttl", "1860 s exceeds the limit of 1800 s"),
        ((CID, "keep", b"n", E[2:66], 60), "affiliate_endpoints", "65 endpoints exceeds the limit of 64"),
    ],
)
async def test_bad_input_same_error_and_nothing_changes(make, args: tuple, field: str, needle: str) -> None:
    b = await make()
    await b.update(CID, "keep", b"original", [E[0]], 600)
    before = listing(await b.list(CID))
    with pytest.raises(RegistryError) as ei:
        await b.update(*args)
    assert ei.value.field == field and needle in str(ei.value), str(ei.value)
    assert listing(await b.list(CID)) == before


async def test_cluster_and_endpoint_limits(make) -> None:
    b = await make(Limits(affiliates_per_cluster_max=5, endpoints_per_affiliate_max=3))
    for i in range(5):
        await b.update(CID, f"n{i}", b"d", [], 600)
    with pytest.raises(RegistryError) as ei:
        await b.update(CID, "one-too-many", b"d", [], 600)
    assert ei.value.code.name == "RESOURCE_EXHAUSTED" and ei.value.field == "affiliates"
    assert str(ei.value) == "affiliates: the cluster already holds 5 affiliates, the limit is 5"
    await b.update(CID, "n1", b"still fine", [E[0], E[1]], 600)  # an existing one may update
    await b.update(CID, "n1", None, [E[1], E[2]], 600)  # E[1] known: 3 in all
    with pytest.raises(RegistryError) as ei:
        await b.update(CID, "n1", None, [E[3]], 600)
    assert str(ei.value) == "affiliate_endpoints: 4 endpoints exceeds the limit of 3"
    assert len(await b.list(CID)) == 5
    assert list((await b.list(CID))[1].endpoints) == [E[0], E[1], E[2]]
    await b.delete(CID, "n0")
    await b.update(CID, "n5", b"d", [], 600)  # room again
    assert await b.list("other") == []
    assert b.stats()[1] == 5


async def test_ids_with_slashes_and_percent_stay_apart(make) -> None:
    b = await make()
    await b.update("a/b", "c", b"1", [], 600)
    await b.update("a", "b/a/c", b"2", [], 600)
    await b.update("a%2Fb", "c", b"3", [], 600)
    await b.update("ключ", "ä/%", b"4", [], 600)
    assert listing(await b.list("a/b")) == {"c": (b"1", [])}
    assert listing(await b.list("a")) == {"b/a/c": (b"2", [])}
    assert listing(await b.list("a%2Fb")) == {"c": (b"3", [])}
    assert listing(await b.list("ключ")) == {"ä/%": (b"4", [])}
