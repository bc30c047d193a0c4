"""Cheap readers of ``/proc`` (and ``/dev/kmsg``) for the diagnostics RPCs.

Every reader takes the proc root as a parameter so tests can point it at a fake tree. Values are
returned as machine API messages, with the kernel's units (``/proc/meminfo`` in kB).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from spanapi.talos.machine import machine_pb2

PROC = Path("/proc")
KMSG = Path("/dev/kmsg")

# /proc/meminfo key -> MemInfo field
_MEMINFO = {
    "MemTotal": "memtotal",
    "MemFree": "memfree",
    "MemAvailable": "memavailable",
    "Buffers": "buffers",
    "Cached": "cached",
    "SwapCached": "swapcached",
    "Active": "active",
    "Inactive": "inactive",
    "Active(anon)": "activeanon",
    "Inactive(anon)": "inactiveanon",
    "Active(file)": "activefile",
    "Inactive(file)": "inactivefile",
    "Unevictable": "unevictable",
    "Mlocked": "mlocked",
    "SwapTotal": "swaptotal",
    "SwapFree": "swapfree",
    "Dirty": "dirty",
    "Writeback": "writeback",
    "AnonPages": "anonpages",
    "Mapped": "mapped",
    "Shmem": "shmem",
    "Slab": "slab",
    "SReclaimable": "sreclaimable",
    "SUnreclaim": "sunreclaim",
    "KernelStack": "kernelstack",
    "PageTables": "pagetables",
    "NFS_Unstable": "nfsunstable",
    "Bounce": "bounce",
    "WritebackTmp": "writebacktmp",
    "CommitLimit": "commitlimit",
    "Committed_AS": "committedas",
    "VmallocTotal": "vmalloctotal",
    "VmallocUsed": "vmallocused",
    "VmallocChunk": "vmallocchunk",
    "HardwareCorrupted": "hardwarecorrupted",
    "AnonHugePages": "anonhugepages",
    "ShmemHugePages": "shmemhugepages",
    "ShmemPmdMapped": "shmempmdmapped",
    "CmaTotal": "cmatotal",
    "CmaFree": "cmafree",
    "HugePages_Total": "hugepagestotal",
    "HugePages_Free": "hugepagesfree",
    "HugePages_Rsvd": "hugepagesrsvd",
    "HugePages_Surp": "hugepagessurp",
    "Hugepagesize": "hugepagesize",
    "DirectMap4k": "directmap4k",
    "DirectMap2M": "directmap2m",
    "DirectMap1G": "directmap1g",
}


def meminfo(proc: Path = PROC) -> machine_pb2.MemInfo:
    out = machine_pb2.MemInfo()
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        field = _MEMINFO.get(key.strip())
        if field is None:
            continue
        try:
            setattr(out, field, int(rest.split()[0]))
        except (IndexError, ValueError):
            continue
    return out


def loadavg(proc: Path = PROC) -> tuple[float, float, float]:
    parts = (proc / "loadavg").read_text().split()
    return float(parts[0]), float(parts[1]), float(parts[2])


_NETDEV_FIELDS = (
    "rx_bytes",
    "rx_packets",
    "rx_errors",
    "rx_dropped",
    "rx_fifo",
    "rx_frame",
    "rx_compressed",
    "rx_multicast",
    "tx_bytes",
    "tx_packets",
    "tx_errors",
    "tx_dropped",
    "tx_fifo",
    "tx_collisions",
    "tx_carrier",
    "tx_compressed",
)


def netdev(proc: Path = PROC) -> tuple[machine_pb2.NetDev, list[machine_pb2.NetDev]]:
    """``(total, devices)`` from ``/proc/net/dev``."""
    devices = []
    total = machine_pb2.NetDev(name="total")
    for line in (proc / "net" / "dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        values = rest.split()
        if len(values) < len(_NETDEV_FIELDS):
            continue
        dev = machine_pb2.NetDev(name=name.strip())
        for f, v in zip(_NETDEV_FIELDS, values, strict=False):
            setattr(dev, f, int(v))
            setattr(total, f, getattr(total, f) + int(v))
        devices.append(dev)
    return total, devices


# --- netstat -------------------------------------------------------------------------------------

_PROTO_FILES = ("tcp", "tcp6", "udp", "udp6", "udplite", "udplite6", "raw", "raw6")
_TCP_LISTEN = 0x0A


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    # the kernel prints each 32-bit word in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.IPv4Address(words) if len(words) == 4 else ipaddress.IPv6Address(words)
    return str(ip), int(port, 16)


def _socket_owners(proc: Path) -> dict[int, tuple[int, str]]:
    """socket inode -> (pid, comm), for every process we may look at."""
    owners: dict[int, tuple[int, str]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            comm = (entry / "comm").read_text().strip()
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(int(target[8:-1]), (pid, comm))
    return owners


def netstat(
    proc: Path = PROC,
    *,
    filter: int = machine_pb2.NetstatRequest.ALL,
    protocols: Iterable[str] = (),
    with_pid: bool = False,
) -> list[machine_pb2.ConnectRecord]:
    """Sockets of the agent's network namespace from ``/proc/net/<proto>`` (all protocols when
    ``protocols`` is empty). LISTENING: TCP in LISTEN, or UDP/raw with no remote address."""
    wanted = [p for p in _PROTO_FILES if not protocols or p in set(protocols)]
    owners = _socket_owners(proc) if with_pid else {}
    out: list[machine_pb2.ConnectRecord] = []
    for proto in wanted:
        try:
            lines = (proc / "net" / proto).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            try:
                lip, lport = _addr(f[1])
                rip, rport = _addr(f[2])
                state = int(f[3], 16)
                txq, rxq = (int(x, 16) for x in f[4].split(":"))
                tr, when = f[5].split(":")
                inode = int(f[9])
            except ValueError:
                continue
            tcp = proto.startswith("tcp")
            listening = (
                state == _TCP_LISTEN if tcp else rport == 0 and ipaddress.ip_address(rip).is_unspecified
            )
            if filter == machine_pb2.NetstatRequest.LISTENING and not listening:
                continue
            if filter == machine_pb2.NetstatRequest.CONNECTED and listening:
                continue
            rec = machine_pb2.ConnectRecord(
                l4proto=proto,
                localip=lip,
                localport=lport,
                remoteip=rip,
                remoteport=rport,
                state=state if state <= 11 else 0,
                txqueue=txq,
                rxqueue=rxq,
                tr=int(tr, 16) if int(tr, 16) <= 4 else 0,
                timerwhen=int(when, 16),
                retrnsmt=int(f[6], 16),
                uid=int(f[7]),
                timeout=int(f[8]),
                inode=inode,
                ref=int(f[10]) if len(f) > 10 and f[10].isdigit() else 0,
                pointer=int(f[11], 16) if len(f) > 11 and re.fullmatch(r"[0-9a-fA-F]+", f[11]) else 0,
            )
            owner = owners.get(inode)
            if owner is not None:
                rec.process.pid, rec.process.name = owner
            out.append(rec)
    return out


# --- dmesg ---------------------------------------------------------------------------------------

_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv")
_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


class KmsgUnavailable(Exception):
    """The kernel log cannot be read (no permission, or no /dev/kmsg); the message says why."""


def format_kmsg(record: bytes) -> str | None:
    """One ``/dev/kmsg`` record as Talos prints it: ``kern:    info: [2024-..]: message``."""
    head, sep, body = record.partition(b";")
    if not sep:
        return None
    try:
        fields = head.decode().split(",")
        prio = int(fields[0])
        usec = int(fields[2])
    except (IndexError, ValueError):
        return None
    msg = body.split(b"\n", 1)[0].decode("utf-8", "replace")
    facility = _FACILITIES[prio >> 3] if (prio >> 3) < len(_FACILITIES) else str(prio >> 3)
    level = _LEVELS[prio & 7]
    return f"{facility:>7}: {level:>7}: [{usec / 1e6:12.6f}]: {msg}"


def open_kmsg(path: Path = KMSG, *, tail: bool = False) -> int:
    """Open the kernel log non-blocking; ``tail`` skips what is already buffered."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        raise KmsgUnavailable(
            f"cannot read the kernel log: {path}: permission denied "
            "(machined needs CAP_SYSLOG, or kernel.dmesg_restrict=0)"
        ) from None
    except OSError as e:
        raise KmsgUnavailable(f"cannot read the kernel log: {path}: {e.strerror or e}") from None
    if tail:
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_END)
    return fd


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def read_kmsg(fd: int, *, follow: bool) -> AsyncIterator[list[str]]:
    """Batches of formatted lines; with ``follow`` it waits for new records until cancelled."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            batch: list[str] = []
            while len(batch) < 256:
                try:
                    rec = os.read(fd, 8192)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EPIPE:  # overwritten while we read: continue at the next record
                        continue
                    if e.errno in (errno.EPERM, errno.EACCES):
                        raise KmsgUnavailable(f"cannot read the kernel log: {e.strerror}") from None
                    raise
                if not rec:
                    break
                line = format_kmsg(rec)
                if line is not None:
                    batch.append(line)
            if batch:
                yield batch
                continue
            if not follow:
                return
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_done, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
    finally:
        os.close(fd)
