"""Durable registry state: upstream-format snapshot plus an append-only journal (group-committed).

Every acknowledged update or delete is one CRC-framed journal record written before it is applied;
compaction writes the snapshot atomically and starts a segment whose CHECKPOINT records the
snapshot's length and CRC32, which loading verifies. File layout, record kinds, verification,
replay timing, crash windows and write failures: docs/design/registry-storage.md.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from discovery.server.state import Registry, RegistryError, SnapshotError
from spanutil import fsutil

__all__ = [
    "CompactReport",
    "LoadReport",
    "PendingCompaction",
    "SnapshotDamage",
    "StorageUnavailable",
    "Store",
]

MAGIC = b"\xd5\x1a"
_FRAME = struct.Struct("<2sII")  # magic, payload length, crc32(payload)
FRAME_SIZE = _FRAME.size
MAX_PAYLOAD = 1 << 20

KIND_OPEN = 1
KIND_CHECKPOINT = 2
KIND_UPDATE = 3
KIND_DELETE = 4
KIND_TICK = 5

_HEAD = struct.Struct("<Bd")  # kind, wall time
_UPDATE = struct.Struct("<BddHHIH")  # kind, wall, ttl, len(cluster), len(affiliate), len(data), n endpoints
_DELETE = struct.Struct("<BdHH")  # kind, wall, len(cluster), len(affiliate)
_CHECKPOINT = struct.Struct("<BdQIIII")  # kind, wall, snapshot length, crc32, clusters, affiliates, endpoints
_CHECKPOINT_V1 = struct.Struct("<BdQI")  # kind, wall, snapshot length, snapshot crc32 (no totals)
_U32 = 0xFFFFFFFF
_LENS = [struct.Struct(f"<{n}H") for n in range(65)]
_ID_MAX = 0xFFFF


class StorageUnavailable(OSError):
    """A journal write or fsync failed: what was being recorded was not recorded.

    An ``OSError`` with the underlying ``errno``; :attr:`reason` is the error text for clients and logs.
    """

    @property
    def reason(self) -> str:
        return _errtext(self)


def _errtext(e: OSError) -> str:
    """``No space left on device`` (the errno's text), or the message when there is no errno."""
    if e.errno:
        return os.strerror(e.errno)
    return e.strerror or str(e) or type(e).__name__


class _TornWrite(OSError):
    """A short write: part of a record is in the segment, which must not be appended to again."""


@dataclass(slots=True)
class SnapshotDamage:
    """A snapshot that failed verification at load (it was not loaded); ``message`` is the report."""

    file: str
    found: str  # "damaged", "missing" or "unreadable"
    length: int | None  # what is on disk (None: missing or unreadable)
    crc: int | None
    checkpoint: str  # the newest checkpoint's segment file
    expected_length: int
    expected_crc: int
    expected_totals: tuple[int, int, int] | None  # (clusters, affiliates, endpoints) when written
    written: float  # the checkpoint's wall-clock time
    kept_as: str | None  # where the damaged file was moved
    segments: tuple[int, int] | None  # journal generations replayed instead (first, last)
    clusters: int = 0  # recovered (the registry after loading)
    affiliates: int = 0
    readable: int | None = (
        None  # unexpired affiliates the damaged copy still decodes to (None: nothing decodes)
    )
    lost_readable: int | None = None  # of those, how many no replayed record mentions: lost for sure
    message: str = ""


@dataclass(slots=True)
class LoadReport:
    """What :meth:`Store.load` restored: registry totals after loading, journal records replayed, problems.

    ``snapshot`` is the verification outcome: ``absent`` (no snapshot, none expected), ``verified``
    (matches a journal checkpoint), ``unverified`` (nothing to check it against, loaded as is),
    ``damaged`` / ``missing`` (not loaded; ``damage`` tells, and its message is also in
    ``problems``). ``note`` explains an unverified snapshot or an incomplete compaction.
    """

    clusters: int = 0
    affiliates: int = 0
    endpoints: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)
    snapshot: str = "absent"
    note: str = ""
    damage: SnapshotDamage | None = None


