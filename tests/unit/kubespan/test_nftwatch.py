"""The nftables watch's pure part: nf_tables notices parsed from bytes, and which transactions count.

The messages are built here as the kernel lays them out (nlmsghdr, nfgenmsg, attributes padded to 4);
the real socket is exercised in tests/integration/test_nftwatch_netns.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading

import pytest

from kubespan.dataplane import nftwatch
from kubespan.dataplane.links import NetlinkEvent
from kubespan.dataplane.nftwatch import (
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFT_MSG_GETGEN,
    NFT_MSG_NEWGEN,
    NftWatch,
    Notice,
    TableChanges,
    parse_notices,
)

NFPROTO_IPV4 = 2
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWRULE, NFT_MSG_NEWSETELEM = 0, 2, 6, 12


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def nlmsg(msg: int, family: int, attrs: bytes, subsys: int = NFNL_SUBSYS_NFTABLES) -> bytes:
    body = bytes([family, 0, 0, 0]) + attrs
    return struct.pack("=IHHII", 16 + len(body), subsys << 8 | msg, 0, 0, 0) + body


def obj(msg: int, table: str, family: int = NFPROTO_INET) -> bytes:
    return nlmsg(msg, family, nla(1, table.encode() + b"\0") + nla(2, b"chain\0"))


def gen(generation: int, task: int, name: str) -> bytes:
    attrs = nla(1, generation.to_bytes(4, "big")) + nla(2, task.to_bytes(4, "big"))
    return nlmsg(NFT_MSG_NEWGEN, 0, attrs + nla(3, name.encode() + b"\0"))


def test_object_and_generation_notices_are_parsed() -> None:
    data = (
        obj(NFT_MSG_NEWRULE, "kubespan") + obj(NFT_MSG_DELTABLE, "other", NFPROTO_IPV4) + gen(7, 4242, "nft")
    )
    assert list(parse_notices(data)) == [
        Notice(NFPROTO_INET, table="kubespan"),
        Notice(NFPROTO_IPV4, table="other"),
        Notice(0, task=4242, task_name="nft"),
    ]


def test_other_subsystems_queries_and_damaged_messages_are_skipped() -> None:
    ctnetlink = nlmsg(0, NFPROTO_INET, nla(1, b"kubespan\0"), subsys=1)
    getgen = nlmsg(NFT_MSG_GETGEN, 0, b"")
    no_table = nlmsg(NFT_MSG_NEWTABLE, NFPROTO_INET, nla(2, b"x\0"))
    assert list(parse_notices(ctnetlink + getgen + no_table)) == []
    whole = obj(NFT_MSG_NEWSETELEM, "kubespan")
    assert list(parse_notices(whole[:-3])) == []  # the header claims more than arrived
    assert list(parse_notices(whole[:10])) == []  # not even a header
    bad_attr = nlmsg(NFT_MSG_NEWTABLE, NFPROTO_INET, struct.pack("=HH", 200, 1) + b"kubespan")
    assert list(parse_notices(bad_attr)) == []  # an attribute longer than its message: no table
    assert list(parse_notices(whole + b"\x00" * 8)) == [Notice(NFPROTO_INET, table="kubespan")]


def feed(changes: TableChanges, data: bytes) -> list[str]:
    return [e.detail for n in parse_notices(data) if (e := changes.feed(n)) is not None]


def test_a_foreign_transaction_on_our_table_is_one_event_naming_who() -> None:
    changes = TableChanges("kubespan")
    batch = obj(NFT_MSG_NEWSETELEM, "kubespan") * 3 + gen(9, 1, "nft")
    assert feed(changes, batch) == ["3 change(s) to table kubespan by nft (task 1)"]
    # the count starts again with the next transaction
    assert feed(changes, obj(NFT_MSG_DELTABLE, "kubespan") + gen(10, 1, "nft")) == [
        "1 change(s) to table kubespan by nft (task 1)"
    ]


def test_transactions_that_do_not_concern_us_are_not_events() -> None:
    changes = TableChanges("kubespan")
    assert feed(changes, obj(NFT_MSG_NEWRULE, "other") + gen(3, 1, "nft")) == []  # another table
    assert feed(changes, obj(NFT_MSG_NEWRULE, "kubespan", NFPROTO_IPV4) + gen(4, 1, "nft")) == []  # family
    assert feed(changes, gen(5, 1, "nft")) == []  # a commit that touched nothing of ours


def test_our_own_writes_from_any_thread_are_not_events() -> None:
    changes = TableChanges("kubespan")
    comm = open("/proc/self/comm").read().rstrip("\n")  # what the kernel names our tasks
    assert feed(changes, obj(NFT_MSG_NEWSETELEM, "kubespan") + gen(1, os.getpid(), comm)) == []
    # our id with another name: not us (a pid namespace's ids are not the kernel's)
    assert feed(changes, obj(NFT_MSG_NEWSETELEM, "kubespan") + gen(3, os.getpid(), "nft")) == [
        f"1 change(s) to table kubespan by nft (task {os.getpid()})"
    ]
    ids: list[int] = []
    started, hold = threading.Event(), threading.Event()

    def work() -> None:
        ids.append(threading.get_native_id())
        started.set()
        hold.wait(5)

    worker = threading.Thread(target=work)
    worker.start()
    try:
        assert started.wait(5)
        # libnftables runs in a worker thread: the kernel names that thread
        assert feed(changes, obj(NFT_MSG_NEWSETELEM, "kubespan") + gen(2, ids[0], comm)) == []
    finally:
        hold.set()
        worker.join()


async def test_the_watch_reports_resyncs_once_logged_then_events(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(nftwatch, "RETRY_DELAY", 0.001)
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    opens = [PermissionError(1, "Operation not permitted")] * 2 + [ours]

    def open_() -> socket.socket:
        got = opens.pop(0)
        if isinstance(got, BaseException):
            raise got
        return got

    monkeypatch.setattr(NftWatch, "_open", staticmethod(open_))
    events: asyncio.Queue[NetlinkEvent] = asyncio.Queue()
    ready = asyncio.Event()
    task = asyncio.create_task(NftWatch("kubespan").watch(events.put_nowait, ready=ready))
    try:
        for _ in range(2):
            ev = await asyncio.wait_for(events.get(), 2)
            assert (ev.kind, ev.detail) == ("resync", "nftables watch: [Errno 1] Operation not permitted")
        await asyncio.wait_for(ready.wait(), 2)
        warnings = [r for r in caplog.records if "nftables watch failed" in r.getMessage()]
        assert len(warnings) == 1, "the same failure is logged once"
        kernel.send(obj(NFT_MSG_NEWSETELEM, "kubespan") + gen(11, 1, "nft"))
        ev = await asyncio.wait_for(events.get(), 2)
        assert (ev.kind, ev.detail) == ("nft", "1 change(s) to table kubespan by nft (task 1)")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        kernel.close()
