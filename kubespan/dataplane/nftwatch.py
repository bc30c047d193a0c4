"""Changes to the mesh's nftables table made by anyone but us: the nf_tables netlink notifications.

The kernel multicasts every committed nf_tables change to the NFNLGRP_NFTABLES group of
NETLINK_NETFILTER sockets: one message per object (table, chain, rule, set, element; attribute 1
of each names its table), then one NEWGEN message per transaction with the committing task's id
and name. :class:`NftWatch` reports a transaction that touched our table, unless a thread of this
process committed it (our own writes: libnftables runs in a worker thread, whose id and name the
kernel reports). So the engine repairs a foreign change at once, and reads the table back only as a
safety net while the watch is subscribed (docs/design/affiliate-path.md).

The kernel reports ids as seen from the initial pid namespace. In a container with its own pid
namespace our own writes may not be recognised: each then costs one read-back, as before the
watch. A lost notification (the socket's buffer overran) is a ``resync`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from kubespan.dataplane.links import Callback, NetlinkEvent, notify

log = logging.getLogger("kubespan.dataplane.nftwatch")

NETLINK_NETFILTER: Final = 12
NFNLGRP_NFTABLES: Final = 7
NFNL_SUBSYS_NFTABLES: Final = 10
SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
NFPROTO_INET: Final = 1
# nf_tables message types (nlmsg_type's low byte)
NFT_MSG_NEWGEN: Final = 15
NFT_MSG_GETGEN: Final = 16
NFT_MSG_TRACE: Final = 17
NFTA_OBJECT_TABLE: Final = 1  # NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_SET_TABLE, ...: all 1
NFTA_GEN_ID: Final = 1  # the generation number (not used: the task says whose it was)
NFTA_GEN_PROC_PID: Final = 2
NFTA_GEN_PROC_NAME: Final = 3
NLMSG_HDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA_HDR: Final = struct.Struct("=HH")  # len, type
NFGEN_HDR: Final = 4  # family, version, res_id
RCVBUF: Final = 1 << 20  # a full re-create of a 1000-peer table is ~1000 element notices
RETRY_DELAY: Final = 0.5
RETRY_MAX: Final = 10.0


@dataclass(frozen=True, slots=True)
class Notice:
    """One nf_tables notification: an object change (``table`` set) or a transaction's end."""

    family: int
    table: str | None = None
    task: int | None = None  # NEWGEN only: the committing task
    task_name: str = ""


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    while start + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, start)
        if length < NLA_HDR.size or start + length > end:
            return
        yield kind & 0x3FFF, data[start + NLA_HDR.size : start + length]
        start += (length + 3) & ~3


def parse_notices(data: bytes) -> Iterator[Notice]:
    """The nf_tables notifications in one datagram; anything else (or truncated) is skipped."""
    at = 0
    while at + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, at)
        if length < NLMSG_HDR.size or at + length > len(data):
            return
        body, end = at + NLMSG_HDR.size, at + length
        at += (length + 3) & ~3
        msg = kind & 0xFF
        if (
            kind >> 8 != NFNL_SUBSYS_NFTABLES
            or body + NFGEN_HDR > end
            or msg in (NFT_MSG_GETGEN, NFT_MSG_TRACE)
        ):
            continue
        family = data[body]
        attrs = dict(_attrs(data, body + NFGEN_HDR, end))
        if msg == NFT_MSG_NEWGEN:
            pid = attrs.get(NFTA_GEN_PROC_PID)
            yield Notice(
                family,
                task=int.from_bytes(pid, "big") if pid and len(pid) == 4 else None,
                task_name=attrs.get(NFTA_GEN_PROC_NAME, b"").split(b"\0", 1)[0].decode(errors="replace"),
            )
        elif (name := attrs.get(NFTA_OBJECT_TABLE)) is not None:
            yield Notice(family, table=name.split(b"\0", 1)[0].decode(errors="replace"))


def own_task(task: int | None, name: str) -> bool:
    """Whether the kernel's task (id and name) is one of this process's threads (the main one too).

    The name must match as well: in a pid namespace the kernel's ids are not ours, and one of them
    could be the id of a thread of ours by chance."""
    if task is None:
        return False
    try:
        with open(f"/proc/self/task/{task}/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read().rstrip("\n")
    except OSError:
        return False
    return comm == name


class TableChanges:
    """Notices in, one event per foreign transaction that touched ``table`` (of ``family``) out."""

    def __init__(
        self, table: str, family: int = NFPROTO_INET, own: Callable[[int | None, str], bool] = own_task
    ) -> None:
        """``own``: whether a committing task (id, name) is this process (:func:`own_task` reads
        /proc; the parsing here does no I/O of its own)."""
        self.table, self.family = table, family
        self._own = own
        self._touched = 0

    def feed(self, notice: Notice) -> NetlinkEvent | None:
        if notice.table is not None:
            if notice.table == self.table and notice.family == self.family:
                self._touched += 1
            return None
        touched, self._touched = self._touched, 0
        if not touched or self._own(notice.task, notice.task_name):
            return None
        by = f"{notice.task_name or '?'} (task {notice.task})" if notice.task is not None else "unknown"
        return NetlinkEvent("nft", "changed", f"{touched} change(s) to table {self.table} by {by}")


class NftWatch:
    """Reports foreign changes to one nftables table; ``watch`` runs until cancelled.

    The socket is opened in this process's network namespace (the agent's own).
    """

    def __init__(self, table: str, family: int = NFPROTO_INET) -> None:
        self.table, self.family = table, family

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except BaseException:
            sock.close()
            raise
        return sock

    async def watch(self, callback: Callback, *, ready: asyncio.Event | None = None) -> None:
        """Call ``callback`` per foreign transaction on the table; ``ready`` is set once subscribed.

        A failed socket or lost notifications give a ``resync`` event, then a new subscription.
        """
        loop = asyncio.get_running_loop()
        delay = RETRY_DELAY
        last = ""  # the last failure logged: the same again (no permission, say) is not repeated
        while True:
            try:
                with self._open() as sock:
                    changes = TableChanges(self.table, self.family)
                    if ready is not None:
                        ready.set()
                    delay = RETRY_DELAY
                    while True:
                        data = await loop.sock_recv(sock, 1 << 16)
                        for notice in parse_notices(data):
                            event = changes.feed(notice)
                            if event is not None:
                                await notify(callback, event)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                lost = e.errno == errno.ENOBUFS  # notices were dropped: resubscribe at once
                if not lost and str(e) != last:
                    log.warning("nftables watch failed, retrying (meanwhile the table is read back): %s", e)
                last = str(e)
                await notify(callback, NetlinkEvent("resync", "resync", f"nftables watch: {e}"))
                if not lost:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