@dataclass(frozen=True, slots=True)
class CompactReport:
    """One compaction: snapshot size in bytes, what it holds, and how long it took (seconds)."""

    size: int
    clusters: int
    affiliates: int
    endpoints: int
    duration: float


class _Record(NamedTuple):
    kind: int
    wall: float
    where: str  # "<file> @<offset>", for problem reports
    cluster_id: str = ""
    affiliate_id: str = ""
    data: bytes = b""
    endpoints: tuple[bytes, ...] = ()
    ttl: float = 0.0
    snapshot: tuple[int, int] = (0, 0)  # CHECKPOINT: (length, crc32)
    totals: tuple[int, int, int] | None = None  # CHECKPOINT: (clusters, affiliates, endpoints) if recorded


class _BadPayload(Exception):
    pass


def _decode_payload(payload: bytes, where: str) -> _Record:
    n = len(payload)
    if n < _HEAD.size:
        raise _BadPayload("payload too short")
    kind, wall = _HEAD.unpack_from(payload)
    if not math.isfinite(wall):
        raise _BadPayload("bad timestamp")
    try:
        if kind == KIND_UPDATE:
            _, _, ttl, lc, la, ld, ne = _UPDATE.unpack_from(payload)
            pos = _UPDATE.size
            lens = struct.unpack_from(f"<{ne}H", payload, pos)
            pos += 2 * ne
            end = pos + lc + la + ld + sum(lens)
            if end != n:
                raise _BadPayload("length mismatch")
            cid = payload[pos : pos + lc].decode()
            pos += lc
            aid = payload[pos : pos + la].decode()
            pos += la
            data = payload[pos : pos + ld]
            pos += ld
            eps = []
            for ln in lens:
                eps.append(payload[pos : pos + ln])
                pos += ln
            return _Record(kind, wall, where, cid, aid, data, tuple(eps), ttl)
        if kind == KIND_DELETE:
            _, _, lc, la = _DELETE.unpack_from(payload)
            pos = _DELETE.size
            if pos + lc + la != n:
                raise _BadPayload("length mismatch")
            cid = payload[pos : pos + lc].decode()
            aid = payload[pos + lc : n].decode()
            return _Record(kind, wall, where, cid, aid)
        if kind == KIND_CHECKPOINT:
            if n == _CHECKPOINT.size:
                _, _, slen, scrc, c, a, e = _CHECKPOINT.unpack(payload)
                return _Record(kind, wall, where, snapshot=(slen, scrc), totals=(c, a, e))
            if n != _CHECKPOINT_V1.size:
                raise _BadPayload("length mismatch")
            _, _, slen, scrc = _CHECKPOINT_V1.unpack(payload)
            return _Record(kind, wall, where, snapshot=(slen, scrc))
        if kind in (KIND_OPEN, KIND_TICK):
            if n != _HEAD.size:
                raise _BadPayload("length mismatch")
            return _Record(kind, wall, where)
    except (struct.error, UnicodeDecodeError) as e:
        raise _BadPayload(type(e).__name__) from None
    raise _BadPayload(f"unknown record kind {kind}")


def _frame_at(buf: bytes, pos: int) -> int:
    """Return the payload length of a valid frame at ``pos``, or -1."""
    if len(buf) - pos < FRAME_SIZE or buf[pos : pos + 2] != MAGIC:
        return -1
    _, length, crc = _FRAME.unpack_from(buf, pos)
    start = pos + FRAME_SIZE
    if length > MAX_PAYLOAD or start + length > len(buf):
        return -1
    if zlib.crc32(buf[start : start + length]) != crc:
        return -1
    return length


def _next_frame(buf: bytes, pos: int) -> int:
    """Offset of the next valid frame at or after ``pos``, or -1."""
    while True:
        pos = buf.find(MAGIC, pos)
        if pos < 0 or _frame_at(buf, pos) >= 0:
            return pos
        pos += 1


