"""Moving from the embedded store to etcd: ``discovery-service --store etcd --import-snapshot FILE`` (issue 15).

The snapshot (the file ``--snapshot-path`` writes) and the journal segments beside it are read with the
embedded store's own loader (:meth:`Store.load`: verification against the journal's checkpoint, journal
replay), on copies in a temporary directory, so the source files are never touched (a damaged snapshot is
not moved aside, no journal segment is started). Every unexpired affiliate is then written through
:class:`EtcdBackend`, so etcd's limits, validation and bucket leases apply exactly as for a client's
update, with its data, its endpoints and their remaining TTLs: the snapshot's TTLs minus the time since the
state was last written (the journal's newest record, or the snapshot's mtime when there is no journal),
so an entry that expired while the registry was stopped is skipped, never imported.

Idempotent: an affiliate already in etcd with the same data and endpoints, in the same or a later lease
bucket, is not written again (EtcdBackend writes only new data, new endpoints or a move to a later bucket),
so a second import changes nothing visible. An affiliate etcd already holds with data keeps that data (a
node that republished to the replicas has newer data than the snapshot); the snapshot only adds its
endpoints and extends TTLs, never shortens them. A damaged snapshot or journal is refused
(:class:`ImportRefused`, naming the file and the problem); nothing is written then. Affiliate data,
endpoints and IDs are never logged: problems name entries by position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from discovery.etcd.client import TLSFiles
from discovery.limits import DEFAULT_LIMITS, Limits
from discovery.server.backend import StoreUnavailable
from discovery.server.etcdstore import DEFAULT_BUCKET, DEFAULT_PREFIX, EtcdBackend
from discovery.server.state import Registry, RegistryError
from discovery.server.storage import Store, parse_journal
from spanutil.logs import log_event

__all__ = [
    "ImportFailed",
    "ImportRefused",
    "ImportReport",
    "LoadedSnapshot",
    "import_snapshot",
    "read_snapshot",
]

log = logging.getLogger("discovery.server.import")

CONCURRENCY = 16  # affiliates written at once
READY_TIMEOUT = 15.0  # how long to wait for etcd before giving up


class ImportRefused(Exception):
    """The snapshot (or its journal) is missing, unreadable or damaged: nothing was imported (exit 2)."""


class ImportFailed(Exception):
    """etcd could not be reached or refused to continue; part of the snapshot may be imported (exit 1).
    Running the import again is safe."""


@dataclass
class LoadedSnapshot:
    """The embedded state as the embedded server would restore it; expirations on ``registry``'s clock
    (``time.monotonic``) are as of ``age`` seconds ago (when the state was last written)."""

    path: Path
    registry: Registry
    age: float
    verification: str  # the loader's outcome: verified / unverified
    journal_segments: int
    journal_records: int
    skipped_invalid: int  # entries the loader skipped as invalid (limits), counted, never shown


@dataclass
class ImportReport:
    clusters: int = 0  # clusters with at least one affiliate imported
    affiliates: int = 0  # affiliates now in etcd from the snapshot (written or already there)
    endpoints: int = 0
    written: int = 0  # affiliates whose import changed something visible
    unchanged: int = 0  # affiliates etcd already held as in the snapshot
    expired_affiliates: int = 0  # skipped: expired since the state was written
    expired_endpoints: int = 0
    rejected: int = 0  # refused by etcd's limits (e.g. the cluster is full there)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "clusters": self.clusters,
            "affiliates": self.affiliates,
            "endpoints": self.endpoints,
            "written": self.written,
            "unchanged": self.unchanged,
            "expired_affiliates": self.expired_affiliates,
            "expired_endpoints": self.expired_endpoints,
            "rejected": self.rejected,
        }


_DAMAGE_HINT = (
    "nothing was imported. Keep these files. To import what can be recovered, run the embedded "
    "discovery-service once on a copy of them (it loads what it can and logs what it lost) and stop it "
    "with SIGTERM (it writes a fresh snapshot and journal checkpoint), then import the copy"
)


def read_snapshot(path: Path, limits: Limits = DEFAULT_LIMITS) -> LoadedSnapshot:
    """Load ``path`` and its journal like the embedded server does; raise :class:`ImportRefused` if the
    snapshot is missing, unreadable or damaged, or the journal is damaged."""
    path = Path(path)
    try:
        st = path.stat()
        if not path.is_file():
            raise ImportRefused(f"snapshot {path}: not a regular file")
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise ImportRefused(f"snapshot {path}: no such file") from None
    except OSError as e:
        raise ImportRefused(f"snapshot {path}: unreadable ({e.strerror or e})") from None
    probe = Store(path)
    segments = probe._segment_files()  # the journal segments beside it (<name>.journal.<n>)
    with tempfile.TemporaryDirectory(prefix="discovery-import-") as tmp:
        copy = Path(tmp) / path.name
        problems: list[str] = []
        newest: float | None = None
        records = 0
        try:
            shutil.copy2(path, copy)
            for _, seg in segments:
                shutil.copy2(seg, Path(tmp) / seg.name)
                recs = parse_journal((Path(tmp) / seg.name).read_bytes(), seg.name, problems)
                records += len(recs)
                for r in recs:
                    newest = r.wall if newest is None else max(newest, r.wall)
        except OSError as e:
            raise ImportRefused(
                f"snapshot {path}: cannot read {e.filename or 'a journal segment'} ({e.strerror or e})"
            ) from None
        registry = Registry(limits)
        store = Store(copy)
        try:
            report = store.load(registry)
        finally:
            with contextlib.suppress(OSError):
                store.close()
    d = report.damage
    if d is not None:
        what = (
            "is missing"
            if d.found == "missing"
            else "is unreadable"
            if d.found == "unreadable"
            else f"is {d.length} bytes with CRC32 {d.crc:#010x}"
        )
        raise ImportRefused(
            f"snapshot {path}: damaged (corrupt): it {what}, but the newest journal checkpoint "
            f"({d.checkpoint}) expects {d.expected_length} bytes with CRC32 {d.expected_crc:#010x}; "
            + _DAMAGE_HINT
        )
    # Whole-file problems (a corrupt snapshot, damaged journal records) refuse the import; entries the
    # loader skipped as invalid (limits, rejected on replay) are only counted.
    damaged = [
        p
        for p in report.problems
        if p.startswith(f"snapshot {path.name}:")
        or (p.startswith("journal") and "rejected on replay" not in p)
    ]
    if damaged:
        first = damaged[0]
        if first.startswith("snapshot"):  # "snapshot <name>: corrupt, skipped (...)"
            first = f"snapshot {path}:" + first[len(f"snapshot {path.name}:") :].replace(", skipped", "", 1)
        else:  # "journal <segment>[ @offset]: ..."
            first = f"journal {path.parent}/" + first[len("journal ") :]
        more = f" (and {len(damaged) - 1} more problems)" if len(damaged) > 1 else ""
        raise ImportRefused(f"{first}{more}; {_DAMAGE_HINT}")
    # The state's expirations are relative to when it was last written: the journal's newest record
    # (every load opens a new segment, so a restarted server's downtime shows there), else the snapshot.
    written = newest if newest is not None else st.st_mtime
    return LoadedSnapshot(
        path=path,
        registry=registry,
        age=max(0.0, time.time() - written),
        verification=report.snapshot,
        journal_segments=len(segments),
        journal_records=report.records,
        skipped_invalid=len(report.problems),
    )


async def import_snapshot(
    loaded: LoadedSnapshot, backend: EtcdBackend, concurrency: int = CONCURRENCY
) -> ImportReport:
    """Write every unexpired affiliate of ``loaded`` through ``backend`` (started and ready).

    Per affiliate: one update with its data and TTL, then one per lease bucket of its endpoints (with
    the longest remaining TTL of that bucket), so every key lands in the bucket a client's update at
    that TTL would put it in. Raises :class:`ImportFailed` when etcd becomes unavailable."""
    reg = loaded.registry
    rep = ImportReport()
    sem = asyncio.Semaphore(max(1, concurrency))
    imported_clusters: set[str] = set()
    failure: list[str] = []
    started = time.monotonic()
    age = loaded.age

    async def one(ci: int, cid: str, ai: int, aid: str, data: bytes) -> None:
        exps = reg.expirations(cid, aid)
        if exps is None:
            return
        exp, eps = exps
        async with sem:
            if failure:
                return
            now = time.monotonic()
            rem = exp - now - age
            if not rem > 0:
                rep.expired_affiliates += 1
                rep.expired_endpoints += len(eps)
                return
            groups: dict[int, list[tuple[bytes, float]]] = {}
            wall = time.time()
            for ep, eexp in eps.items():
                erem = eexp - now - age
                if not erem > 0:
                    rep.expired_endpoints += 1
                    continue
                groups.setdefault(math.floor((wall + erem) / backend.bucket), []).append((ep, erem))
            # An affiliate etcd already holds with data keeps it: a node that republished to the
            # replicas has newer data than the snapshot. Endpoints are only added, TTLs only extended.
            there = in_etcd.get(cid, {}).get(aid)
            try:
                changed = await backend.update(cid, aid, None if there else data, [], rem)
                for _, members in sorted(groups.items()):
                    ttl = max(r for _, r in members)
                    changed |= await backend.update(cid, aid, None, [ep for ep, _ in members], ttl)
            except RegistryError as e:
                rep.rejected += 1
                rep.problems.append(f"cluster #{ci} affiliate #{ai}: refused by etcd's limits: {e}")
                return
            except StoreUnavailable as e:
                failure.append(e.reason)
                return
            imported_clusters.add(cid)
            rep.affiliates += 1
            rep.endpoints += sum(len(m) for m in groups.values())
            if changed:
                rep.written += 1
            else:
                rep.unchanged += 1

    jobs = []
    in_etcd: dict[str, dict[str, bytes]] = {}  # cluster -> affiliate -> data, from the synced mirror
    for cid in reg.cluster_ids():
        held = {v.id: v.data for v in backend.mirror.list(cid) if v.data}
        if held:
            in_etcd[cid] = held
    for ci, cid in enumerate(sorted(reg.cluster_ids())):
        for ai, view in enumerate(sorted(reg.list(cid), key=lambda v: v.id)):
            jobs.append(one(ci, cid, ai, view.id, view.data))
    await asyncio.gather(*jobs)
    rep.clusters = len(imported_clusters)
    if failure:
        raise ImportFailed(
            f"etcd became unavailable during the import ({failure[0]}); {rep.affiliates} affiliates were "
            "imported so far; running the import again is safe"
        )
    log_event(log, "import finished", duration_s=round(time.monotonic() - started, 3), **rep.summary())
    return rep


async def run_import(
    snapshot: str | Path,
    endpoints: Sequence[str],
    *,
    prefix: str = DEFAULT_PREFIX,
    tls: TLSFiles | None = None,
    bucket: float = DEFAULT_BUCKET,
    limits: Limits = DEFAULT_LIMITS,
    ready_timeout: float = READY_TIMEOUT,
) -> ImportReport:
    """Read ``snapshot`` (refusing a damaged one before connecting), connect to etcd, import."""
    loaded = read_snapshot(Path(snapshot), limits)
    c, a, e, _ = loaded.registry.stats()
    log_event(
        log,
        "snapshot read for import",
        path=str(loaded.path),
        snapshot=loaded.verification,
        journal_segments=loaded.journal_segments,
        journal_records=loaded.journal_records,
        clusters_loaded=c,
        affiliates_loaded=a,
        endpoints_loaded=e,
        written_ago_s=round(loaded.age, 1),
        skipped_invalid=loaded.skipped_invalid or None,
    )
    backend = EtcdBackend(endpoints, prefix=prefix, tls=tls, bucket=bucket, limits=limits)
    await backend.start()
    try:
        if not await backend.wait_ready(ready_timeout):
            raise ImportFailed(
                f"etcd at {', '.join(endpoints)} not ready within {ready_timeout:g} s "
                f"({backend.health()}); nothing was imported"
            )
        report = await import_snapshot(loaded, backend)
    finally:
        await backend.stop()
    for problem in report.problems[:20]:
        log_event(log, "affiliate not imported", logging.WARNING, problem=problem)
    return report
