"""Resource state: versions, no-op writes, owners, optimistic updates, copies, queries, teardown."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from machined.state import (
    AlreadyExistsError,
    ConflictError,
    EventType,
    FinalizersPendingError,
    LabelOp,
    LabelQuery,
    LabelTerm,
    NotFoundError,
    OwnerConflictError,
    Phase,
    PhaseConflictError,
    Resource,
    State,
)

NS, T = "test", "Things.test.dev"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, s: float = 1) -> None:
        self.now += timedelta(seconds=s)


def thing(id: str, spec: dict | None = None, **labels: str) -> Resource:
    return Resource.new(NS, T, id, {"v": 0} if spec is None else spec, labels=labels)


def drain(w) -> list:
    out = []
    while w.pending():
        out.append(w._q.popleft())
    return out


async def test_versions_timestamps_and_owner():
    clock = Clock()
    s = State(clock=clock)
    r = thing("a")
    await s.create(r, owner="ctrl")
    assert (r.version, r.metadata.owner, r.metadata.phase) == (1, "ctrl", Phase.RUNNING)
    created = r.metadata.created
    clock.tick()
    r.spec["v"] = 1
    await s.update(r, owner="ctrl")
    clock.tick()
    r.spec["v"] = 2
    await s.update(r, owner="ctrl")
    got = await s.get(NS, T, "a")
    assert got.version == 3 and got.spec == {"v": 2}
    assert got.metadata.created == created and got.metadata.updated == clock.now
    data = got.metadata.to_data()
    assert data["version"] == "3" and data["owner"] == "ctrl"
    assert data["created"] == "2026-01-01T00:00:00Z"


async def test_recreated_resource_starts_at_version_one():
    s = State()
    r = thing("a")
    await s.create(r, owner="c")
    r.spec["v"] = 9
    await s.update(r, owner="c")
    await s.destroy(NS, T, "a", owner="c")
    r2 = thing("a")
    await s.create(r2, owner="c")
    assert (await s.get(NS, T, "a")).version == 1


async def test_noop_writes_produce_no_event_and_keep_version():
    clock = Clock()
    s = State(clock=clock)
    r = thing("a", {"v": 1, "nested": {"l": [1, 2]}}, role="x")
    await s.create(r, owner="c")
    w = s.watch(NS, T, bootstrap=False)
    clock.tick()
    same = thing("a", {"v": 1, "nested": {"l": [1, 2]}}, role="x")
    await s.update(same, owner="c")
    await s.modify(thing("a"), lambda res: None, owner="c")
    await s.modify(thing("a"), lambda res: res.spec.update(v=1), owner="c")
    assert w.pending() == 0
    got = await s.get(NS, T, "a")
    assert got.version == 1 and got.metadata.updated == got.metadata.created
    assert same.version == 1  # the caller's object learns the stored version
    # a label change or an annotation change is a change
    same.metadata.labels["role"] = "y"
    await s.update(same, owner="c")
    same.metadata.annotations["note"] = "n"
    await s.update(same, owner="c")
    evs = drain(w)
    assert [(e.type, e.resource.version) for e in evs] == [(EventType.UPDATED, 2), (EventType.UPDATED, 3)]


async def test_writes_by_non_owner_are_refused_with_a_clear_error():
    s = State()
    await s.create(thing("a"), owner="owner-ctrl")
    other = await s.get(NS, T, "a")
    other.spec["v"] = 5
    with pytest.raises(OwnerConflictError, match=r"owned by 'owner-ctrl': update by 'intruder' refused"):
        await s.update(other, owner="intruder")
    with pytest.raises(OwnerConflictError, match="modify by 'intruder'"):
        await s.modify(thing("a"), lambda r: r.spec.update(v=7), owner="intruder")
    with pytest.raises(OwnerConflictError, match="destroy by 'intruder'"):
        await s.destroy(NS, T, "a", owner="intruder")
    with pytest.raises(OwnerConflictError, match="teardown by 'intruder'"):
        await s.teardown(NS, T, "a", owner="intruder")
    got = await s.get(NS, T, "a")
    assert got.version == 1 and got.spec == {"v": 0} and got.metadata.phase is Phase.RUNNING
    # the metadata owner in the object passed is not a way around the check
    other.metadata.owner = "intruder"
    with pytest.raises(OwnerConflictError):
        await s.update(other, owner="")


async def test_update_is_optimistic_on_version():
    s = State()
    await s.create(thing("a"), owner="c")
    one = await s.get(NS, T, "a")
    two = await s.get(NS, T, "a")
    one.spec["v"] = 1
    await s.update(one, owner="c")
    two.spec["v"] = 2
    with pytest.raises(ConflictError, match="stored 2, update based on 1"):
        await s.update(two, owner="c")
    blind = thing("a", {"v": 3})  # version 0: unconditional
    await s.update(blind, owner="c")
    assert (await s.get(NS, T, "a")).spec == {"v": 3}


async def test_create_get_destroy_errors():
    s = State()
    with pytest.raises(NotFoundError, match=r"test/Things\.test\.dev/a doesn't exist"):
        await s.get(NS, T, "a")
    assert await s.find(NS, T, "a") is None
    await s.create(thing("a"), owner="c")
    with pytest.raises(AlreadyExistsError, match="already exists"):
        await s.create(thing("a"), owner="c")
    with pytest.raises(NotFoundError):
        await s.update(thing("b"), owner="c")
    with pytest.raises(NotFoundError):
        await s.destroy(NS, T, "b", owner="c")
    with pytest.raises(ValueError, match="required"):
        await s.create(Resource.new(NS, T, "", {}), owner="c")


async def test_reads_are_copies_and_caller_objects_are_independent():
    s = State()
    r = thing("a", {"l": [1]})
    await s.create(r, owner="c")
    r.spec["l"].append(2)  # the state stored its own copy
    got = await s.get(NS, T, "a")
    assert got.spec == {"l": [1]}
    got.spec["l"].append(3)
    got.metadata.labels["x"] = "y"
    again = await s.get(NS, T, "a")
    assert again.spec == {"l": [1]} and again.metadata.labels == {}
    listed = await s.list(NS, T)
    listed[0].spec["l"].clear()
    assert (await s.get(NS, T, "a")).spec == {"l": [1]}


async def test_update_with_a_watch_snapshot_is_refused():
    s = State()
    w = s.watch(NS, T, bootstrap=False)
    await s.create(thing("a"), owner="c")
    ev = await anext(w)
    ev.resource.spec["v"] = 99  # the mistake: changing a shared snapshot...
    with pytest.raises(ValueError, match="copy"):
        await s.update(ev.resource, owner="c")  # ...is caught when written back
    ok = ev.resource.copy()
    ok.spec["v"] = 100
    await s.update(ok, owner="c")


async def test_modify_creates_then_updates_and_accepts_async_fn():
    s = State()

    def bump(r: Resource) -> None:
        r.spec["v"] = r.spec.get("v", 0) + 1

    out = await s.modify(thing("a", {"v": 10}), bump, owner="c")
    assert out.version == 1 and out.spec == {"v": 11} and out.metadata.owner == "c"
    out.spec["v"] = 1000  # a copy: the state is unaffected
    assert (await s.get(NS, T, "a")).spec == {"v": 11}

    async def abump(r: Resource) -> Resource:
        await asyncio.sleep(0)
        r.spec["v"] += 1
        return r

    out = await s.modify(thing("a"), abump, owner="c")
    assert out.version == 2 and (await s.get(NS, T, "a")).spec == {"v": 12}


async def test_modify_retries_when_an_async_fn_races_another_writer():
    s = State()
    await s.create(thing("a", {"v": 0, "other": 0}), owner="c")
    calls = 0

    async def slow(r: Resource) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        r.spec["v"] += 1

    async def racer() -> None:
        await asyncio.sleep(0.001)
        await s.modify(thing("a"), lambda r: r.spec.update(other=1), owner="c")

    await asyncio.gather(s.modify(thing("a"), slow, owner="c"), racer())
    got = await s.get(NS, T, "a")
    assert got.spec == {"v": 1, "other": 1}  # neither write was lost
    assert calls == 2 and got.version == 3


async def test_list_with_label_queries_and_id_regexp():
    s = State()
    await s.create(thing("node-b", role="worker", zone="a"), owner="c")
    await s.create(thing("node-a", role="controlplane", zone="b"), owner="c")
    await s.create(thing("node-c", role="worker", zone="c", draining="yes"), owner="c")
    await s.create(thing("other-1", role="worker"), owner="c")

    async def ids(**kw) -> list[str]:
        return [r.id for r in await s.list(NS, T, **kw)]

    assert await ids() == ["node-a", "node-b", "node-c", "other-1"]
    assert await ids(labels={"role": "worker"}) == ["node-b", "node-c", "other-1"]
    assert await ids(labels="role=worker,!draining") == ["node-b", "other-1"]
    assert await ids(labels="zone in (a, b)") == ["node-a", "node-b"]
    assert await ids(labels="zone notin (a,b)") == ["node-c", "other-1"]
    assert await ids(labels="role!=worker") == ["node-a"]
    assert await ids(labels="draining") == ["node-c"]
    assert await ids(labels=LabelQuery.of([LabelTerm("zone", LabelOp.IN, ("c",))])) == ["node-c"]
    assert await ids(id_regexp="^node-[ab]$") == ["node-a", "node-b"]
    assert await ids(id_regexp="1") == ["other-1"]  # searched, not anchored
    assert await ids(labels={"role": "worker"}, id_regexp="^node") == ["node-b", "node-c"]
    assert await s.list(NS, "Nothing.test.dev") == []


@pytest.mark.parametrize("bad", ["a=b,", "a b", "in (x)", "=v"])
def test_bad_label_selectors_are_rejected(bad):
    with pytest.raises(ValueError, match="label selector"):
        LabelQuery.parse(bad)


async def test_teardown_and_finalizers():
    s = State()
    await s.create(thing("a"), owner="c")
    w = s.watch(NS, T, bootstrap=False)
    await s.add_finalizer(NS, T, "a", "consumer")
    assert await s.teardown(NS, T, "a", owner="c") is False
    got = await s.get(NS, T, "a")
    assert got.metadata.phase is Phase.TEARING_DOWN and got.metadata.finalizers == ["consumer"]
    with pytest.raises(FinalizersPendingError, match="consumer"):
        await s.destroy(NS, T, "a", owner="c")
    with pytest.raises(PhaseConflictError, match="tearing down"):
        await s.add_finalizer(NS, T, "a", "late")
    assert await s.teardown(NS, T, "a", owner="c") is False  # idempotent: no second event
    await s.remove_finalizer(NS, T, "a", "consumer")
    assert await s.teardown(NS, T, "a", owner="c") is True
    await s.destroy(NS, T, "a", owner="c")
    evs = drain(w)
    assert [(e.type, e.resource.version, e.resource.metadata.phase) for e in evs] == [
        (EventType.UPDATED, 2, Phase.RUNNING),
        (EventType.UPDATED, 3, Phase.TEARING_DOWN),
        (EventType.UPDATED, 4, Phase.TEARING_DOWN),
        (EventType.DESTROYED, 4, Phase.TEARING_DOWN),
    ]


async def test_update_keeps_finalizers_and_phase():
    s = State()
    r = thing("a")
    await s.create(r, owner="c")
    await s.add_finalizer(NS, T, "a", "f")
    await s.teardown(NS, T, "a", owner="c")
    r = await s.get(NS, T, "a")
    r.metadata.finalizers = []  # not a way to drop finalizers
    r.metadata.phase = Phase.RUNNING
    r.spec["v"] = 1
    await s.update(r, owner="c")
    got = await s.get(NS, T, "a")
    assert (
        got.metadata.finalizers == ["f"] and got.metadata.phase is Phase.TEARING_DOWN and got.spec == {"v": 1}
    )


@dataclass
class PeerStatusSpec:
    label: str
    endpoint: str
    receive_bytes: int = 0
    address: ipaddress.IPv6Address = field(default_factory=lambda: ipaddress.IPv6Address("fd00::1"))
    allowed: list[str] = field(default_factory=list)
    affiliate: str = field(default="", metadata={"yaml": "affiliateID"})


async def test_dataclass_spec_yaml_and_equality():
    s = State()
    r = Resource.new(NS, T, "k", PeerStatusSpec("n1", "1.2.3.4:51820", allowed=["10.0.0.0/8"], affiliate="x"))
    await s.create(r, owner="c")
    got = await s.get(NS, T, "k")
    assert yaml.safe_load(got.yaml_spec) == {
        "label": "n1",
        "endpoint": "1.2.3.4:51820",
        "receiveBytes": 0,
        "address": "fd00::1",
        "allowed": ["10.0.0.0/8"],
        "affiliateID": "x",
    }
    w = s.watch(NS, T, bootstrap=False)
    await s.update(got, owner="c")  # equal dataclass: no-op
    assert w.pending() == 0
    got.spec.allowed.append("10.1.0.0/16")
    await s.update(got, owner="c")
    assert w.pending() == 1
    doc = yaml.safe_load(got.to_yaml())
    assert doc["metadata"]["version"] == "2" and doc["spec"]["allowed"] == ["10.0.0.0/8", "10.1.0.0/16"]
