"""Group commit for the etcd store: guarded writes of different affiliates share Txns.

While ``flights`` Txns are in flight, writes queue and go together in the next one. The writes of one
Txn touch disjoint affiliates, so each one's compares mean what they would alone; a shared Txn that
fails reports failure to all of its writes (each then falls back to the store's read path).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from discovery.etcd.client import Compare, EtcdClient, EtcdIndeterminate, Op

__all__ = ["BATCH_BYTES", "BATCH_FLIGHTS", "BATCH_OPS", "GroupCommit"]

# At most BATCH_FLIGHTS shared Txns in flight at once, each with at most BATCH_OPS operations and
# compares (etcd's --max-txn-ops defaults to 128) and BATCH_BYTES of keys and values (etcd's
# --max-request-bytes defaults to 1.5 MiB).
BATCH_FLIGHTS = 1
BATCH_OPS = 128
BATCH_BYTES = 512 * 1024


@dataclass(slots=True)
class _Write:
    """One affiliate's guarded write, waiting for a shared Txn."""

    affiliate: tuple[str, str]
    compares: list[Compare]
    ops: list[Op]
    size: int
    fut: asyncio.Future[bool]


class GroupCommit:
    """Shares Txns between the writes of different affiliates.

    ``applied()`` is the revision the store's mirror has applied; ``wait_applied(revision, count)``
    waits until it reaches ``revision`` (raising when it does not in time); ``spawn`` runs a
    background task the store owns (and cancels at stop)."""

    def __init__(
        self,
        client: EtcdClient,
        applied: Callable[[], int],
        wait_applied: Callable[[int, int], Awaitable[None]],
        spawn: Callable[[Any], None],
        flights: int = BATCH_FLIGHTS,
    ) -> None:
        self.client = client
        self.applied = applied
        self.wait_applied = wait_applied
        self.spawn = spawn
        self.flights = flights
        self.txns = 0  # shared Txns sent, and the writes they carried
        self.writes = 0
        self._queue: list[_Write] = []
        self._in_flight = 0

    async def commit(self, affiliate: tuple[str, str], compares: list[Compare], ops: list[Op]) -> bool:
        """True once the shared Txn succeeded and the mirror applied its revision (one wait per Txn);
        False when a compare failed. Raises the Txn's EtcdError, or what ``wait_applied`` raises."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        size = sum(len(o.key) + len(o.value) for o in ops) + sum(len(c.key) for c in compares)
        self._queue.append(_Write(affiliate, compares, ops, size, fut))
        if self._in_flight < self.flights:
            self._in_flight += 1
            self.spawn(self._flush())
        return await fut

    def fail_all(self, err: Exception) -> None:
        """Answer every queued write with ``err`` (the store is stopping)."""
        for w in self._queue:
            if not w.fut.done():
                w.fut.set_exception(err)
        self._queue.clear()

    def _take(self) -> list[_Write]:
        """The next shared Txn's writes, in arrival order, within the limits, one per affiliate."""
        batch: list[_Write] = []
        rest: list[_Write] = []
        seen: set[tuple[str, str]] = set()
        n_ops = n_cmp = size = 0
        for w in self._queue:
            if batch and (
                w.affiliate in seen
                or n_ops + len(w.ops) > BATCH_OPS
                or n_cmp + len(w.compares) > BATCH_OPS
                or size + w.size > BATCH_BYTES
            ):
                rest.append(w)
                continue
            batch.append(w)
            seen.add(w.affiliate)
            n_ops += len(w.ops)
            n_cmp += len(w.compares)
            size += w.size
        self._queue = rest
        return batch

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                self.txns += 1
                self.writes += len(batch)
                try:
                    if len(batch) == 1:
                        res = await self.client.txn(batch[0].compares, batch[0].ops)
                    else:
                        res = await self.client.txn(
                            [c for w in batch for c in w.compares], [o for w in batch for o in w.ops]
                        )
                except BaseException as e:
                    err = e if isinstance(e, Exception) else EtcdIndeterminate("registry store stopping")
                    _answer(batch, error=err)
                    if not isinstance(e, Exception):
                        raise
                    continue
                if res.succeeded and self.applied() < res.revision:
                    self.spawn(self._ack(batch, res.revision))
                    continue
                _answer(batch, result=res.succeeded)
        finally:
            self._in_flight -= 1

    async def _ack(self, batch: list[_Write], revision: int) -> None:
        """Answer a committed shared Txn's writes once the mirror applied ``revision``: one wait (and
        one timeout) per Txn instead of one per write."""
        try:
            await self.wait_applied(revision, len(batch))
        except BaseException as e:
            _answer(
                batch, error=e if isinstance(e, Exception) else EtcdIndeterminate("registry store stopped")
            )
            if not isinstance(e, Exception):
                raise
            return
        _answer(batch, result=True)


def _answer(batch: list[_Write], *, result: bool = False, error: Exception | None = None) -> None:
    for w in batch:
        if w.fut.done():
            continue
        if error is not None:
            w.fut.set_exception(error)
        else:
            w.fut.set_result(result)
