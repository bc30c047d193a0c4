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

Bytes are never decoded; unary vs server-streaming comes from the descriptor pool of our stubs
(plus Talos's list of streaming method names for methods we have no descriptor for).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import descriptor_pool

import spanapi.talos.cosi.state_pb2
import spanapi.talos.machine.machine_pb2  # noqa: F401  (registers descriptors)
from machined import pki
from machined.api.roles import ROLE_METADATA

from . import wire
from .rules import allowed, effective_roles
from .tls import Identity

log = logging.getLogger("apid")

APID_PORT = 50000
MAX_MESSAGE = 32 << 20
PROXYFROM = "proxyfrom"
NODE = "node"
NODES = "nodes"
FANOUT_PREFIXES = ("/machine.", "/cluster.", "/inspect.", "/storage.", "/time.")
RETIRE_GRACE = 300.0  # how long a channel with a replaced client certificate stays open for in-flight calls
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


def backend_target(node: str, port: int = APID_PORT) -> str:
    """``host:port`` to dial for a ``node`` value: ``10.0.0.1`` → ``10.0.0.1:50000``; a value that
    names a port (``h:1234``, ``[v6]:1234``) is kept; a bare IPv6 address gets brackets."""
    node = node.strip()
    if node.startswith("["):
        return node if "]:" in node else f"{node}:{port}"
    if node.count(":") == 1:
        return node
    if ":" in node:
        return f"[{node}]:{port}"
    return f"{node}:{port}"


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
    ) -> None:
        self.identity = identity
        self.node_port = node_port
        self.name = name
        self.local = grpc.aio.insecure_channel(f"unix:{machined_socket}", options=_CHANNEL_OPTIONS)
        self._remote: dict[str, tuple[int, grpc.aio.Channel]] = {}
        self._old: list[grpc.aio.Channel] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._certs: OrderedDict[bytes, tuple[bool, frozenset[str]]] = OrderedDict()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        chans = [self.local, *self._old, *(c for _, c in self._remote.values())]
        self._remote.clear()
        self._old.clear()
        for c in chans:
            with contextlib.suppress(Exception):
                await c.close()

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

    def _cert_info(self, pem: bytes) -> tuple[bool, frozenset[str]]:
        hit = self._certs.get(pem)
        if hit is None:
            cert = x509.load_pem_x509_certificate(pem)
            hit = (pki.is_client_cert(cert), pki.roles_of(cert))
            self._certs[pem] = hit
            if len(self._certs) > 256:
                self._certs.popitem(last=False)
        return hit

    def authorize(self, method: str, context: grpc.aio.ServicerContext) -> frozenset[str]:
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        is_client, cert_roles = self._cert_info(pems[0])
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
        roles = self.authorize(method, context)
        md = tuple(context.invocation_metadata() or ())
        out = forward_metadata(md) + [(ROLE_METADATA, r) for r in sorted(roles)]
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
        out.append((PROXYFROM, self.name))
        return (node or nodes), out, bool(nodes)

    def _channel(self, node: str) -> grpc.aio.Channel:
        assert self.identity is not None
        target = backend_target(node, self.node_port)
        gen = self.identity.generation
        hit = self._remote.get(target)
        if hit is not None and hit[0] == gen:
            return hit[1]
        if hit is not None:  # certificate renewed: new calls use a new channel, in-flight ones finish
            self._retire(hit[1])
        ch = grpc.aio.secure_channel(target, self.identity.client_credentials(), options=_CHANNEL_OPTIONS)
        self._remote[target] = (gen, ch)
        return ch

    def _retire(self, ch: grpc.aio.Channel) -> None:
        self._old.append(ch)

        async def close_later() -> None:
            await asyncio.sleep(RETIRE_GRACE)
            if ch in self._old:
                self._old.remove(ch)
                await ch.close(grace=1.0)

        task = asyncio.get_running_loop().create_task(close_later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                reply = await self._channel(targets[0]).unary_unary(method)(
                    request, metadata=md, timeout=self._timeout(context, DEFAULT_BACKEND_TIMEOUT, remote=True)
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
            reply = await self._channel(node).unary_unary(method)(
                request, metadata=md, timeout=self._timeout(context, DEFAULT_BACKEND_TIMEOUT, remote=True)
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
            ch = self.local if targets is None else self._channel(targets[0])
            call = ch.unary_stream(method)(
                request, metadata=md, timeout=self._timeout(context, None, remote=targets is not None)
            )
            splice = targets is not None and splices(method)
            try:
                async for msg in call:
                    yield wire.splice_item(msg, targets[0]) if splice and targets else msg
            except grpc.aio.AioRpcError as e:
                await self._abort(context, e)
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
            call = self._channel(node).unary_stream(method)(
                request, metadata=md, timeout=self._timeout(context, None, remote=True)
            )
            try:
                async for msg in call:
                    await queue.put(wire.splice_item(msg, node))
            except grpc.aio.AioRpcError as e:
                await queue.put(wire.error_item(node, e.code(), _node_error(node, e)))
            except wire.WireError as e:
                await queue.put(
                    wire.error_item(node, grpc.StatusCode.INTERNAL, f"{node}: malformed reply ({e})")
                )
            finally:
                call.cancel()
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


def _node_error(node: str, e: grpc.aio.AioRpcError) -> str:
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"{node}: unreachable ({e.code().name}: {e.details()})"
    return f"{node}: {e.details()}"
