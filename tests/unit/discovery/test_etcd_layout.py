"""The etcd store's key layout and group commit, on fakes (the real-etcd tests are integration)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from discovery.etcd.client import Compare, EtcdUnavailable, Op, TxnResult
from discovery.server.etcdkeys import (
    affiliate_key,
    affiliate_prefix,
    cluster_prefix,
    endpoint_prefix,
    escape_id,
    parse_key,
)
from discovery.server.groupcommit import BATCH_OPS, GroupCommit

ODD_IDS = ["plain", "with/slash", "50%", "ünïcode", "a b", "..", "-_.~+=:@!$&'()*,;"]


@pytest.mark.parametrize("cid", ODD_IDS)
@pytest.mark.parametrize("aid", ODD_IDS)
def test_keys_round_trip(cid: str, aid: str) -> None:
    assert "/" not in escape_id(cid)
    assert parse_key(affiliate_key(cid, aid).encode()) == (cid, aid, None)
    ep = bytes(range(7))
    assert parse_key((endpoint_prefix(cid, aid) + ep.hex()).encode()) == (cid, aid, ep)
    assert affiliate_key(cid, aid).startswith(affiliate_prefix(cid))
    assert endpoint_prefix(cid, aid).startswith(cluster_prefix(cid))


@pytest.mark.parametrize(
    "key", [b"l/12", b"s/replica", b"c/x", b"c/x/a", b"c/x/q/y", b"c/x/e/y/zz", b"c/%ff/a/y"]
)
def test_other_or_damaged_keys_are_not_parsed(key: bytes) -> None:
    assert parse_key(key) is None


class FakeClient:
    """Records Txns; each answers after ``gate`` is set, succeeding unless told otherwise."""

    def __init__(self) -> None:
        self.txns: list[tuple[list[Compare], list[Op]]] = []
        self.gate = asyncio.Event()
        self.succeed = True
        self.error: Exception | None = None
        self.revision = 10

    async def txn(self, compare: list[Compare], success: list[Op] = ()) -> TxnResult:  # type: ignore[assignment]
        self.txns.append((list(compare), list(success)))
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.revision += 1
        return TxnResult(self.revision, self.succeed, [])


def _commits(client: FakeClient, applied: list[int]) -> tuple[GroupCommit, set[asyncio.Task[Any]]]:
    tasks: set[asyncio.Task[Any]] = set()

    async def wait_applied(revision: int, count: int) -> None:
        applied.append(revision)

    def spawn(coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    return GroupCommit(client, lambda: 0, wait_applied, spawn), tasks  # type: ignore[arg-type]


def _write(aid: str) -> tuple[tuple[str, str], list[Compare], list[Op]]:
    return (
        ("c", aid),
        [Compare.mod(affiliate_key("c", aid), "==", 1)],
        [Op.put(affiliate_key("c", aid), b"x")],
    )


async def test_writes_queued_behind_a_txn_share_the_next_one() -> None:
    client, applied = FakeClient(), []
    gc, _ = _commits(client, applied)
    first = asyncio.ensure_future(gc.commit(*_write("a")))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(gc.commit(*_write(a))) for a in ("b", "c", "b")]
    await asyncio.sleep(0)
    client.gate.set()
    assert await asyncio.gather(first, *rest) == [True, True, True, True]
    # a alone; then b and c together; the second write of b waits for a Txn of its own.
    assert [len(ops) for _, ops in client.txns] == [1, 2, 1]
    assert (gc.txns, gc.writes) == (3, 4)
    assert applied == [11, 12, 13]  # acknowledged only after the mirror applied each Txn's revision


async def test_a_txn_holds_at_most_batch_ops() -> None:
    client, applied = FakeClient(), []
    gc, _ = _commits(client, applied)
    first = asyncio.ensure_future(gc.commit(*_write("first")))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(gc.commit(*_write(f"n{i}"))) for i in range(BATCH_OPS + 5)]
    await asyncio.sleep(0)
    client.gate.set()
    assert all(await asyncio.gather(first, *rest))
    assert [len(ops) for _, ops in client.txns] == [1, BATCH_OPS, 5]


async def test_a_failed_or_broken_txn_answers_all_its_writes() -> None:
    client, applied = FakeClient(), []
    gc, _ = _commits(client, applied)
    client.succeed = False
    client.gate.set()
    assert await asyncio.gather(gc.commit(*_write("a")), gc.commit(*_write("b"))) == [False, False]
    assert applied == []  # nothing to wait for
    client.error = EtcdUnavailable("down")
    results = await asyncio.gather(gc.commit(*_write("a")), gc.commit(*_write("b")), return_exceptions=True)
    assert all(isinstance(r, EtcdUnavailable) for r in results)


async def test_fail_all_answers_queued_writes() -> None:
    client, applied = FakeClient(), []
    gc, _ = _commits(client, applied)
    first = asyncio.ensure_future(gc.commit(*_write("a")))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(gc.commit(*_write("b")))
    await asyncio.sleep(0)
    gc.fail_all(RuntimeError("stopped"))
    with pytest.raises(RuntimeError, match="stopped"):
        await queued
    client.gate.set()
    assert await first is True