def parse_journal(buf: bytes, name: str, problems: list[str]) -> list[_Record]:
    """Decode one journal segment; never raises. Damaged records are reported and skipped."""
    records: list[_Record] = []
    pos, n = 0, len(buf)
    while pos < n:
        length = _frame_at(buf, pos)
        if length < 0:
            nxt = _next_frame(buf, pos + 1)
            if nxt < 0:
                problems.append(
                    f"journal {name}: torn or corrupt tail at offset {pos} ({n - pos} bytes) ignored"
                )
                break
            problems.append(f"journal {name}: damaged record at offset {pos} ({nxt - pos} bytes) skipped")
            pos = nxt
            continue
        start = pos + FRAME_SIZE
        where = f"{name} @{pos}"
        try:
            records.append(_decode_payload(buf[start : start + length], where))
        except _BadPayload as e:
            problems.append(f"journal {where}: malformed record skipped ({e})")
        pos = start + length
    return records


class _Segment:
    __slots__ = ("broken", "closed", "dirty", "fd", "gen", "lock", "needs_dir_sync", "path", "size")

    def __init__(self, fd: int, gen: int, path: Path) -> None:
        self.fd = fd
        self.gen = gen
        self.path = path
        self.lock = threading.Lock()
        self.closed = False
        self.dirty = True
        self.needs_dir_sync = True
        self.size = 0
        # A torn record was written, or an fsync failed: never append again (the next write
        # starts a new segment; after a failed fsync the kernel may have dropped these pages).
        self.broken = False

    def close(self, sync: bool) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                if sync:
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)


_fsync_dir = fsutil.fsync_dir

