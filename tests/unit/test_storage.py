"""Unit tests for snapshot + journal persistence (discovery/server/storage.py)."""

from __future__ import annotations

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
from discovery.server.storage import FRAME_SIZE, MAGIC, CompactReport, Store, parse_journal
from spanapi.discovery.storage import storage_pb2

C = "cluster-1"
A = "node-a"
B = "node-b"
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


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
        self, path: Path, wall: Clock | None = None, mono: Clock | None = None, **kw: object
    ) -> None:
        self.wall = wall or Clock(1_000_000.0)
        self.mono = mono or Clock(500.0)
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
    wall = Clock(n.wall.t + 86_400)  # a day later, in a new process
    m = Node(path, wall=wall, mono=Clock(7.0))
    assert m.reg.expirations(C, A) == (pytest.approx(7.0 + 50), {ep(1): pytest.approx(7.0 + 50)})
    assert m.reg.expirations(C, B) == (pytest.approx(7.0 + 100), {})


def test_heartbeat_records_uptime_while_idle(path: Path) -> None:
    n = Node(path, heartbeat=10.0)
    n.update(C, A, b"a", [], ttl=100)
    n.tick(5)
    n.store.sync()  # not idle long enough: no heartbeat
    n.tick(55)
    n.store.sync()  # heartbeat: the process was alive 60 s after the update
    m = Node(path, wall=Clock(n.wall.t + 3600), mono=Clock(0.0))
    assert m.reg.expirations(C, A)[0] == pytest.approx(40.0)  # type: ignore[index]


def test_snapshot_ages_by_journal_time_after_checkpoint(path: Path) -> None:
    n = Node(path)
    n.update(C, A, b"a", [ep(1)], ttl=100)
    n.tick(10)
    n.store.compact(n.reg)  # A has 90 s left at the checkpoint
    n.tick(30)
    n.update(C, B, b"b", [], ttl=100)
    m = Node(path, wall=Clock(n.wall.t + 999), mono=Clock(0.0))
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
    n = Node(path, wall=Clock(wall), mono=Clock(0.0))
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
