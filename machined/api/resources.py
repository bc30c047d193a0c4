"""``cosi.resource.State`` served by machined: Get, List and Watch, read-only.

* ``type`` is the full type (``KubeSpanPeerStatuses.kubespan.talos.dev``, what talosctl sends after
  resolving against the definitions in namespace ``meta``); an alias (``kubespanpeerstatuses``,
  ``ksps``) is accepted too. An empty ``namespace`` means the type's default namespace.
* Unknown types and namespaces are NOT_FOUND; sensitive types (KubeSpanIdentities, KubeSpanConfigs,
  MachineConfigs) need ``os:admin`` (PERMISSION_DENIED otherwise).
* Write verbs (Create, Update, Destroy, Teardown, TeardownAndDestroy) are not in our ``.proto``;
  :func:`write_refusal_handler` answers them PERMISSION_DENIED "write access is not allowed".
* Specs are sent twice, from the same data: ``yaml_spec`` (what talosctl shows for types it does not
  know) and ``proto_spec``, the spec in Talos's message for the type, which talosctl decodes for
  every type Talos registers and for the resource definitions (``cosi.resource.meta.
  ResourceDefinitionSpec``), see :mod:`machined.api.protospec`. Types of ours alone have no
  ``proto_spec``.
* Watch: ``bootstrap_contents`` replays the current resources as CREATED first; ``api_version`` >= 1
  adds BOOTSTRAPPED after them and reports a watcher that fell behind as ERRORED (older clients get
  the stream ended with ABORTED). ``tail_events`` and bookmarks are refused: the state keeps no history.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from machined.state import (
    AmbiguousTypeError,
    Event,
    EventType,
    LabelOp,
    LabelQuery,
    LabelTerm,
    NotFoundError,
    Resource,
    ResourceDefinition,
    State,
    UnknownTypeError,
)
from spanapi.talos.cosi import resource_pb2, state_pb2, state_pb2_grpc

from .convert import resource
from .roles import allowed, is_admin, roles_from_metadata

SERVICE = "/cosi.resource.State/"
WRITE_METHODS = ("Create", "Update", "Destroy", "Teardown", "TeardownAndDestroy")
WRITE_DENIED = "write access is not allowed"
MAX_BATCH = 256

_EVENT_TYPES = {
    EventType.CREATED: state_pb2.CREATED,
    EventType.UPDATED: state_pb2.UPDATED,
    EventType.DESTROYED: state_pb2.DESTROYED,
    EventType.BOOTSTRAPPED: state_pb2.BOOTSTRAPPED,
    EventType.ERRORED: state_pb2.ERRORED,
}


class QueryError(ValueError):
    pass


def label_query(q: resource_pb2.LabelQuery) -> LabelQuery:
    terms = []
    for t in q.terms:
        values = tuple(t.value)
        if t.op == resource_pb2.LabelTerm.EXISTS:
            terms.append(LabelTerm(t.key, LabelOp.EXISTS, invert=t.invert))
        elif t.op == resource_pb2.LabelTerm.NOT_EXISTS:
            terms.append(LabelTerm(t.key, LabelOp.EXISTS, invert=not t.invert))
        elif t.op == resource_pb2.LabelTerm.EQUAL:
            if len(values) != 1:
                raise QueryError(f"label term {t.key!r}: equal takes exactly one value")
            terms.append(LabelTerm(t.key, LabelOp.EQUAL, values, invert=t.invert))
        elif t.op == resource_pb2.LabelTerm.IN:
            terms.append(LabelTerm(t.key, LabelOp.IN, values, invert=t.invert))
        else:
            name = resource_pb2.LabelTerm.Operation.Name(t.op)
            raise QueryError(f"label term {t.key!r}: operation {name} is not supported")
    return LabelQuery(tuple(terms))


class Filter:
    """Label queries (any of them; every term within one) and an id regexp."""

    def __init__(self, queries: Any, id_query: Any) -> None:
        self.queries = [label_query(q) for q in queries]
        self.id_re: re.Pattern[str] | None = None
        if id_query is not None and id_query.regexp:
            try:
                self.id_re = re.compile(id_query.regexp)
            except re.error as e:
                raise QueryError(f"id_query: invalid regexp: {e}") from None

    def matches(self, r: Resource) -> bool:
        if self.id_re is not None and not self.id_re.search(r.metadata.id):
            return False
        return not self.queries or any(q.matches(r.metadata.labels) for q in self.queries)


def guard(name: str, streaming: bool = False) -> Callable[[Any], Any]:
    method = SERVICE + name

    def deco(fn: Any) -> Any:
        if streaming:

            @functools.wraps(fn)
            async def gen(self: StateServicer, request: Any, context: Any) -> AsyncIterator[Any]:
                roles = roles_from_metadata(context.invocation_metadata())
                if not allowed(method, roles):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not authorized")
                async for item in fn(self, request, context, roles):
                    yield item

            return gen

        @functools.wraps(fn)
        async def unary(self: StateServicer, request: Any, context: Any) -> Any:
            roles = roles_from_metadata(context.invocation_metadata())
            if not allowed(method, roles):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not authorized")
            return await fn(self, request, context, roles)

        return unary

    return deco


class StateServicer(state_pb2_grpc.StateServicer):
    def __init__(self, state: State) -> None:
        self.state = state

    async def _resolve(
        self, namespace: str, type: str, roles: frozenset[str], context: Any
    ) -> tuple[str, ResourceDefinition]:
        d = self.state.definition(type)
        if d is None:
            try:
                d = self.state.resolve_type(type)
            except (UnknownTypeError, AmbiguousTypeError) as e:
                code = (
                    grpc.StatusCode.INVALID_ARGUMENT
                    if isinstance(e, AmbiguousTypeError)
                    else grpc.StatusCode.NOT_FOUND
                )
                await context.abort(code, str(e))
        assert d is not None
        ns = namespace or d.default_namespace
        known = {x.default_namespace for x in self.state.definitions()}
        if ns not in known and (ns, d.type) not in self.state.collections(d.type):
            await context.abort(grpc.StatusCode.NOT_FOUND, f'namespace "{ns}" is not registered')
        if d.sensitive and not is_admin(roles):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{d.type} is sensitive: the os:admin role is required"
            )
        return ns, d

    async def _filter(self, context: Any, queries: Any, id_query: Any) -> Filter:
        try:
            return Filter(queries, id_query)
        except QueryError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # unreachable: abort raises

    @guard("Get")
    async def Get(
        self, request: state_pb2.GetRequest, context: Any, roles: frozenset[str]
    ) -> state_pb2.GetResponse:
        ns, d = await self._resolve(request.namespace, request.type, roles, context)
        try:
            r = await self.state.get(ns, d.type, request.id)
        except NotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return state_pb2.GetResponse(resource=resource(r))

    @guard("List", streaming=True)
    async def List(
        self, request: state_pb2.ListRequest, context: Any, roles: frozenset[str]
    ) -> AsyncIterator[state_pb2.ListResponse]:
        ns, d = await self._resolve(request.namespace, request.type, roles, context)
        opts = request.options
        f = await self._filter(
            context, opts.label_query, opts.id_query if opts.HasField("id_query") else None
        )
        for r in await self.state.list(ns, d.type):
            if f.matches(r):
                yield state_pb2.ListResponse(resource=resource(r))

    @guard("Watch", streaming=True)
    async def Watch(
        self, request: state_pb2.WatchRequest, context: Any, roles: frozenset[str]
    ) -> AsyncIterator[state_pb2.WatchResponse]:
        ns, d = await self._resolve(request.namespace, request.type, roles, context)
        opts = request.options
        if opts.tail_events > 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "tail_events is not supported: machined keeps no watch history (use bootstrap_contents)",
            )
        if opts.HasField("start_from_bookmark") or opts.bootstrap_bookmark:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bookmarks are not supported")
        f = await self._filter(
            context, opts.label_query, opts.id_query if opts.HasField("id_query") else None
        )
        v1 = request.api_version >= 1
        rid = request.id if request.HasField("id") and request.id else None
        async with self.state.watch(ns, d.type, rid, bootstrap=opts.bootstrap_contents) as w:
            while True:
                try:
                    ev = await w.__anext__()
                except StopAsyncIteration:
                    return
                batch: list[state_pb2.Event] = []
                while True:
                    out = self._event(ev, f, v1)
                    if out is not None:
                        batch.append(out)
                    if ev.type is EventType.ERRORED:
                        if batch:
                            yield state_pb2.WatchResponse(event=batch)
                        if not v1:
                            await context.abort(grpc.StatusCode.ABORTED, ev.error or "watch failed")
                        return
                    if len(batch) >= MAX_BATCH or not w.pending():
                        break
                    ev = await w.__anext__()
                if batch:
                    yield state_pb2.WatchResponse(event=batch)

    @staticmethod
    def _event(ev: Event, f: Filter, v1: bool) -> state_pb2.Event | None:
        if ev.type is EventType.BOOTSTRAPPED:
            return state_pb2.Event(event_type=state_pb2.BOOTSTRAPPED) if v1 else None
        if ev.type is EventType.ERRORED:
            return state_pb2.Event(event_type=state_pb2.ERRORED, error=ev.error or "") if v1 else None
        r = ev.resource
        assert r is not None
        kind = _EVENT_TYPES[ev.type]
        if not f.matches(r):
            # an update that moves a resource out of the selection looks like its removal
            if ev.type is EventType.UPDATED and ev.old is not None and f.matches(ev.old):
                return state_pb2.Event(event_type=state_pb2.DESTROYED, resource=resource(ev.old))
            return None
        out = state_pb2.Event(event_type=kind, resource=resource(r))
        if ev.type is EventType.UPDATED and ev.old is not None:
            if f.matches(ev.old):
                out.old.CopyFrom(resource(ev.old))
            else:
                out.event_type = state_pb2.CREATED
        return out


def write_refusal_handler() -> grpc.GenericRpcHandler:
    """Answers the COSI write verbs (not in our .proto) with PERMISSION_DENIED."""

    async def refuse(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, WRITE_DENIED)
        return b""

    handler = grpc.unary_unary_rpc_method_handler(refuse)  # raw bytes in and out

    class _Refuse(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            method = details.method or ""
            if method.startswith(SERVICE) and method[len(SERVICE) :] in WRITE_METHODS:
                return handler
            return None

    return _Refuse()
