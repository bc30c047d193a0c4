"""Unit tests for snapshot + journal persistence (discovery/server/storage.py)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.limits import Limits
from discovery.server import storage
from discovery.server.state import AffiliateView, Registry
from discovery.server.storage import (
    FRAME_SIZE,
    MAGIC,
    CompactReport,
    StorageUnavailable,
    Store,
    parse_journal,
)
from spanapi.discovery.storage import storage_pb2
from spanutil.testing import ManualClock

C = "cluster-1"
A = "node-a"
B = "node-b"
ROOT = Path(__file__).resolve().parents[3]


def ep(i: int, size: int = 16) -> bytes:
    return bytes([i % 256]) * size


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.binpb"


def state(reg: Registry) -> dict[str, dict[str, AffiliateView]]:
    return {cid: {v.id: v for v in reg.list(cid)} for cid in sorted(reg.cluster_ids())}


def segments(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".journal.*"))


class Node:
    """A registry plus its store, driven the way the service does (update, then record)."""

    def __init__(
        self, path: Path, wall: ManualClock | None = None, mono: ManualClock | None = None, **kw: object
    ) -> None:
        self.wall = wall or ManualClock(1_000_000.0)
        self.mono = mono or ManualClock(500.0)
        self.reg = Registry(kw.pop("limits", Limits()), clock=self.mono)  # type: ignore[arg-type]
        self.store = Store(path, wall_clock=self.wall, **kw)  # type: ignore[arg-type]
        self.report = self.store.load(self.reg)

    def update(self, cid: str, aid: str, data: bytes | None, eps: list[bytes], ttl: float = 600) -> None:
        self.reg.update(cid, aid, data, eps, ttl)
        self.store.record_update(cid, aid, data, eps, ttl)

    def delete(self, cid: str, aid: str) -> None:
        self.reg.delete(cid, aid)
        self.store.record_delete(cid, aid)

    def tick(self, dt: float) -> None:
        self.wall.advance(dt)
        self.mono.advance(dt)


def populate(n: Node) -> None:
    n.update(C, A, b"a1", [ep(1)])
    n.update(C, B, None, [ep(2), ep(3, 32)])
    n.update(C, A, b"a2", [ep(4)])
    n.update("c2", "x", b"x", [])
    n.update("c2", "y", b"y", [ep(5)])
    n.delete("c2", "x")
    n.delete("c2", "never-existed")
    n.update(C, "z", b"z", [])
    n.delete(C, "z")


# ---------------------------------------------------------------------------- round trips


def test_fresh_start_is_empty_and_creates_a_segment(path: Path) -> None:
    n = Node(path)
    assert (n.report.clusters, n.report.affiliates, n.report.records, n.report.problems) == (0, 0, 0, [])
    assert len(segments(path)) == 1
    assert not path.exists()


def test_round_trip_through_journal(path: Path) -> None:
    n = Node(path)
    populate(n)
    expected = state(n.reg)
    n.store.close()
    m = Node(path)
    assert m.report.problems == []
    assert m.report.records == 9
    assert (m.report.clusters, m.report.affiliates, m.report.endpoints) == (2, 3, 5)
    assert state(m.reg) == expected


def test_round_trip_through_snapshot_and_journal(path: Path) -> None:
    n = Node(path)
    populate(n)
    rep = n.store.compact(n.reg)
    assert isinstance(rep, CompactReport)
    assert (rep.clusters, rep.affiliates, rep.endpoints) == (2, 3, 5)
    assert rep.size == path.stat().st_size > 0 and rep.duration >= 0
    n.update(C, A, b"a3", [ep(9)])
    n.delete(C, B)
    expected = state(n.reg)
    n.store.close()
    m = Node(path)
    assert m.report.problems == []
    assert m.report.records == 2  # only the segment written after the snapshot
    assert state(m.reg) == expected


def test_kill_minus_9_loses_no_acknowledged_update(path: Path) -> None:
    """A real process writes and acknowledges records, then is SIGKILLed without close or fsync."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from discovery.server.state import Registry
        from discovery.server.storage import Store
        reg = Registry()
        store = Store(Path({str(path)!r}), fsync_interval=3600)
        store.load(reg)
        for i in range(200):
            reg.update("c", f"n{{i}}", b"d" * 100, [bytes([i]) * 16], 1800)
            store.record_update("c", f"n{{i}}", b"d" * 100, [bytes([i]) * 16], 1800)
            if i == 100:
                store.compact(reg)
        reg.delete("c", "n7")
        store.record_delete("c", "n7")
        print("acked", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "acked"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    reg = Registry()
    rep = Store(path).load(reg)
    assert rep.problems == []
    ids = {v.id for v in reg.list("c")}
    assert ids == {f"n{i}" for i in range(200)} - {"n7"}


# ---------------------------------------------------------------------------- TTL accounting


def test_downtime_does_not_eat_ttls(path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"a", [ep(1)], ttl=100)
    n.tick(50)
    n.update(C, B, b"b", [], ttl=100)  # newest record: 50 s after A's
    n.store.close()
    wall = ManualClock(n.wall.t + 86_400)  # a day later, in a new process
    m = Node(path, wall=wall, mono=ManualClock(7.0))
    assert m.reg.expirations(C, A) == (pytest.approx(7.0 + 50), {ep(1): pytest.approx(7.0 + 50)})
    assert m.reg.expirations(C, B) == (pytest.approx(7.0 + 100), {})


def test_heartbeat_records_uptime_while_idle(path: Path) -> None:
    n = Node(path, heartbeat=10.0)
    n.update(C, A, b"a", [], ttl=100)
    n.tick(5)
    n.store.sync()  # not idle long enough: no heartbeat
    n.tick(55)
    n.store.sync()  # heartbeat: the process was alive 60 s after the update
    m = Node(path, wall=ManualClock(n.wall.t + 3600), mono=ManualClock(0.0))
    assert m.reg.expirations(C, A)[0] == pytest.approx(40.0)  # type: ignore[index]


def test_snapshot_ages_by_journal_time_after_checkpoint(path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"a", [ep(1)], ttl=100)
    n.tick(10)
    n.store.compact(n.reg)  # A has 90 s left at the checkpoint
    n.tick(30)
    n.update(C, B, b"b", [], ttl=100)
    m = Node(path, wall=ManualClock(n.wall.t + 999), mono=ManualClock(0.0))
    assert m.report.problems == []
    assert m.reg.expirations(C, A) == (pytest.approx(60.0), {ep(1): pytest.approx(60.0)})
    assert m.reg.expirations(C, B)[0] == pytest.approx(100.0)  # type: ignore[index]


def test_expired_entries_are_gone_after_load(path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"a", [], ttl=10)
    n.tick(20)
    n.update(C, B, b"b", [], ttl=100)
    m = Node(path)
    assert set(state(m.reg)[C]) == {B}


def test_legacy_upstream_snapshot_with_absolute_timestamps(path: Path) -> None:
    wall = 1_800_000_000.0
    snap = storage_pb2.StateSnapshot()
    a = snap.clusters.add(id=C).affiliates.add(
        id=A, data=b"d", expiration=timestamp_pb2.Timestamp(seconds=int(wall) + 300)
    )
    a.endpoints.add(data=ep(1), expiration=timestamp_pb2.Timestamp(seconds=int(wall) + 200))
    path.write_bytes(snap.SerializeToString())
    n = Node(path, wall=ManualClock(wall), mono=ManualClock(0.0))
    assert n.report.problems == []
    assert (n.report.clusters, n.report.affiliates, n.report.endpoints) == (1, 1, 1)
    assert n.reg.expirations(C, A) == (pytest.approx(300.0), {ep(1): pytest.approx(200.0)})
    # compaction rewrites it with relative TTLs only
    n.store.compact(n.reg)
    out = storage_pb2.StateSnapshot.FromString(path.read_bytes())
    aff = out.clusters[0].affiliates[0]
    assert not aff.HasField("expiration") and aff.ttl.seconds == 300


# ---------------------------------------------------------------------------- damaged files


def write_records(path: Path, count: int) -> Node:
    n = Node(path)
    for i in range(count):
        n.update(C, f"n{i}", b"data", [ep(i)])
    n.store.close()
    return n


def test_torn_tail_record_is_ignored(path: Path) -> None:
    write_records(path, 5)
    (seg,) = segments(path)
    seg.write_bytes(seg.read_bytes()[:-3])
    m = Node(path)
    assert {v.id for v in m.reg.list(C)} == {f"n{i}" for i in range(4)}
    assert len(m.report.problems) == 1 and "torn" in m.report.problems[0]
    assert m.report.records == 4
    # the damaged segment is never appended to again: new records go to a new segment and survive
    m.update(C, "later", b"l", [])
    m.store.close()
    k = Node(path)
    assert {v.id for v in k.reg.list(C)} == {f"n{i}" for i in range(4)} | {"later"}


def record_offsets(buf: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        out.append(pos)
        pos += FRAME_SIZE + int.from_bytes(buf[pos + 2 : pos + 6], "little")
    return out


@pytest.mark.parametrize("where", ["payload", "length", "magic"])
def test_bad_record_in_the_middle_is_skipped(path: Path, where: str) -> None:
    write_records(path, 5)
    (seg,) = segments(path)
    buf = bytearray(seg.read_bytes())
    off = record_offsets(bytes(buf))[3]  # OPEN, n0, n1, [n2], n3, n4
    if where == "payload":
        buf[off + FRAME_SIZE + 20] ^= 0xFF
    elif where == "length":
        buf[off + 3] ^= 0x40
    else:
        buf[off] ^= 0xFF
    seg.write_bytes(bytes(buf))
    m = Node(path)
    assert {v.id for v in m.reg.list(C)} == {"n0", "n1", "n3", "n4"}
    assert len(m.report.problems) == 1 and "offset" in m.report.problems[0]
    assert m.report.records == 4


def test_corrupt_snapshot_is_reported_and_journal_still_replayed(path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"a", [])
    n.store.compact(n.reg)
    n.update(C, B, b"b", [])
    n.store.close()
    path.write_bytes(b"\xff\xfe garbage")
    m = Node(path)
    assert any("snapshot" in p and "corrupt" in p for p in m.report.problems)
    assert set(state(m.reg)[C]) == {B}  # what the snapshot held is lost, the journal is not


def test_unreadable_snapshot_is_reported(path: Path) -> None:
    path.mkdir()  # reading a directory fails with an OSError
    reg = Registry()
    rep = Store(path).load(reg)
    assert any("unreadable" in p for p in rep.problems)


def test_record_rejected_by_tighter_limits_is_reported_not_fatal(path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"x" * 100, [])
    n.update(C, B, b"y", [])
    n.store.close()
    m = Node(path, limits=Limits(affiliate_data_max=10))
    assert set(state(m.reg)[C]) == {B}
    assert len(m.report.problems) == 1 and "affiliate_data" in m.report.problems[0]
    assert "xxxx" not in m.report.problems[0]


def test_short_write_starts_a_new_segment(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = Node(path)
    n.update(C, A, b"a", [])
    real = os.write

    def half(fd: int, data: bytes) -> int:
        return real(fd, data[: len(data) // 2])

    monkeypatch.setattr(storage.os, "write", half)
    n.reg.update(C, B, b"b", [], 600)
    with pytest.raises(OSError):
        n.store.record_update(C, B, b"b", [], 600)
    monkeypatch.setattr(storage.os, "write", real)
    n.update(C, "c", b"c", [])
    n.store.close()
    assert len(segments(path)) == 2
    m = Node(path)
    assert set(state(m.reg)[C]) == {A, "c"}
    assert len(m.report.problems) == 1 and "torn" in m.report.problems[0]


# ---------------------------------------------------------------------------- compaction and crash windows


def test_compaction_deletes_old_segments_and_sets_modes(path: Path) -> None:
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        n = Node(path)
        populate(n)
        Node(path).store.close()  # another start: another segment
        assert len(segments(path)) >= 2
        n.store.compact(n.reg)
        segs = segments(path)
        assert len(segs) == 1
        for f in [path, *segs]:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert not path.with_name(path.name + ".tmp").exists()
        # a pre-existing temp file with loose permissions does not leak them
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"junk")
        tmp.chmod(0o666)
        n.store.compact(n.reg)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_crash_after_new_segment_before_snapshot_rename(path: Path) -> None:
    """Old snapshot + its segment + older segments + new checkpoint segment, no new snapshot."""
    n = Node(path)
    n.update(C, A, b"a1", [ep(1)])
    n.store.compact(n.reg)  # S0
    n.update(C, B, b"b", [ep(2)])  # only in the segment after S0
    n.delete(C, A)
    s0 = path.read_bytes()
    pending = n.store.begin_compact(n.reg)  # new segment with a checkpoint for S1 (never written)
    n.update(C, "c", b"c", [])
    expected = state(n.reg)
    del pending  # crash: finish() never runs
    assert path.read_bytes() == s0 and len(segments(path)) == 2
    m = Node(path)
    assert m.report.problems == []
    assert state(m.reg) == expected


def test_crash_during_snapshot_write_leaves_tmp(path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"a", [])
    n.store.compact(n.reg)
    n.update(C, B, b"b", [])
    n.store.begin_compact(n.reg)
    path.with_name(path.name + ".tmp").write_bytes(b"half a snapshot")
    expected = state(n.reg)
    m = Node(path)
    assert m.report.problems == []
    assert state(m.reg) == expected


def test_crash_after_rename_before_old_segments_deleted(path: Path, tmp_path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"a1", [ep(1)])
    n.update(C, B, b"b", [ep(2)])
    n.delete(C, B)
    saved = tmp_path / "saved"
    saved.mkdir()
    for s in segments(path):
        shutil.copy2(s, saved / s.name)
    n.store.compact(n.reg)
    n.update(C, A, b"a2", [])
    expected = state(n.reg)
    for s in saved.iterdir():  # the deletions never happened
        shutil.copy2(s, path.parent / s.name)
    assert len(segments(path)) == 2
    m = Node(path)
    assert m.report.problems == []
    assert m.report.records == 1  # the old segment is recognised as already in the snapshot
    assert state(m.reg) == expected


def test_replaying_history_already_in_the_snapshot_is_harmless(path: Path, tmp_path: Path) -> None:
    """Even when the checkpoint cannot be matched, replaying everything yields the same state."""
    n = Node(path)
    populate(n)
    n.update(C, B, b"b-final", [ep(7)])
    saved = tmp_path / "saved"
    saved.mkdir()
    for s in segments(path):
        shutil.copy2(s, saved / s.name)
    n.store.compact(n.reg)
    n.update("c2", "y", b"y2", [ep(8)])
    n.delete(C, A)
    expected = state(n.reg)
    n.store.close()
    for s in saved.iterdir():
        shutil.copy2(s, path.parent / s.name)
    (new_seg,) = [s for s in segments(path) if not (saved / s.name).exists()]
    buf = bytearray(new_seg.read_bytes())
    buf[FRAME_SIZE + 2] ^= 0xFF  # break the checkpoint record
    new_seg.write_bytes(bytes(buf))
    m = Node(path)
    assert len(m.report.problems) == 1  # the damaged checkpoint
    assert state(m.reg) == expected


def test_finish_in_a_thread_while_recording(path: Path) -> None:
    n = Node(path)
    populate(n)
    pending = n.store.begin_compact(n.reg)
    with pytest.raises(RuntimeError):
        n.store.begin_compact(n.reg)
    result: list[CompactReport] = []
    t = threading.Thread(target=lambda: result.append(pending.finish()))
    t.start()
    for i in range(50):
        n.update(C, f"t{i}", b"t", [])
    t.join()
    n.store.sync()
    assert result and result[0].affiliates == 3
    expected = state(n.reg)
    n.store.close()
    assert state(Node(path).reg) == expected
    with pytest.raises(RuntimeError):
        pending.finish()


def test_closed_store_refuses_records(path: Path) -> None:
    n = Node(path)
    n.store.close()
    n.store.close()
    with pytest.raises(RuntimeError):
        n.store.record_delete(C, A)
    n.store.sync()  # harmless after close


def test_sync_is_group_commit(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = Node(path, heartbeat=0)
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append("file" if stat.S_ISREG(os.fstat(fd).st_mode) else "dir")
        real(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    for i in range(20):
        n.update(C, f"n{i}", b"x", [])
    assert calls == []  # records are not fsynced one by one
    n.store.sync()
    assert sorted(calls) == ["dir", "file"]  # one fsync for the batch (+ the new segment's directory entry)
    n.store.sync()  # nothing new: no fsync
    assert len(calls) == 2
    n.update(C, "more", b"x", [])
    n.store.sync()
    assert calls[2:] == ["file"]


# ---------------------------------------------------------------------------- fuzzing


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_arbitrary_journal_bytes_never_raise(tmp_path: Path, blob: bytes) -> None:
    d = tmp_path / f"j{zlib.crc32(blob)}"
    d.mkdir(exist_ok=True)
    p = d / "state.binpb"
    for s in segments(p):
        s.unlink()
    (d / "state.binpb.journal.00000001").write_bytes(blob)
    rep = Store(p).load(Registry())
    assert isinstance(rep.problems, list)
    assert parse_journal(blob, "x", []) is not None


def framed(payload: bytes) -> bytes:
    return MAGIC + len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(4, "little") + payload


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.binary(max_size=80)), max_size=6))
def test_well_framed_garbage_payloads_never_raise(recs: list[tuple[int, bytes]]) -> None:
    buf = b"".join(framed(bytes([k]) + b"\x00" * 8 + body) for k, body in recs)
    problems: list[str] = []
    out = parse_journal(buf, "x", problems)
    assert len(out) + len(problems) == len(recs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_arbitrary_snapshot_bytes_never_raise(tmp_path: Path, blob: bytes) -> None:
    p = tmp_path / f"s{zlib.crc32(blob)}.binpb"
    p.write_bytes(blob)
    reg = Registry()
    rep = Store(p).load(reg)
    c, a, e, _ = reg.stats()
    assert (rep.clusters, rep.affiliates, rep.endpoints) == (c, a, e)


# ---------------------------------------------------------------------------- snapshot verification


def top_level_fields(buf: bytes) -> list[int]:
    """Offsets where each top-level field (one cluster) of a StateSnapshot starts, plus the end."""
    out, pos = [], 0
    while pos < len(buf):
        out.append(pos)
        assert buf[pos] == 0x0A
        pos += 1
        n = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        pos += n
    out.append(pos)
    return out


def snapshot_then_journal(path: Path) -> Node:
    """4 clusters x 3 affiliates in a compacted snapshot, then three records in two journal segments
    (the checkpoint's, and one started by a restart)."""
    n = Node(path)
    for c in range(4):
        for a in range(3):
            n.update(f"c{c}", f"a{a}", f"data-{c}-{a}".encode(), [ep(c * 3 + a)])
    n.store.compact(n.reg)
    n.update("c0", "a0", b"newer", [])
    n.store.close()
    n = Node(path)
    assert n.report.snapshot == "verified"
    n.update("c9", "z", b"z", [])
    n.delete("c1", "a1")
    n.store.close()
    return n


JOURNAL_ONLY = {"c0": {"a0": AffiliateView("a0", b"newer", ())}, "c9": {"z": AffiliateView("z", b"z", ())}}


def damage(path: Path, kind: str) -> bytes:
    good = path.read_bytes()
    if kind == "truncated":
        bad = good[: top_level_fields(good)[2]]  # exactly two whole clusters: still a valid protobuf
    elif kind == "empty":
        bad = b""
    else:
        pos = good.index(b"data-2-1")
        bad = good[:pos] + b"X" + good[pos + 1 :]  # one byte: decodes fine, data silently wrong
    path.write_bytes(bad)
    return bad


@pytest.mark.parametrize(
    ("kind", "readable", "lost_readable"),
    [("truncated", 6, 4), ("empty", 0, 0), ("flipped", 12, 10)],
)
def test_damaged_snapshot_is_not_loaded_and_is_reported(
    path: Path, kind: str, readable: int, lost_readable: int
) -> None:
    snapshot_then_journal(path)
    checkpoint_seg, _ = segments(path)
    good = path.read_bytes()
    bad = damage(path, kind)
    m = Node(path)
    rep = m.report
    # nothing of the damaged snapshot is served: only what the journal holds
    assert state(m.reg) == JOURNAL_ONLY
    assert rep.snapshot == "damaged"
    d = rep.damage
    assert d is not None and d.found == "damaged"
    assert (d.length, d.crc) == (len(bad), zlib.crc32(bad))
    assert (d.expected_length, d.expected_crc) == (len(good), zlib.crc32(good))
    assert d.expected_totals == (4, 12, 12)
    assert d.checkpoint == checkpoint_seg.name
    assert (d.clusters, d.affiliates) == (2, 2)
    assert (d.readable, d.lost_readable) == (readable, lost_readable)
    gen = int(checkpoint_seg.name.rsplit(".", 1)[1])
    assert d.segments == (gen, gen + 1)
    msg = d.message
    assert msg in rep.problems and "corrupt" in msg
    for needle in (
        path.name,
        f"{len(bad)} bytes with CRC32 {zlib.crc32(bad):#010x}",
        f"expects {len(good)} bytes with CRC32 {zlib.crc32(good):#010x}",
        "2 clusters / 2 affiliates recovered",
        "held 4 clusters / 12 affiliates",
        f"{readable} unexpired affiliates, {lost_readable} of them in no replayed record",
        f"state rebuilt from journal segments {gen}..{gen + 1}",
        f"every affiliate written before segment {gen} and not updated since",
    ):
        assert needle in msg, (needle, msg)
    # kept aside for forensics, byte for byte; nothing will overwrite it
    assert d.kept_as is not None and d.kept_as in msg
    aside = path.with_name(d.kept_as)
    assert aside.read_bytes() == bad and d.kept_as.startswith(path.name + ".corrupt-")
    assert not path.exists()
    # the next compaction writes a verified snapshot of what was recovered; the damaged copy stays
    m.store.compact(m.reg)
    m.store.close()
    k = Node(path)
    assert k.report.snapshot == "verified" and k.report.problems == []
    assert state(k.reg) == JOURNAL_ONLY
    assert aside.read_bytes() == bad


def test_missing_snapshot_with_a_checkpoint_is_reported(path: Path) -> None:
    snapshot_then_journal(path)
    path.unlink()
    m = Node(path)
    assert state(m.reg) == JOURNAL_ONLY
    assert m.report.snapshot == "missing"
    d = m.report.damage
    assert d is not None and d.found == "missing" and d.kept_as is None and d.readable is None
    assert "is missing" in d.message and d.message in m.report.problems


def test_upstream_snapshot_without_journal_is_loaded_unverified(path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"a", [ep(1)])
    upstream = n.reg.export_snapshot()
    for s in segments(path):
        s.unlink()
    path.write_bytes(upstream)
    m = Node(path)
    assert m.report.snapshot == "unverified" and m.report.problems == [] and m.report.damage is None
    assert "unverified" in m.report.note and "no journal checkpoint" in m.report.note
    assert set(state(m.reg)[C]) == {A}
    # a restart before the first compaction: the journal starts with segment 1, still unverified
    m.update(C, B, b"b", [])
    m.store.close()
    k = Node(path)
    assert k.report.snapshot == "unverified" and set(state(k.reg)[C]) == {A, B}
    # and when that first compaction never completed (a checkpoint for a snapshot never written)
    k.store.begin_compact(k.reg)
    k.update(C, "c", b"c", [])
    j = Node(path)
    assert j.report.snapshot == "unverified" and j.report.problems == []
    assert set(state(j.reg)[C]) == {A, B, "c"} and path.read_bytes() == upstream


def test_fresh_and_verified_outcomes(path: Path) -> None:
    n = Node(path)
    assert (n.report.snapshot, n.report.note, n.report.damage) == ("absent", "", None)
    n.update(C, A, b"a", [])
    n.store.compact(n.reg)
    m = Node(path)
    assert (m.report.snapshot, m.report.note) == ("verified", "")
    # a compaction that did not complete: the snapshot matches the older checkpoint, not damage
    m.update(C, B, b"b", [])
    m.store.begin_compact(m.reg)
    k = Node(path)
    assert k.report.snapshot == "verified" and k.report.problems == []
    assert "did not complete" in k.report.note


def test_checkpoint_without_totals_still_verifies(path: Path) -> None:
    """Journals written before checkpoints carried the snapshot's totals."""
    n = Node(path)
    n.update(C, A, b"a", [ep(1)])
    n.store.compact(n.reg)
    n.update(C, B, b"b", [])
    n.store.close()
    seg = segments(path)[0]
    buf = seg.read_bytes()
    length = int.from_bytes(buf[2:6], "little")
    payload = buf[FRAME_SIZE : FRAME_SIZE + length]
    assert payload[0] == storage.KIND_CHECKPOINT
    old = payload[: storage._CHECKPOINT_V1.size]
    seg.write_bytes(framed(old) + buf[FRAME_SIZE + length :])
    m = Node(path)
    assert m.report.snapshot == "verified" and m.report.problems == []
    assert set(state(m.reg)[C]) == {A, B}
    path.write_bytes(b"")
    k = Node(path)
    assert k.report.snapshot == "damaged" and k.report.damage is not None
    assert k.report.damage.expected_totals is None and "held" not in k.report.damage.message


# ---------------------------------------------------------------------------- write failures (disk full)


class FailingWrites:
    """os.write as the store sees it: raises ENOSPC while ``full`` (``torn`` first writes half)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.torn = False
        self.real = os.write
        monkeypatch.setattr(storage.os, "write", self)

    def __call__(self, fd: int, data: bytes) -> int:
        if self.torn:
            self.torn = False
            return self.real(fd, data[: len(data) // 2])
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


def watched(n: Node, cid: str = C):
    sub = n.reg.subscribe(cid)
    assert sub.drain() == []
    return sub


@pytest.mark.parametrize("torn", [False, True])
def test_failed_journal_write_changes_nothing(
    path: Path, monkeypatch: pytest.MonkeyPatch, torn: bool
) -> None:
    seen: list[str | None] = []
    n = Node(path, on_health_change=seen.append)
    n.reg.update(C, A, b"a", [ep(1)], 600, journal=n.store)
    before = state(n.reg)
    sub = watched(n)
    disk = FailingWrites(monkeypatch)
    disk.full, disk.torn = True, torn
    files = segments(path)
    for i in range(20):  # updates, deletes, new and existing affiliates: all refused, nothing changes
        with pytest.raises(StorageUnavailable) as ei:
            n.reg.update(C, f"new{i}", b"x", [ep(2)], 600, journal=n.store)
        assert ei.value.errno == errno.ENOSPC and ei.value.reason == "No space left on device"
        with pytest.raises(StorageUnavailable):
            n.reg.update(C, A, b"changed", [ep(3)], 600, journal=n.store)
        with pytest.raises(StorageUnavailable):
            n.reg.delete(C, A, journal=n.store)
    assert not n.reg.delete(C, "absent", journal=n.store)  # nothing to record: not an error
    assert state(n.reg) == before and sub.drain() == [] and not sub.lost
    assert n.store.degraded == "journal write failed: No space left on device"
    assert seen == ["journal write failed: No space left on device"]  # one transition, not per write
    assert segments(path) == files  # no new (empty) segment per failed write
    assert not n.store.probe()
    assert segments(path) == files
    disk.full = False
    n.reg.update(C, B, b"b", [], 600, journal=n.store)  # the next write recovers
    assert n.store.degraded is None and seen[-1] is None and len(seen) == 2
    assert [c.id for c in sub.drain()] == [B]
    expected = state(n.reg)
    n.store.close()
    m = Node(path)
    assert state(m.reg) == expected
    assert len(m.report.problems) == (1 if torn else 0)  # the torn record, reported, never replayed


def test_probe_recovers_an_idle_store(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []
    n = Node(path, on_health_change=seen.append)
    disk = FailingWrites(monkeypatch)
    disk.full = True
    with pytest.raises(StorageUnavailable):
        n.reg.update(C, A, b"a", [], 600, journal=n.store)
    assert not n.store.probe() and n.store.degraded
    disk.full = False
    assert n.store.probe() and n.store.degraded is None
    assert seen == ["journal write failed: No space left on device", None]
    assert n.store.probe()  # healthy: a no-op


def test_disk_full_at_start_degrades_and_leaves_no_segment(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FailingWrites(monkeypatch)
    disk.full = True
    seen: list[str | None] = []
    n = Node(path, on_health_change=seen.append)
    assert segments(path) == [] and n.store.degraded and seen
    assert any("cannot start a new segment" in p for p in n.report.problems)
    disk.full = False
    n.reg.update(C, A, b"a", [], 600, journal=n.store)
    assert n.store.degraded is None and len(segments(path)) == 1


def test_failed_compaction_keeps_snapshot_and_journal_consistent(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = Node(path)
    populate(n)
    n.store.compact(n.reg)
    s0 = path.read_bytes()
    n.update(C, "after", b"x", [])
    files = segments(path)
    disk = FailingWrites(monkeypatch)
    disk.full = True
    with pytest.raises(StorageUnavailable):  # the checkpoint segment cannot be written
        n.store.compact(n.reg)
    assert segments(path) == files
    assert n.store.degraded is None  # records still go to the current segment: not degraded
    disk.full = False

    def no_space(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "write_atomic", no_space)
    with pytest.raises(OSError):  # the snapshot cannot be written
        n.store.compact(n.reg)
    assert path.read_bytes() == s0 and n.store.degraded is None
    n.update(C, "later", b"y", [])
    expected = state(n.reg)
    n.store.close()
    m = Node(path)
    assert m.report.problems == [] and m.report.snapshot == "verified" and "did not complete" in m.report.note
    assert state(m.reg) == expected


def test_failed_fsync_degrades_until_a_fresh_segment_syncs(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []
    n = Node(path, on_health_change=seen.append, heartbeat=0)
    n.update(C, A, b"a", [])
    real = os.fsync
    failing = [True]

    def fsync(fd: int) -> None:
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    with pytest.raises(StorageUnavailable):
        n.store.sync()
    assert n.store.degraded == "journal fsync failed: Input/output error"
    failing[0] = False
    n.store.sync()  # the segment whose fsync failed is not trusted again
    assert n.store.degraded
    assert n.store.probe()  # starts a new segment
    assert len(segments(path)) == 2
    n.store.sync()
    assert n.store.degraded is None and seen[-1] is None
    n.update(C, B, b"b", [])
    n.store.close()
    assert set(state(Node(path).reg)[C]) == {A, B}


def test_unreadable_snapshot_with_a_checkpoint_is_damage(path: Path) -> None:
    snapshot_then_journal(path)
    path.unlink()
    path.mkdir()  # reading it fails with an OSError
    m = Node(path)
    assert state(m.reg) == JOURNAL_ONLY
    assert m.report.snapshot == "damaged"
    d = m.report.damage
    assert d is not None and d.found == "unreadable" and "is unreadable" in d.message
    assert d.kept_as is not None and path.with_name(d.kept_as).is_dir() and not path.exists()
