"""The in-memory resource state: namespaced collections, owner-checked writes, watches.

COSI's semantics: per-resource versions, writes checked against the creating controller, optimistic
``update``, no-op writes that change nothing, and watches that never slow a writer. The rules, the
copy discipline and why: docs/design/resource-state.md.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from .definitions import (
    META_NAMESPACE,
    RESOURCE_DEFINITION_TYPE,
    RESOURCE_DEFINITIONS,
    ResourceDefinition,
    resolve,
)
from .errors import (
    AlreadyExistsError,
    ConflictError,
    FinalizersPendingError,
    NotFoundError,
    OwnerConflictError,
    PhaseConflictError,
)
from .query import LabelQuery
from .resource import _IMMUTABLE, Metadata, Phase, Resource, copy_value
from .watch import _BOOTSTRAPPED, Event, EventType, Watch

REGISTRY_OWNER = "meta.registry"
DEFAULT_WATCH_QUEUE = 1024
MODIFY_RETRIES = 10

Key = tuple[str, str]
ModifyFn = Callable[[Resource], "Resource | Awaitable[Resource | None] | None"]
Labels = LabelQuery | Mapping[str, str] | str | None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _ref(namespace: str, type: str, id: str) -> str:
    return f"{namespace}/{type}/{id}"


def _query(labels: Labels) -> LabelQuery | None:
    if labels is None or isinstance(labels, LabelQuery):
        return labels
    if isinstance(labels, str):
        return LabelQuery.parse(labels)
    return LabelQuery.equal(labels)


def _sync_back(dst: Metadata, src: Metadata) -> None:
    dst.version = src.version
    dst.owner = src.owner
    dst.phase = src.phase
    dst.created = src.created
    dst.updated = src.updated
    dst.finalizers = list(src.finalizers)


class State:
    """Namespaced, typed, watchable in-memory resource store (asyncio, single thread)."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] = _utcnow,
        watch_queue_size: int = DEFAULT_WATCH_QUEUE,
    ) -> None:
        if watch_queue_size < 1:
            raise ValueError(f"watch_queue_size must be >= 1, got {watch_queue_size}")
        self._clock = clock
        self._queue_size = watch_queue_size
        self._data: dict[Key, dict[str, Resource]] = {}
        self._watchers: dict[Key, list[Watch]] = {}
        self._register(RESOURCE_DEFINITIONS)

    # ------------------------------------------------------------------ reads

    def _current(self, namespace: str, type: str, id: str) -> Resource:
        cur = self._data.get((namespace, type), {}).get(id)
        if cur is None:
            raise NotFoundError(f"resource {_ref(namespace, type, id)} doesn't exist")
        return cur

    async def get(self, namespace: str, type: str, id: str) -> Resource:
        """A copy of one resource; :class:`NotFoundError` if absent."""
        return self._current(namespace, type, id).copy()

    async def find(self, namespace: str, type: str, id: str) -> Resource | None:
        """A copy of one resource, or None."""
        cur = self._data.get((namespace, type), {}).get(id)
        return None if cur is None else cur.copy()

    async def list(
        self,
        namespace: str,
        type: str,
        *,
        labels: Labels = None,
        id_regexp: str | re.Pattern[str] | None = None,
    ) -> list[Resource]:
        """Copies of the matching resources, sorted by id.

        ``labels``: a :class:`LabelQuery`, a selector string, or a mapping of
        required ``key: value`` pairs. ``id_regexp`` is searched (unanchored,
        as Go's ``MatchString``).
        """
        return [r.copy() for r in self._select(namespace, type, labels, id_regexp)]

    def _select(
        self, namespace: str, type: str, labels: Labels, id_regexp: str | re.Pattern[str] | None
    ) -> list[Resource]:
        coll = self._data.get((namespace, type))
        if not coll:
            return []
        query = _query(labels)
        rx = re.compile(id_regexp) if isinstance(id_regexp, str) else id_regexp
        out = []
        for id in sorted(coll):
            r = coll[id]
            if rx is not None and not rx.search(id):
                continue
            if query is not None and not query.matches(r.metadata.labels):
                continue
            out.append(r)
        return out

    def collections(self, type: str | None = None) -> list[Key]:
        """``(namespace, type)`` pairs that hold at least one resource (optionally of one type)."""
        return sorted(k for k, v in self._data.items() if v and (type is None or k[1] == type))

    # ----------------------------------------------------------------- writes

    def _emit(self, key: Key, ev: Event) -> None:
        ws = self._watchers.get(key)
        if ws:
            id = ev.resource.metadata.id  # type: ignore[union-attr]
            for w in ws[:] if len(ws) > 1 else ws:
                wid = w._id
                if wid is None or wid == id:
                    w._push(ev)

    def _check_owner(self, cur: Resource, owner: str, verb: str) -> None:
        if cur.metadata.owner != owner:
            md = cur.metadata
            raise OwnerConflictError(
                f"resource {_ref(md.namespace, md.type, md.id)} is owned by {md.owner!r}: "
                f"{verb} by {owner!r} refused"
            )

    def _create(self, resource: Resource, owner: str) -> Resource:
        md = resource.metadata
        if not (md.namespace and md.type and md.id):
            raise ValueError(
                f"resource {_ref(md.namespace, md.type, md.id)}: namespace, type and id are required"
            )
        key = (md.namespace, md.type)
        coll = self._data.get(key)
        if coll is None:
            coll = self._data[key] = {}
        cur = coll.get(md.id)
        if cur is not None:
            raise AlreadyExistsError(
                f"resource {_ref(*key, md.id)} already exists (owner {cur.metadata.owner!r})"
            )
        now = self._clock()
        stored = Resource(
            Metadata(
                md.namespace,
                md.type,
                md.id,
                version=1,
                owner=owner,
                created=now,
                updated=now,
                labels=md.labels,
                annotations=md.annotations,
            ),
            copy_value(resource.spec),
        )
        coll[md.id] = stored
        _sync_back(md, stored.metadata)
        self._emit(key, Event(EventType.CREATED, stored))
        return resource

    def _update(self, resource: Resource, owner: str) -> Resource:
        md = resource.metadata
        cur = self._current(md.namespace, md.type, md.id)
        cmd = cur.metadata
        if resource is cur or md is cmd or (resource.spec is cur.spec and type(cur.spec) not in _IMMUTABLE):
            raise ValueError(
                f"update of {_ref(md.namespace, md.type, md.id)} with the stored snapshot itself "
                "(from a watch event?): copy() it before changing it"
            )
        self._check_owner(cur, owner, "update")
        if md.version and md.version != cmd.version:
            raise ConflictError(
                f"resource {_ref(md.namespace, md.type, md.id)}: version conflict: "
                f"stored {cmd.version}, update based on {md.version}"
            )
        if resource.spec == cur.spec and md.labels == cmd.labels and md.annotations == cmd.annotations:
            _sync_back(md, cmd)
            return resource
        new = Resource(
            Metadata(
                md.namespace,
                md.type,
                md.id,
                version=cmd.version + 1,
                owner=owner,
                phase=cmd.phase,
                created=cmd.created,
                updated=self._clock(),
                labels=md.labels,
                annotations=md.annotations,
                finalizers=cmd.finalizers,
            ),
            copy_value(resource.spec),
        )
        self._data[(md.namespace, md.type)][md.id] = new
        _sync_back(md, new.metadata)
        self._emit((md.namespace, md.type), Event(EventType.UPDATED, new, cur))
        return resource

    def _bump(self, cur: Resource, **changes: Any) -> Resource:
        """Store a new snapshot of ``cur`` with metadata ``changes`` (spec shared: snapshots are immutable)."""
        md = cur.metadata.copy()
        for k, v in changes.items():
            setattr(md, k, v)
        md.version += 1
        md.updated = self._clock()
        new = Resource(md, cur.spec)
        self._data[(md.namespace, md.type)][md.id] = new
        self._emit((md.namespace, md.type), Event(EventType.UPDATED, new, cur))
        return new

    async def create(self, resource: Resource, *, owner: str = "") -> Resource:
        """Store a new resource owned by ``owner`` (version 1); :class:`AlreadyExistsError` if present."""
        return self._create(resource, owner)

    async def update(self, resource: Resource, *, owner: str = "") -> Resource:
        """Replace spec/labels/annotations of an existing resource (optimistic on ``metadata.version``)."""
        return self._update(resource, owner)

    async def modify(self, template: Resource, fn: ModifyFn, *, owner: str = "") -> Resource:
        """Read-modify-write: ``fn`` changes a copy of the current resource (or of ``template`` if absent).

        ``fn`` mutates its argument in place or returns a replacement; it may
        be async. Creates the resource when it does not exist. Returns an
        independent copy of the result.
        """
        md = template.metadata
        ref = _ref(md.namespace, md.type, md.id)
        for _ in range(MODIFY_RETRIES):
            cur = self._data.get((md.namespace, md.type), {}).get(md.id)
            if cur is not None:
                self._check_owner(cur, owner, "modify")
                work = cur.copy()
            else:
                work = template.copy()
                work.metadata.version = 0
            out = fn(work)
            if inspect.isawaitable(out):
                out = await out
            if isinstance(out, Resource):
                work = out
            wmd = work.metadata
            if (wmd.namespace, wmd.type, wmd.id) != (md.namespace, md.type, md.id):
                raise ValueError(f"modify of {ref}: fn changed the resource's identity")
            # an async fn may have let another writer in: retry on any change (as COSI does)
            now = self._data.get((md.namespace, md.type), {}).get(md.id)
            if now is not cur:
                continue
            if cur is None:
                self._create(work, owner)
            else:
                wmd.version = cur.metadata.version
                self._update(work, owner)
            return work
        raise ConflictError(f"modify of {ref}: still conflicting after {MODIFY_RETRIES} attempts")

    async def destroy(self, namespace: str, type: str, id: str, *, owner: str = "") -> None:
        """Remove a resource (a DESTROYED event); refused while finalizers are present."""
        cur = self._current(namespace, type, id)
        self._check_owner(cur, owner, "destroy")
        if cur.metadata.finalizers:
            raise FinalizersPendingError(
                f"resource {_ref(namespace, type, id)} has pending finalizers {cur.metadata.finalizers}"
            )
        del self._data[(namespace, type)][id]
        self._emit((namespace, type), Event(EventType.DESTROYED, cur))

    async def teardown(self, namespace: str, type: str, id: str, *, owner: str = "") -> bool:
        """Move to phase ``tearingDown`` (once); True when no finalizers remain (ready to destroy)."""
        cur = self._current(namespace, type, id)
        self._check_owner(cur, owner, "teardown")
        if cur.metadata.phase is not Phase.TEARING_DOWN:
            cur = self._bump(cur, phase=Phase.TEARING_DOWN)
        return not cur.metadata.finalizers

    async def add_finalizer(self, namespace: str, type: str, id: str, *finalizers: str) -> None:
        """Add finalizers (blocks ``destroy``); refused on a resource that is tearing down."""
        cur = self._current(namespace, type, id)
        new = [f for f in dict.fromkeys(finalizers) if f not in cur.metadata.finalizers]
        if not new:
            return
        if cur.metadata.phase is Phase.TEARING_DOWN:
            raise PhaseConflictError(
                f"resource {_ref(namespace, type, id)} is tearing down: no new finalizers"
            )
        self._bump(cur, finalizers=[*cur.metadata.finalizers, *new])

    async def remove_finalizer(self, namespace: str, type: str, id: str, *finalizers: str) -> None:
        cur = self._current(namespace, type, id)
        keep = [f for f in cur.metadata.finalizers if f not in finalizers]
        if len(keep) != len(cur.metadata.finalizers):
            self._bump(cur, finalizers=keep)

    # ------------------------------------------------------------------ watch

    def watch(
        self,
        namespace: str,
        type: str,
        id: str | None = None,
        *,
        bootstrap: bool = True,
        queue_size: int | None = None,
    ) -> Watch:
        """Watch one collection (or one id in it).

        With ``bootstrap``, the existing resources come first as CREATED
        events (sorted by id), then one BOOTSTRAPPED event; then every change
        in order. Registration is immediate (this is not a coroutine), so no
        change between this call and the first ``await`` is lost.
        """
        key = (namespace, type)
        initial: list[Event] = []
        if bootstrap:
            coll = self._data.get(key, {})
            if id is None:
                initial = [Event(EventType.CREATED, coll[i]) for i in sorted(coll)]
            elif id in coll:
                initial = [Event(EventType.CREATED, coll[id])]
            initial.append(_BOOTSTRAPPED)
        w = Watch(namespace, type, id, queue_size or self._queue_size, initial, self._detach)
        self._watchers.setdefault(key, []).append(w)
        return w

    def _detach(self, w: Watch) -> None:
        ws = self._watchers.get((w.namespace, w.type))
        if ws and w in ws:
            ws.remove(w)

    def watcher_count(self, namespace: str, type: str) -> int:
        return len(self._watchers.get((namespace, type), ()))

    # ------------------------------------------------------------ definitions

    def _register(self, definition: ResourceDefinition) -> None:
        cur = self._data.get((META_NAMESPACE, RESOURCE_DEFINITION_TYPE), {}).get(definition.id)
        res = Resource(Metadata(META_NAMESPACE, RESOURCE_DEFINITION_TYPE, definition.id), definition)
        if cur is None:
            self._create(res, REGISTRY_OWNER)
        else:
            self._update(res, REGISTRY_OWNER)

    async def register(self, *definitions: ResourceDefinition) -> None:
        """Store definitions in namespace ``meta`` (re-registering an equal one is a no-op)."""
        for d in definitions:
            self._register(d)

    def definitions(self) -> list[ResourceDefinition]:
        coll = self._data.get((META_NAMESPACE, RESOURCE_DEFINITION_TYPE), {})
        return [coll[i].spec for i in sorted(coll)]

    def definition(self, type: str) -> ResourceDefinition | None:
        """The definition of an exact type name, or None."""
        r = self._data.get((META_NAMESPACE, RESOURCE_DEFINITION_TYPE), {}).get(type.lower())
        return None if r is None else r.spec

    def resolve_type(self, arg: str) -> ResourceDefinition:
        """Resolve a CLI type argument against the registered definitions."""
        return resolve(arg, self.definitions())


def register_all(state: State, definitions: Iterable[ResourceDefinition]) -> None:
    """Synchronous registration (for setup code outside a coroutine)."""
    for d in definitions:
        state._register(d)
