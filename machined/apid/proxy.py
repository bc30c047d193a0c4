"""The apid proxy: authorize, then route raw request bytes (machined.md §3, "Routing").

1. ``proxyfrom`` metadata present: the call was already forwarded by another apid — serve it from the
   local machined, never forward again (loop prevention).
2. ``node: X`` (exactly one value): forward one-to-one to the apid at ``X`` (port 50000 unless X
   names one) over mTLS with this node's ``os:impersonator`` certificate, passing the caller's
   roles as ``talos-role`` and setting ``proxyfrom``.
3. ``nodes: a, b…`` (one value per node, or comma-separated): fan out concurrently and merge
   (:mod:`.wire`): unary replies concatenated, streams interleaved, each item's
   ``metadata.hostname`` set to the target as given; a node that fails becomes
   one item whose ``metadata.error`` says why while the others answer. Only for the envelope
   services (``machine.``, ``cluster.``, ``inspect.``, ``storage.``, ``time.``); COSI State gets
   INVALID_ARGUMENT.
4. Neither: the local machined on its unix socket, with ``talos-role`` set to the caller's roles.

Who the caller is comes from the TLS terminator (:mod:`.tlsterm`): the verified client certificate of
the connection a call arrived on (:class:`~.tlsterm.PeerRegistry`), never from anything the client
sends. Bytes are never decoded; unary vs server-streaming comes from the descriptor pool of our stubs
(plus Talos's list of streaming method names for methods we have no descriptor for).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool

import spanapi.talos.cosi.state_pb2
import spanapi.talos.machine.machine_pb2  # noqa: F401  (registers descriptors)
from machined import tlsterm
from machined.api.roles import ROLE_METADATA, allowed, role_metadata

from . import wire
from .channels import DEFAULT_IDLE, DEFAULT_MAX_CHANNELS, ChannelCache
from .rules import effective_roles
from .tls import Identity

log = logging.getLogger("apid")

APID_PORT = 50000
MAX_MESSAGE = 32 << 20
PROXYFROM = "proxyfrom"
NODE = "node"
NODES = "nodes"
FANOUT_PREFIXES = ("/machine.", "/cluster.", "/inspect.", "/storage.", "/time.")
MAX_TARGET_LEN = 255  # characters in one node target (a DNS name is at most 253, plus a port)
MAX_FANOUT = 256  # targets one call's nodes metadata may name
DEFAULT_BACKEND_TIMEOUT = 30.0  # unary calls to other nodes when the client set no deadline
REMOTE_MARGIN = 1.0  # seconds: calls to other nodes end this much before the caller's deadline
_STRIP = frozenset({ROLE_METADATA, NODE, NODES, PROXYFROM, "user-agent", "content-type", "te"})
_TALOS_STREAMING = frozenset(
    "Logs Dmesg Events List Read Copy DiskUsage Kubeconfig EtcdSnapshot PacketCapture Watch "
    "HealthCheck ImagePull Install Upgrade".split()
)
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_reconnect_backoff_ms", 15000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    # grpc core also takes min_reconnect_backoff_ms as the connect timeout: leave it at its 20 s
    # default (Talos's too), or a TCP+TLS handshake slower than it (a long path, a WireGuard
    # handshake on the first packet through the mesh) fails the call.
]


@functools.lru_cache(maxsize=1024)
def method_kind(method: str) -> str:
    """``unary``, ``server_stream`` or ``client_stream`` (bidi counts as client_stream: not proxied)."""
    try:
        service, name = method.lstrip("/").rsplit("/", 1)
    except ValueError:
        return "unary"
    try:
        m = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        m = None
    if m is not None:
        if m.client_streaming:
            return "client_stream"
        return "server_stream" if m.server_streaming else "unary"
    return "server_stream" if name in _TALOS_STREAMING or name.endswith("Stream") else "unary"


def splices(method: str) -> bool:
    """Whether replies follow the envelope convention (field 1 = metadata)."""
    return method.startswith(FANOUT_PREFIXES)


class TargetError(ValueError):
    """A ``node``/``nodes`` value that is no target apid will dial (INVALID_ARGUMENT)."""


_TARGET_CHARS = re.compile(r"[A-Za-z0-9._:%\[\]-]+")


def _bad_target(node: str) -> TargetError:
    shown = node if len(node) <= 64 else node[:64] + "…"
    return TargetError(f"node target {shown!r} is not a host, host:port, IPv6 address or [IPv6]:port")


def _port(node: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise TargetError(f"node target {node[:64]!r}: the port must be a number from 1 to 65535")
    return int(text)


def _ipv6(node: str, host: str) -> str:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise _bad_target(node) from None
    return host


def backend_target(node: str, port: int = APID_PORT) -> str:
    """``host:port`` to dial for a ``node`` value: ``10.0.0.1`` → ``10.0.0.1:50000``; a value that
    names a port (``h:1234``, ``[v6]:1234``) is kept; a bare IPv6 address gets brackets.
    :class:`TargetError` for anything else: longer than :data:`MAX_TARGET_LEN`, characters no host
    name or address has (``/``, ``@``, spaces, …), a port that is not 1-65535."""
    node = node.strip()
    if len(node) > MAX_TARGET_LEN:
        raise TargetError(f"node target is {len(node)} characters long; the limit is {MAX_TARGET_LEN}")
    if not _TARGET_CHARS.fullmatch(node):
        raise _bad_target(node)
    if node.startswith("["):
        host, sep, rest = node[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _bad_target(node)
        _ipv6(node, host)
        return f"[{host}]:{_port(node, rest[1:]) if rest else port}"
    if "[" in node or "]" in node:
        raise _bad_target(node)
    if node.count(":") > 1:
        return f"[{_ipv6(node, node)}]:{port}"
    host, _, p = node.partition(":")
    if not host or "%" in host:
        raise _bad_target(node)
    return f"{host}:{_port(node, p) if ':' in node else port}"


def _values(md: Sequence[tuple[str, Any]], key: str) -> list[str]:
    out = []
    for k, v in md:
        if k == key:
            v = v.decode() if isinstance(v, bytes) else v
            out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def forward_metadata(md: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """What passes through from the client: everything but routing, roles and transport headers."""
    return [(k, v) for k, v in md if k not in _STRIP and not k.startswith((":", "grpc-"))]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Proxy(grpc.GenericRpcHandler):
    """A generic handler for every method: see the module docstring."""

    def __init__(
        self,
        machined_socket: str,
        identity: Identity | None,
        *,
        node_port: int = APID_PORT,
        name: str = "apid",
        max_channels: int = DEFAULT_MAX_CHANNELS,
        channel_idle: float = DEFAULT_IDLE,
        max_fanout: int = MAX_FANOUT,
        channel_factory: Callable[[str], Any] | None = None,
        peers: tlsterm.PeerRegistry | None = None,
        sockdir: Path | None = None,
    ) -> None:
        """``peers``: the terminator's verified identities (none: every call is unauthenticated);
        ``sockdir``: the private directory for the unix sockets of channels to other nodes."""
        self.identity = identity
        self.peers = peers if peers is not None else tlsterm.PeerRegistry()
        self.sockdir = sockdir
        self._own_sockdir = False
        self.node_port = node_port
        self.name = name
        self.max_fanout = max_fanout
        self.local = grpc.aio.insecure_channel(f"unix:{machined_socket}", options=_CHANNEL_OPTIONS)
        # channels to other nodes' apid, keyed by backend_target(); bounded and idle-expiring
        self.channels = ChannelCache(channel_factory or self._dial, max_size=max_channels, idle=channel_idle)

    async def close(self) -> None:
        await self.channels.aclose()
        with contextlib.suppress(Exception):
            await self.local.close()
        if self._own_sockdir and self.sockdir is not None:
            shutil.rmtree(self.sockdir, ignore_errors=True)

    # -- grpc entry point ---------------------------------------------------------------------------

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        kind = method_kind(method)
        if kind == "unary":

            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return await self._unary(method, request, context)

            return grpc.unary_unary_rpc_method_handler(unary)
        if kind == "server_stream":

            async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
                async for msg in self._stream(method, request, context):
                    yield msg

            return grpc.unary_stream_rpc_method_handler(stream)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: client streaming is not proxied")
            return b""

        return grpc.stream_unary_rpc_method_handler(refuse)

    # -- authorization --------------------------------------------------------------------------------

    def authorize(self, method: str, context: grpc.aio.ServicerContext) -> frozenset[str]:
        """The roles the call runs with, from the connection's verified client certificate (one role
        per ``O=`` value) and, for an ``os:impersonator``, its ``talos-role`` metadata."""
        info = self.peers.lookup(context.peer())
        if info is None or info.der is None:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        is_client, cert_roles = info.is_client, info.roles
        if not is_client:
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate's extended key usage must be clientAuth",
            )
        roles = effective_roles(cert_roles, tuple(context.invocation_metadata() or ()))
        if not allowed(method, roles):
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, f"not authorized: {method} needs another role")
        return roles

    # -- routing -------------------------------------------------------------------------------------

    def _route(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> tuple[list[str] | None, list[tuple[str, Any]], bool]:
        """``(targets or None for local, outgoing metadata, fan-out?)``."""
        roles = self.authorize(method, context)  # allowed, so at least one role (a known one)
        md = tuple(context.invocation_metadata() or ())
        out = forward_metadata(md) + role_metadata(roles)  # one value per role, never empty
        if any(k == PROXYFROM for k, _ in md):
            return None, out, False  # already forwarded once: local only
        node, nodes = _values(md, NODE), _values(md, NODES)
        if node and nodes:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "use either node or nodes metadata, not both")
        if len(node) > 1:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "node metadata must name exactly one node")
        if not node and not nodes:
            return None, out, False
        if self.identity is None:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "no request forwarding: this node holds no CA key to authenticate to other nodes",
            )
        if nodes and not method.startswith(FANOUT_PREFIXES):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{method} cannot fan out to several nodes; use node metadata",
            )
        if len(nodes) > self.max_fanout:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"nodes metadata names {len(nodes)} targets; the limit is {self.max_fanout} per call",
            )
        for t in node or nodes:
            try:
                backend_target(t, self.node_port)
            except TargetError as e:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        out.append((PROXYFROM, self.name))
        return (node or nodes), out, bool(nodes)

    def _dial(self, target: str) -> tlsterm.TlsChannel:
        """A channel to another node's apid; ``target`` is a :func:`backend_target` (``host:port``;
        a host named like a grpc URI scheme, ``unix:1234``, stays a host name: grpc only ever dials
        the dialer's private unix socket, and the dialer connects to ``host`` over TCP + TLS)."""
        assert self.identity is not None
        if self.sockdir is None:
            self.sockdir, self._own_sockdir = tlsterm.private_dir("apid-"), True
        ctx = self.identity.client_context(self.sockdir)
        return tlsterm.TlsChannel.create(target, ctx, _CHANNEL_OPTIONS, sockdir=self.sockdir)

    @contextlib.contextmanager
    def _lease(self, node: str) -> Iterator[grpc.aio.Channel]:
        """The channel to ``node``'s apid for one call (the cache closes it only after the call). A new
        client certificate (``identity.generation``) means a new channel for new calls."""
        assert self.identity is not None
        with self.channels.lease(backend_target(node, self.node_port), self.identity.generation) as ch:
            try:
                yield ch
            except grpc.aio.AioRpcError as e:
                raise explained(e, ch) from None

    @staticmethod
    def _timeout(
        context: grpc.aio.ServicerContext, default: float | None, *, remote: bool = False
    ) -> float | None:
        """The deadline for the call we make. To another node it ends a little before the caller's
        (10 %, at most 1 s): a node that does not answer becomes its own error entry and the other
        nodes' answers still reach the caller, instead of the whole call running out of time."""
        t = context.time_remaining()
        if t is None or t >= 1e9:
            return default
        return max(0.05, t - min(REMOTE_MARGIN, t * 0.1)) if remote else t

    async def _abort(self, context: grpc.aio.ServicerContext, e: _Abort | grpc.aio.AioRpcError) -> None:
        if isinstance(e, _Abort):
            await context.abort(e.code, e.details)
        await context.abort(e.code(), e.details() or "")

    # -- unary ---------------------------------------------------------------------------------------

    async def _unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            targets, md, fanout = self._route(method, context)
            if targets is None:
                return await self.local.unary_unary(method)(
                    request, metadata=md, timeout=self._timeout(context, None)
                )
            if not fanout:
                with self._lease(targets[0]) as ch:
                    reply = await ch.unary_unary(method)(
                        request,
                        metadata=md,
                        timeout=self._timeout(context, DEFAULT_BACKEND_TIMEOUT, remote=True),
                    )
                try:
                    return wire.splice_reply(reply, targets[0]) if splices(method) else reply
                except wire.WireError as e:
                    raise _Abort(grpc.StatusCode.INTERNAL, f"{targets[0]}: malformed reply ({e})") from None
            replies = await asyncio.gather(*(self._one(method, request, md, t, context) for t in targets))
            return wire.merge(replies)
        except (_Abort, grpc.aio.AioRpcError) as e:
            await self._abort(context, e)
            raise AssertionError("unreachable") from None

    async def _one(
        self,
        method: str,
        request: bytes,
        md: list[tuple[str, Any]],
        node: str,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        try:
            with self._lease(node) as ch:
                reply = await ch.unary_unary(method)(
                    request,
                    metadata=md,
                    timeout=self._timeout(context, DEFAULT_BACKEND_TIMEOUT, remote=True),
                )
            return wire.splice_reply(reply, node)
        except grpc.aio.AioRpcError as e:
            return wire.error_reply(node, e.code(), _node_error(node, e))
        except wire.WireError as e:
            return wire.error_reply(node, grpc.StatusCode.INTERNAL, f"{node}: malformed reply ({e})")

    # -- server streaming ----------------------------------------------------------------------------

    async def _stream(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            targets, md, fanout = self._route(method, context)
        except _Abort as e:
            await self._abort(context, e)
            return
        if not fanout:
            lease = contextlib.nullcontext(self.local) if targets is None else self._lease(targets[0])
            with lease as ch:
                call = ch.unary_stream(method)(
                    request, metadata=md, timeout=self._timeout(context, None, remote=targets is not None)
                )
                splice = targets is not None and splices(method)
                try:
                    async for msg in call:
                        yield wire.splice_item(msg, targets[0]) if splice and targets else msg
                except grpc.aio.AioRpcError as e:
                    await self._abort(context, explained(e, ch))
                except wire.WireError as e:
                    await context.abort(
                        grpc.StatusCode.INTERNAL, f"{targets and targets[0]}: malformed reply ({e})"
                    )
                finally:
                    call.cancel()
            return
        assert targets is not None
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

        async def pump(node: str) -> None:
            ended = True
            try:
                with self._lease(node) as ch:
                    call = ch.unary_stream(method)(
                        request, metadata=md, timeout=self._timeout(context, None, remote=True)
                    )
                    try:
                        async for msg in call:
                            await queue.put(wire.splice_item(msg, node))
                    except grpc.aio.AioRpcError as e:
                        e = explained(e, ch)
                        await queue.put(wire.error_item(node, e.code(), _node_error(node, e)))
                    except wire.WireError as e:
                        await queue.put(
                            wire.error_item(node, grpc.StatusCode.INTERNAL, f"{node}: malformed reply ({e})")
                        )
                    finally:
                        call.cancel()
            except asyncio.CancelledError:
                ended = False  # the merge is over (the client left): nobody waits for our end mark,
                raise  # and with the queue full, putting one would block this task for ever
            finally:
                if ended:
                    await queue.put(None)

        tasks = [asyncio.create_task(pump(t)) for t in targets]
        try:
            done = 0
            while done < len(tasks):
                msg = await queue.get()
                if msg is None:
                    done += 1
                else:
                    yield msg
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def explained(e: grpc.aio.AioRpcError, ch: Any) -> grpc.aio.AioRpcError:
    """``e`` with the TLS dialer's reason (refused, unreachable, server certificate not accepted …)
    when grpc saw only a closed socket, and without the private unix socket's path."""
    dialer = getattr(ch, "dialer", None)
    if dialer is None:
        return e
    details = e.details() or ""
    if e.code() == grpc.StatusCode.UNAVAILABLE and dialer.last_error:
        details = dialer.last_error
    elif dialer.grpc_target in details:
        details = details.replace(dialer.grpc_target, dialer.target)
    else:
        return e
    return grpc.aio.AioRpcError(e.code(), grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _node_error(node: str, e: grpc.aio.AioRpcError) -> str:
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"{node}: unreachable ({e.code().name}: {e.details()})"
    return f"{node}: {e.details()}"