_JOURNAL_WRITE = "journal write"
_JOURNAL_FSYNC = "journal fsync"


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (a crash leaves at most ``<path>.tmp`` behind)."""
    fsutil.write_atomic(path, data, mode, tmp=path.with_name(path.name + ".tmp"))


class PendingCompaction:
    """A compaction whose consistent point is taken; :meth:`finish` writes it (any thread)."""

    def __init__(
        self,
        store: Store,
        data: bytes,
        counts: tuple[int, int, int],
        new: _Segment,
        old: _Segment | None,
        started: float,
    ) -> None:
        self._store = store
        self._data = data
        self._counts = counts
        self._new = new
        self._old = old
        self._started = started
        self._done = False

    def finish(self) -> CompactReport:
        """Write the snapshot atomically, then delete the journal segments it makes obsolete.

        On failure (raised) the previous snapshot and every segment stay: loading replays from
        the previous snapshot's checkpoint, through the new segment.
        """
        if self._done:
            raise RuntimeError("compaction already finished")
        self._done = True
        store = self._store
        try:
            try:
                if self._old is not None:
                    self._old.close(sync=True)
                    store._forget(self._old)
                with self._new.lock:  # the CHECKPOINT record must be durable before old segments go
                    if not self._new.closed:
                        os.fsync(self._new.fd)
            except OSError as e:
                store._fail(_JOURNAL_FSYNC, e)
                self._new.broken = True
                raise
            write_atomic(store.snapshot_path, self._data)
            for gen, path in store._segment_files():
                if gen < self._new.gen:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        finally:
            store._pending = None
        c, a, e = self._counts
        return CompactReport(len(self._data), c, a, e, time.perf_counter() - self._started)


class Store:
    """Snapshot + journal persistence for a :class:`Registry` (a :class:`~discovery.server.state.Journal`).

    Threading: ``record_*``, :meth:`load`, :meth:`probe`, :meth:`begin_compact` and
    :meth:`compact` run on the registry's thread; :meth:`sync` and
    :meth:`PendingCompaction.finish` may run in another thread. ``on_health_change``
    is called (with :attr:`degraded`) from whichever thread saw the transition.
    """

    def __init__(
        self,
        snapshot_path: Path,
        *,
        fsync_interval: float = 1.0,
        heartbeat: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
        on_health_change: Callable[[str | None], None] | None = None,
    ) -> None:
        self.snapshot_path = Path(snapshot_path)
        self.fsync_interval = fsync_interval
        self._heartbeat = heartbeat
        self._wall = wall_clock
        self._dir = self.snapshot_path.parent
        self._pattern = re.compile(re.escape(self.snapshot_path.name) + r"\.journal\.(\d{1,18})")
        self._seg: _Segment | None = None
        self._retired: list[_Segment] = []
        self._retired_lock = threading.Lock()
        self._pending: PendingCompaction | None = None
        self._last_gen = 0
        self._last_write = -math.inf
        self._closed = False
        self.on_health_change = on_health_change
        self._failures: dict[str, str] = {}  # what fails ("journal write", "journal fsync") -> why
        # every failure seen, by what failed (journal write, journal fsync): /metrics counts them
        self.failure_counts: dict[str, int] = dict.fromkeys((_JOURNAL_WRITE, _JOURNAL_FSYNC), 0)
        self._health_lock = threading.Lock()

    # ------------------------------------------------------------------ health

    @property
    def degraded(self) -> str | None:
        """Why acknowledged writes cannot be made durable right now (``journal write failed: No space
        left on device``), or None when the journal works."""
        f = self._failures
        return "; ".join(f"{k} failed: {v}" for k, v in f.items()) if f else None

    def _fail(self, what: str, e: OSError) -> None:
        with self._health_lock:
            before = self.degraded
            self.failure_counts[what] = self.failure_counts.get(what, 0) + 1
            self._failures[what] = _errtext(e)
            after = self.degraded
        if after != before and self.on_health_change is not None:
            self.on_health_change(after)

    def _recover(self, what: str) -> None:
        with self._health_lock:
            if what not in self._failures:
                return
            del self._failures[what]
            after = self.degraded
        if self.on_health_change is not None:
            self.on_health_change(after)

    # ------------------------------------------------------------------ files

    def _segment_files(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = self._pattern.fullmatch(name)
            if m:
                out.append((int(m.group(1)), self._dir / name))
        out.sort()
        return out

    def _open_segment(self, first: bytes) -> _Segment:
        """Create the next journal segment and write its first record.

        On failure nothing is left behind (the file is removed), so a full disk does not
        accumulate empty segments, one per attempt.
        """
        self._dir.mkdir(parents=True, exist_ok=True)
        files = self._segment_files()
        gen = max(self._last_gen, files[-1][0] if files else 0) + 1
        path = self._dir / f"{self.snapshot_path.name}.journal.{gen:08d}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        seg = _Segment(fd, gen, path)
        try:
            os.fchmod(fd, 0o600)
            self._write(seg, first)
        except BaseException:
            seg.close(sync=False)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._last_gen = gen
        return seg

    def _write(self, seg: _Segment, body: bytes) -> None:
        rec = _FRAME.pack(MAGIC, len(body), zlib.crc32(body)) + body
        written = os.write(seg.fd, rec)  # raises (nothing written) or may write part of it
        if written != len(rec):
            seg.broken = True
            raise _TornWrite(
                errno.ENOSPC, f"short write to journal {seg.path.name} ({written}/{len(rec)} bytes)"
            )
        seg.size += written
        seg.dirty = True

    def _abandon(self, seg: _Segment) -> None:
        """Stop appending to ``seg`` (torn record or failed fsync); the next write starts a new segment."""
        if self._seg is seg:
            self._seg = None
        try:
            seg.close(sync=True)
        except OSError as e:
            self._fail(_JOURNAL_FSYNC, e)

    def _current(self, wall: float) -> _Segment:
        """The segment to append to, starting one (OPEN record) when there is none or it is broken."""
        seg = self._seg
        if seg is not None and not seg.broken:
            return seg
        if seg is not None and not seg.closed:
            self._abandon(seg)
        seg = self._seg = self._open_segment(_HEAD.pack(KIND_OPEN, wall))
        return seg

    def _append(self, body: bytes, wall: float) -> None:
        if self._closed:
            raise RuntimeError("store is closed")
        seg = self._seg
        try:
            if seg is None or seg.broken:
                seg = self._current(wall)
            self._write(seg, body)
        except OSError as e:
            # Nothing was recorded. The segment is not appended to again (after a torn record it
            # must not be; after a refused write, the next attempt then has to allocate a new
            # segment, which proves there is space again, not just the slack of a file's last page).
            if seg is not None:
                seg.broken = True
                self._abandon(seg)
            self._fail(_JOURNAL_WRITE, e)
            raise StorageUnavailable(e.errno or errno.EIO, _errtext(e)) from e
        self._last_write = wall
        if self._failures:
            self._recover(_JOURNAL_WRITE)

    def _retire(self, seg: _Segment) -> None:
        with self._retired_lock:
            self._retired.append(seg)

    def _forget(self, seg: _Segment) -> None:
        with self._retired_lock, contextlib.suppress(ValueError):
            self._retired.remove(seg)

    @property
    def journal_size(self) -> int:
        """Bytes written to the current journal segment (a hint for when to compact)."""
        seg = self._seg
        return seg.size if seg is not None else 0

    # ------------------------------------------------------------------ hot path

    def record_update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: Sequence[bytes],
        ttl: float,
    ) -> None:
        """Journal an update the registry validated (before applying and acknowledging it).

        Raises :class:`StorageUnavailable` when the record could not be written (nothing was).
        """
        cb = cluster_id.encode()
        ab = affiliate_id.encode()
        d = data or b""
        n = len(endpoints)
        if n > 64:
            endpoints = tuple(dict.fromkeys(endpoints))
            n = len(endpoints)
        if len(cb) > _ID_MAX or len(ab) > _ID_MAX or n > _ID_MAX:
            raise ValueError("identifier or endpoint list too large for the journal")
        wall = self._wall()
        lens = (_LENS[n] if n <= 64 else struct.Struct(f"<{n}H")).pack(*map(len, endpoints))
        body = b"".join(
            (_UPDATE.pack(KIND_UPDATE, wall, ttl, len(cb), len(ab), len(d), n), lens, cb, ab, d, *endpoints)
        )
        self._append(body, wall)

    def record_delete(self, cluster_id: str, affiliate_id: str) -> None:
        """Journal a delete (before applying and acknowledging it); raises :class:`StorageUnavailable`."""
        cb = cluster_id.encode()
        ab = affiliate_id.encode()
        if len(cb) > _ID_MAX or len(ab) > _ID_MAX:
            raise ValueError("identifier too large for the journal")
        wall = self._wall()
        self._append(b"".join((_DELETE.pack(KIND_DELETE, wall, len(cb), len(ab)), cb, ab)), wall)

    def probe(self) -> bool:
        """While degraded, try to start a new journal segment; True when the journal works.

        Runs on the registry's thread (the daemon calls it before each group commit), so a store
        that nobody writes to (its clients were sent elsewhere) still notices the disk recovering.
        """
        if self._closed:
            return False
        seg = self._seg
        if _JOURNAL_WRITE not in self._failures and seg is not None and not seg.broken:
            return True
        wall = self._wall()
        try:
            self._current(wall)  # a failed write left no usable segment: this allocates a new one
        except OSError as e:
            self._fail(_JOURNAL_WRITE, e)
            return False
        self._last_write = wall
        self._recover(_JOURNAL_WRITE)
        return True

    def sync(self) -> None:
        """Group commit: fsync what was written since the last call (and note liveness when idle).

        Raises :class:`StorageUnavailable` when the fsync fails (the store is then degraded and the
        segment is not appended to again).
        """
        seg = self._seg
        if seg is None:
            return
        with seg.lock:
            if seg.closed or seg.broken:
                return
            wall = self._wall()
            if self._heartbeat and wall - self._last_write >= self._heartbeat:
                try:
                    self._write(seg, _HEAD.pack(KIND_TICK, wall))
                    self._last_write = wall
                except OSError as e:  # the next record (or probe) starts a new segment
                    seg.broken = True
                    self._fail(_JOURNAL_WRITE, e)
            try:
                if seg.dirty or _JOURNAL_FSYNC in self._failures:
                    seg.dirty = False
                    os.fsync(seg.fd)
                if seg.needs_dir_sync:
                    _fsync_dir(self._dir)
                    seg.needs_dir_sync = False
            except OSError as e:
                seg.broken = True
                self._fail(_JOURNAL_FSYNC, e)
                raise StorageUnavailable(e.errno or errno.EIO, _errtext(e)) from e
        if _JOURNAL_FSYNC in self._failures:
            self._recover(_JOURNAL_FSYNC)

    # ------------------------------------------------------------------ load

    def load(self, registry: Registry) -> LoadReport:
        """Verify and restore the snapshot, replay the journal into ``registry``; never raises for bad files.

        Afterwards a new journal segment is started and ``registry.gc()`` has
        removed whatever expired meanwhile. See the module docstring for how the
        snapshot is verified and what happens to a damaged one.
        """
        problems: list[str] = []
        snapshot: bytes | None = None
        unreadable = ""
        try:
            snapshot = self.snapshot_path.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as e:
            unreadable = e.strerror or str(e)
            problems.append(f"snapshot {self.snapshot_path.name}: unreadable, skipped ({unreadable})")

        segments: list[tuple[int, str, list[_Record]]] = []
        for gen, path in self._segment_files():
            try:
                buf = path.read_bytes()
            except OSError as e:
                problems.append(f"journal {path.name}: unreadable, skipped ({e.strerror})")
                continue
            segments.append((gen, path.name, parse_journal(buf, path.name, problems)))

        report = LoadReport(problems=problems)
        start, anchor = self._verify(snapshot, bool(unreadable), segments, report)
        replay = [r for _, _, recs in segments[start:] for r in recs]
        newest = max((r.wall for r in replay), default=None)
        if anchor is None and replay:
            anchor = replay[0].wall
        elapsed = max(0.0, newest - anchor) if newest is not None and anchor is not None else 0.0

        damage = report.damage
        if damage is not None:
            self._set_aside(snapshot, damage, problems)
            if snapshot is not None:
                since = max(0.0, newest - damage.written) if newest is not None else 0.0
                counted = _count_readable(registry, snapshot, replay, since, self._wall())
                if counted is not None:
                    damage.readable, damage.lost_readable = counted
        elif snapshot is not None:
            try:
                registry.import_snapshot(snapshot, self._wall(), elapsed=elapsed, problems=problems)
            except SnapshotError as e:
                problems.append(f"snapshot {self.snapshot_path.name}: corrupt, skipped ({e})")

        replayed = 0
        for r in replay:
            try:
                if r.kind == KIND_UPDATE:
                    age = newest - r.wall if newest is not None else 0.0
                    registry.replay_update(
                        r.cluster_id, r.affiliate_id, r.data or None, r.endpoints, r.ttl, age
                    )
                elif r.kind == KIND_DELETE:
                    registry.delete(r.cluster_id, r.affiliate_id)
                else:
                    continue
            except RegistryError as e:
                problems.append(f"journal {r.where}: rejected on replay, skipped ({e})")
                continue
            replayed += 1
        registry.gc()

        if self._seg is None and not self._closed:
            try:
                wall = self._wall()
                self._seg = self._open_segment(_HEAD.pack(KIND_OPEN, wall))
                self._last_write = wall
            except OSError as e:
                self._fail(_JOURNAL_WRITE, e)
                problems.append(f"journal: cannot start a new segment ({e.strerror}); will retry on write")
        c, a, e, _ = registry.stats()
        report.clusters, report.affiliates, report.endpoints, report.records = c, a, e, replayed
        if damage is not None:
            damage.clusters, damage.affiliates = c, a
            damage.message = _damage_message(damage)
            problems.append(damage.message)
        return report

    def _verify(
        self,
        snapshot: bytes | None,
        unreadable: bool,
        segments: list[tuple[int, str, list[_Record]]],
        report: LoadReport,
    ) -> tuple[int, float | None]:
        """Check the snapshot against the checkpoints; return (first segment to replay, time anchor)."""
        name = self.snapshot_path.name
        checkpoints = [
            (i, recs[0])
            for i, (_, _, recs) in enumerate(segments)
            if recs and recs[0].kind == KIND_CHECKPOINT
        ]
        if snapshot is not None:
            key = (len(snapshot), zlib.crc32(snapshot))
            for j in range(len(checkpoints) - 1, -1, -1):
                i, rec = checkpoints[j]
                if rec.snapshot == key:
                    report.snapshot = "verified"
                    if j < len(checkpoints) - 1:
                        later = segments[checkpoints[-1][0]][1]
                        report.note = (
                            f"snapshot {name} matches the checkpoint in {segments[i][1]}; the compaction "
                            f"begun in {later} did not complete (crash or write failure), replaying from "
                            f"{segments[i][1]} on"
                        )
                    return i, rec.wall
        # No compaction ever completed when the journal still starts with the first segment a
        # process start opened: then the snapshot (if any) predates the journal.
        first = segments[0] if segments else None
        pristine = first is not None and first[0] == 1 and bool(first[2]) and first[2][0].kind == KIND_OPEN
        if not checkpoints or pristine:
            if unreadable:
                report.snapshot = "damaged"
            elif snapshot is not None:
                report.snapshot = "unverified"
                why = (
                    "no journal checkpoint refers to it (an upstream snapshot, one from before the "
                    "journal existed, or its checkpoint record was damaged or removed)"
                    if not checkpoints
                    else "it predates the journal: no compaction has completed yet"
                )
                report.note = f"snapshot {name} ({len(snapshot)} bytes) loaded unverified: {why}"
            return 0, None
        i, rec = checkpoints[-1]
        report.snapshot = "missing" if snapshot is None and not unreadable else "damaged"
        report.damage = SnapshotDamage(
            file=name,
            found="unreadable" if unreadable else ("missing" if snapshot is None else "damaged"),
            length=len(snapshot) if snapshot is not None else None,
            crc=zlib.crc32(snapshot) if snapshot is not None else None,
            checkpoint=segments[i][1],
            expected_length=rec.snapshot[0],
            expected_crc=rec.snapshot[1],
            expected_totals=rec.totals,
            written=rec.wall,
            kept_as=None,
            segments=(segments[0][0], segments[-1][0]),
        )
        return 0, None

    def _set_aside(self, snapshot: bytes | None, damage: SnapshotDamage, problems: list[str]) -> None:
        """Rename a damaged snapshot to ``<name>.corrupt-<UTC time>`` so no compaction overwrites it."""
        if damage.found == "missing":
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall()))
        base = f"{self.snapshot_path.name}.corrupt-{stamp}"
        target = self._dir / base
        n = 0
        while target.exists():
            n += 1
            target = self._dir / f"{base}.{n}"
        try:
            os.rename(self.snapshot_path, target)
        except OSError as e:
            problems.append(
                f"snapshot {self.snapshot_path.name}: cannot move the damaged file aside ({e.strerror}); "
                "the next snapshot replaces it"
            )
            return
        with contextlib.suppress(OSError):
            _fsync_dir(self._dir)
        damage.kept_as = target.name

    # ------------------------------------------------------------------ compaction

    def begin_compact(self, registry: Registry) -> PendingCompaction:
        """Take the consistent point: export the registry and switch to a new journal segment.

        Must run on the registry's thread; the returned object's
        :meth:`PendingCompaction.finish` does the file I/O and may run in a
        worker thread. If the new segment cannot be written nothing changed
        (raises :class:`StorageUnavailable`).
        """
        if self._closed:
            raise RuntimeError("store is closed")
        if self._pending is not None:
            raise RuntimeError("a compaction is already in progress")
        started = time.perf_counter()
        data, c, a, e = registry.export_snapshot_with_counts()
        wall = self._wall()
        first = _CHECKPOINT.pack(
            KIND_CHECKPOINT, wall, len(data), zlib.crc32(data), min(c, _U32), min(a, _U32), min(e, _U32)
        )
        try:
            new = self._open_segment(first)
        except OSError as err:  # reported by the caller; records still go to the current segment
            raise StorageUnavailable(err.errno or errno.EIO, _errtext(err)) from err
        old, self._seg = self._seg, new
        self._last_write = wall
        if self._failures:
            self._recover(_JOURNAL_WRITE)
        if old is not None:
            self._retire(old)
        self._pending = PendingCompaction(self, data, (c, a, e), new, old, started)
        return self._pending

    def compact(self, registry: Registry) -> CompactReport:
        """Snapshot the registry atomically and drop the journal it supersedes (synchronous)."""
        return self.begin_compact(registry).finish()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """fsync and close the journal; idempotent. Raises :class:`StorageUnavailable` if an fsync failed."""
        if self._closed:
            return
        self._closed = True
        seg, self._seg = self._seg, None
        with self._retired_lock:
            retired, self._retired = self._retired, []
        failed: OSError | None = None
        for s in [*retired, *([seg] if seg is not None else [])]:
            try:
                s.close(sync=True)
            except OSError as e:  # close the others anyway
                failed = failed or e
        if seg is not None and seg.needs_dir_sync:
            with contextlib.suppress(OSError):
                _fsync_dir(self._dir)
        if failed is not None:
            self._fail(_JOURNAL_FSYNC, failed)
            raise StorageUnavailable(failed.errno or errno.EIO, _errtext(failed)) from failed

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count_readable(
    registry: Registry, snapshot: bytes, replay: list[_Record], elapsed: float, wall: float
) -> tuple[int, int] | None:
    """(unexpired affiliates the damaged snapshot still decodes to, how many of them no replayed
    record mentions: lost for sure), or None when the damaged copy does not decode at all.

    The copy is decoded into a scratch registry for counting only; nothing of it is served.
    """
    scratch = Registry(registry.limits)
    try:
        scratch.import_snapshot(snapshot, wall, elapsed=elapsed, problems=[])
    except SnapshotError:
        return None
    touched = {(r.cluster_id, r.affiliate_id) for r in replay if r.kind in (KIND_UPDATE, KIND_DELETE)}
    keys = [(cid, v.id) for cid in scratch.cluster_ids() for v in scratch.list(cid)]
    return len(keys), sum(1 for k in keys if k not in touched)


def _damage_message(d: SnapshotDamage) -> str:
    if d.found == "missing":
        found = "is missing"
    elif d.found == "unreadable":
        found = "is unreadable"
    else:
        found = f"is {d.length} bytes with CRC32 {d.crc:#010x}"
    parts = [
        f"snapshot {d.file} damaged (corrupt): it {found}, but the newest journal checkpoint "
        f"({d.checkpoint}) expects {d.expected_length} bytes with CRC32 {d.expected_crc:#010x}"
    ]
    if d.found != "missing":
        parts.append(f"it was not loaded and is kept as {d.kept_as}" if d.kept_as else "it was not loaded")
    if d.segments is not None:
        first, last = d.segments
        span = f"segment {first}" if first == last else f"segments {first}..{last}"
        parts.append(
            f"state rebuilt from journal {span}: {d.clusters} clusters / {d.affiliates} affiliates recovered"
        )
    first_seg = d.segments[0] if d.segments is not None else None
    lost = (
        f"lost: every affiliate written before segment {first_seg} and not updated since"
        if first_seg is not None
        else "lost: every affiliate not updated since the snapshot was written"
    )
    if d.expected_totals is not None:
        c, a, _ = d.expected_totals
        lost += f" (the snapshot held {c} clusters / {a} affiliates when it was written)"
    parts.append(lost)
    if d.readable is not None:
        parts.append(
            f"the damaged copy still decodes to {d.readable} unexpired affiliates, {d.lost_readable} of them "
            "in no replayed record (lost for sure; decoded only to count them, never served)"
        )
    elif d.found == "damaged":
        parts.append("the damaged copy does not decode at all")
    return "; ".join(parts)
