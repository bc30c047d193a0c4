"""The dashboard's data: resource watches through apid, one set per node, kept as the view model's input.

Each node gets a loop: ``Hostname`` and ``Version`` (who it is), then one ``State.Watch`` per kind of
:data:`~.model.KINDS` (bootstrapped, so a reconnect starts from the full current set) and a heartbeat
(``Hostname`` every ``heartbeat`` s with as long to answer: a node that dies behind the mesh sends no
reset, so its streams would hang; one missed answer shows it unreachable at once, within 2 s, with its
streams kept, the next answer shows it back; ``heartbeat_misses`` in a row end the streams and reconnect). Any failure marks the node unreachable with its data kept and marked stale, and the loop
tries again every ``retry`` s; a restarted node comes back with fresh data, never dropped in between.

Without explicit nodes the collector lists the Members of the node it is pointed at (every
``discover_every`` s) and watches each member at its first address, as ``spanctl -n`` would reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import empty_pb2

from machined import tlsterm
from spanapi.talos.cosi import state_pb2, state_pb2_grpc
from spanapi.talos.machine import machine_pb2_grpc

from ..client import MAX_MESSAGE, ConnectionSetupError, Target, describe_rpc_error, tcp_target
from ..output import spec_data
from . import model
from .source import ViewSource

log = logging.getLogger("spanctl.dashboard")

# a kind this node cannot give us (older node, role without access): shown empty, not a dead node
_KIND_UNAVAILABLE = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
)


def aio_channel(target: Target) -> Any:
    """An asyncio channel to ``target``: mTLS to apid with the context's certificates (as every spanctl
    command: TLS through Python's ssl, so Talos's Ed25519 talosconfig works; a
    :class:`machined.tlsterm.TlsChannel`), or machined's unix socket without TLS. Call it inside the
    running event loop (the TLS dialer serves on it)."""
    opts = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if target.direct:
        return grpc.aio.insecure_channel(f"unix:{target.socket}", options=opts)
    ctx = target.context
    missing = [k for k in ("ca", "crt", "key") if not getattr(ctx, k)]
    if missing:
        raise ConnectionSetupError(
            f"the client config context has no {', '.join(missing)}: cannot authenticate to apid"
        )
    try:
        tls = tlsterm.client_context(ctx.ca, None, ctx.crt, ctx.key)
    except (tlsterm.TlsSetupError, ValueError) as e:
        raise ConnectionSetupError(f"the client config context's ca/crt/key cannot be used: {e}") from None
    return tlsterm.TlsChannel.create(tcp_target(target.endpoint), tls, opts)


def _first_error(eg: BaseExceptionGroup) -> BaseException:
    """The first real failure inside a task group's exception group (the others were cancelled)."""
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first_error(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return eg.exceptions[0]


class NodeGone(Exception):
    """A node's stream or heartbeat failed: the message says why (never a secret)."""


@dataclass
class NodeState:
    """Mutable per-node state behind a :class:`~.model.NodeInput`."""

    target: str
    name: str = ""
    reach: str = model.REACH_CONNECTING
    error: str = ""
    since: float | None = None
    stale: bool = False
    version: str = ""
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    booted: bool = False  # every watch of the current connection bootstrapped
    task: asyncio.Task[None] | None = None

    def snapshot(self) -> model.NodeInput:
        return model.NodeInput(
            self.target,
            self.name,
            self.reach,
            self.error,
            self.since,
            self.stale,
            self.version,
            {k: dict(v) for k, v in self.resources.items()},
        )


class Collector(ViewSource):
    """Watches every node through one channel and keeps what the view model needs."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        direct: bool = False,
        targets: list[str] | None = None,
        seed: str | None = None,
        where: str = "",
        timeout: float = 5.0,
        retry: float = 1.0,
        heartbeat: float = 1.0,
        heartbeat_misses: int = 3,
        discover_every: float = 5.0,
        clock: Callable[[], float] = time.time,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``metadata``: sent on every call besides the ``node`` routing (``-c/--cluster``'s ``context``)."""
        self.channel = channel
        self.metadata = list(metadata)
        self.direct = direct
        self.targets = targets
        self.seed = seed
        self.where = where
        self.timeout = timeout
        self.retry = retry
        self.heartbeat = heartbeat
        self.heartbeat_misses = heartbeat_misses
        self.discover_every = discover_every
        super().__init__(clock, {"ok": False, "state": "connecting", "error": "", "since": clock()})
        self.nodes: dict[str, NodeState] = {}
        self.discovery_error = ""
        self.machine = machine_pb2_grpc.MachineServiceStub(channel)
        self.state = state_pb2_grpc.StateStub(channel)

    # -- change notification ----------------------------------------------------------------------

    def node_inputs(self) -> list[model.NodeInput]:
        nodes = [n.snapshot() for n in self.nodes.values()]
        if not nodes and self.discovery_error:
            label = self.seed or self.where or "(endpoint)"
            nodes = [
                model.NodeInput(self.seed or "", label, model.REACH_UNREACHABLE, self.discovery_error, None)
            ]
        return nodes

    # -- running ----------------------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._watch_link())]
        if self.targets is not None or self.direct:
            for t in self.targets or [""]:
                self.add(t)
        else:
            tasks.append(asyncio.create_task(self._discover()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for n in self.nodes.values():
                if n.task is not None:
                    n.task.cancel()
            await asyncio.gather(
                *tasks, *(n.task for n in self.nodes.values() if n.task), return_exceptions=True
            )

    def add(self, target: str, name: str = "") -> NodeState:
        st = self.nodes.get(target)
        if st is None:
            st = NodeState(target, name, since=self.clock())
            self.nodes[target] = st
            st.task = asyncio.create_task(self._node_loop(st))
            self.changed()
        return st

    def _md(self, target: str) -> list[tuple[str, str]]:
        return ([] if self.direct or not target else [("node", target)]) + self.metadata

    async def _watch_link(self) -> None:
        """The channel's connectivity as ``link`` (apid lost: every node's data is stale meanwhile)."""
        while True:
            s = self.channel.get_state(try_to_connect=True)
            ok = s in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE)
            name = s.name.lower() if hasattr(s, "name") else str(s)
            if ok != self.link["ok"] or name != self.link["state"]:
                err = "" if ok else f"{self.where or 'the endpoint'}: {name.replace('_', ' ')}"
                self.link = {"ok": ok, "state": name, "error": err, "since": self.clock()}
                self.changed()
            await asyncio.sleep(0.25)

    async def _discover(self) -> None:
        while True:
            try:
                members = await self._members()
                self.discovery_error = ""
                for name, addr in members:
                    if addr not in self.nodes and not any(n.name == name for n in self.nodes.values()):
                        self.add(addr, name)
            except grpc.RpcError as e:
                msg = "listing members: " + describe_rpc_error(e, self.where)
                if msg != self.discovery_error:
                    self.discovery_error = msg
                    self.changed()
            await asyncio.sleep(self.discover_every)

    async def _members(self) -> list[tuple[str, str]]:
        ns, typ = model.KINDS["members"]
        out: list[tuple[str, str]] = []
        call = self.state.List(
            state_pb2.ListRequest(namespace=ns, type=typ),
            metadata=self._md(self.seed or ""),
            timeout=self.timeout,
        )
        async for r in call:
            spec = spec_data(r.resource) or {}
            name = str(spec.get("hostname") or r.resource.metadata.id)
            addrs = [str(a) for a in spec.get("addresses") or ()]
            addrs.sort(key=lambda a: ":" in a)  # IPv4 first
            if addrs:
                out.append((name, addrs[0]))
        return out

    async def _node_loop(self, st: NodeState) -> None:
        while True:
            try:
                await self._follow(st)
                raise NodeGone("watch ended")
            except asyncio.CancelledError:
                raise
            except (NodeGone, grpc.RpcError, OSError) as e:
                msg = describe_rpc_error(e, self._via(st.target)) if isinstance(e, grpc.RpcError) else str(e)
                self._set_reach(st, model.REACH_UNREACHABLE, msg)
            except Exception as e:  # a bug must not end the node's loop: show it and try again
                log.exception("dashboard: node %s", st.target)
                self._set_reach(st, model.REACH_UNREACHABLE, f"internal error: {type(e).__name__}")
            await asyncio.sleep(self.retry)

    def _set_reach(self, st: NodeState, reach: str, error: str = "") -> None:
        stale = reach != model.REACH_OK and bool(st.resources)
        if (st.reach, st.error, st.stale) == (reach, error, stale):
            return
        if st.reach != reach:
            st.since = self.clock()
        st.reach, st.error, st.stale = reach, error, stale
        self.changed()

    async def _follow(self, st: NodeState) -> None:
        md = self._md(st.target)
        hn = await self.machine.Hostname(empty_pb2.Empty(), metadata=md, timeout=self.timeout)
        st.name = self._first(hn).hostname or st.name
        ver = await self.machine.Version(empty_pb2.Empty(), metadata=md, timeout=self.timeout)
        st.version = self._first(ver).version.tag
        pending = set(model.KINDS)
        st.booted = False

        def bootstrapped(kind: str) -> None:
            pending.discard(kind)
            if not pending:
                st.booted = True
                self._set_reach(st, model.REACH_OK)

        try:
            async with asyncio.TaskGroup() as tg:
                for kind in model.KINDS:
                    tg.create_task(self._watch(st, kind, md, bootstrapped))
                tg.create_task(self._heartbeat(st, md))
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None

    @staticmethod
    def _first(resp: Any) -> Any:
        if not resp.messages:
            raise NodeGone("empty answer")
        m = resp.messages[0]
        if m.metadata.error:
            raise NodeGone(m.metadata.error)
        return m

    def _via(self, target: str) -> str:
        """Where a node's call went, for its error: the node through apid (the endpoint)."""
        if self.direct or not target:
            return self.where or "the endpoint"
        return f"{target} (through {self.where})" if self.where else target

    async def _heartbeat(self, st: NodeState, md: list[tuple[str, str]]) -> None:
        misses = 0
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                resp = await self.machine.Hostname(empty_pb2.Empty(), metadata=md, timeout=self.heartbeat)
                self._first(resp)
            except (grpc.RpcError, NodeGone) as e:
                misses += 1
                msg = describe_rpc_error(e, self._via(st.target)) if isinstance(e, grpc.RpcError) else str(e)
                if misses >= self.heartbeat_misses:
                    raise NodeGone(msg) from None
                self._set_reach(st, model.REACH_UNREACHABLE, msg)
                continue
            if misses and st.booted:
                self._set_reach(st, model.REACH_OK)
            misses = 0

    async def _watch(
        self, st: NodeState, kind: str, md: list[tuple[str, str]], bootstrapped: Callable[[str], None]
    ) -> None:
        ns, typ = model.KINDS[kind]
        req = state_pb2.WatchRequest(
            namespace=ns, type=typ, options=state_pb2.WatchOptions(bootstrap_contents=True), api_version=1
        )
        fresh: dict[str, Any] = {}
        boot = False
        call = self.state.Watch(req, metadata=md)
        try:
            async for resp in call:
                for ev in resp.event:
                    if ev.event_type == state_pb2.BOOTSTRAPPED:
                        boot = True
                        st.resources[kind] = fresh
                        bootstrapped(kind)
                    elif ev.event_type == state_pb2.ERRORED:
                        raise NodeGone(f"{kind} watch: {ev.error or 'failed'}")
                    elif ev.event_type == state_pb2.DESTROYED:
                        fresh.pop(ev.resource.metadata.id, None)
                    else:
                        fresh[ev.resource.metadata.id] = spec_data(ev.resource)
                if boot:
                    if kind == "peers":
                        self.history = model.observe(
                            self.history, st.name or st.target, fresh.values(), self.clock()
                        )
                    self.changed()
        except grpc.RpcError as e:
            if e.code() in _KIND_UNAVAILABLE and not boot:
                st.resources[kind] = {}
                bootstrapped(kind)
                await asyncio.Event().wait()  # this kind stays empty until the node's loop restarts
            raise
        finally:
            with contextlib.suppress(Exception):
                call.cancel()
        raise NodeGone(f"{kind} watch ended")
