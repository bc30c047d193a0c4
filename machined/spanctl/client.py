"""Connections: mTLS to apid (``endpoint:50000``, the context's certificates) or machined's unix socket
(no TLS), and the per-node error bookkeeping of talosctl.

``-c/--cluster`` (or the context's ``cluster``) is sent as ``context`` metadata on every call, as
talosctl does for a proxy endpoint (Omni) that serves several clusters; apid itself ignores it.

Routing: through apid, machine API calls for several nodes send ``nodes`` metadata (apid fans out and
merges, one item per node), and resource API calls (which apid does not fan out) are made once per
node with ``node`` metadata. A unix socket reaches exactly one machined: no routing metadata is sent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from machined import tlsterm

from .config import ClientConfig, ConfigError, Context

APID_PORT = 50000
MAX_MESSAGE = 32 << 20
UNIX_PREFIXES = ("unix://", "unix:")
CLUSTER_METADATA = "context"  # talosctl's key for the cluster name (grpc_connection_wrapper.go)


class _ClusterMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``context: CLUSTER`` to every call's metadata."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster

    def _details(self, d: Any) -> Any:
        md = [*(d.metadata or ()), (CLUSTER_METADATA, self.cluster)]
        return _CallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class ConnectionSetupError(Exception):
    """The CLI cannot even try to connect (no endpoint, no certificates, ...)."""


@dataclass(frozen=True)
class NodeError:
    node: str
    message: str

    def render(self) -> str:
        return f"error from node {self.node}: {self.message}" if self.node else f"error: {self.message}"


def socket_path(endpoint: str) -> str | None:
    """The path of a ``unix:///path`` (or ``unix:/path``) endpoint, else None."""
    for p in UNIX_PREFIXES:
        if endpoint.startswith(p):
            return endpoint[len(p) :] or None
    return None


def tcp_target(endpoint: str, port: int = APID_PORT) -> str:
    """``host`` → ``host:50000``; IPv6 addresses are bracketed; an explicit port is kept."""
    if endpoint.startswith("["):
        return endpoint if "]:" in endpoint else f"{endpoint}:{port}"
    if endpoint.count(":") > 1:  # bare IPv6
        return f"[{endpoint}]:{port}"
    if ":" in endpoint:
        return endpoint
    return f"{endpoint}:{port}"


def describe_rpc_error(e: grpc.RpcError, where: str) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or str(code)
    details = tlsterm.explain(details, code == grpc.StatusCode.UNAVAILABLE)  # the TLS dialer's reason
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot connect to {where}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{where} did not answer in time"
    name = code.name.lower().replace("_", " ") if code is not None else "error"
    return f"{name}: {details}"


@dataclass
class Target:
    """Where calls go (``endpoint`` or ``socket``) and for which ``nodes``."""

    endpoint: str = ""
    socket: str | None = None
    nodes: list[str] = field(default_factory=list)
    context: Context = field(default_factory=Context)
    timeout: float = 30.0
    cluster: str = ""
    _channel: grpc.Channel | None = field(default=None, init=False, repr=False)
    _dialer: tlsterm.ThreadDialer | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_args(
        cls,
        config: ClientConfig,
        *,
        context: str | None = None,
        endpoints: list[str] | None = None,
        nodes: list[str] | None = None,
        socket: str | None = None,
        cluster: str | None = None,
    ) -> Target:
        try:
            _, ctx = config.current(context)
        except ConfigError as e:
            raise ConnectionSetupError(str(e)) from None
        node_list = list(nodes) if nodes else list(ctx.nodes)
        name = cluster or ctx.cluster
        if socket:
            return cls(endpoint=f"unix://{socket}", socket=socket, nodes=node_list, context=ctx, cluster=name)
        eps = list(endpoints) if endpoints else list(ctx.endpoints)
        if not eps:
            raise ConnectionSetupError(
                "no endpoint: pass --endpoints/-e or --socket, or set endpoints in the client config "
                "(spanctl config endpoint ...)"
            )
        path = socket_path(eps[0])
        if path:
            return cls(endpoint=eps[0], socket=path, nodes=node_list, context=ctx, cluster=name)
        return cls(endpoint=eps[0], nodes=node_list, context=ctx, cluster=name)

    @property
    def direct(self) -> bool:
        return self.socket is not None

    @property
    def where(self) -> str:
        return self.socket if self.socket else tcp_target(self.endpoint)

    def check(self) -> None:
        if self.direct and len(self.nodes) > 1:
            raise ConnectionSetupError(
                f"a unix socket reaches one machined; {len(self.nodes)} nodes given "
                "(go through apid with --endpoints to reach several)"
            )

    def channel(self) -> grpc.Channel:
        if self._channel is not None:
            return self._channel
        self.check()
        opts = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        if self.direct:
            self._channel = self._with_cluster(grpc.insecure_channel(f"unix:{self.socket}", options=opts))
            return self._channel
        ctx = self.context
        missing = [k for k in ("ca", "crt", "key") if not getattr(ctx, k)]
        if missing:
            raise ConnectionSetupError(
                f"the client config context has no {', '.join(missing)}: cannot authenticate to apid "
                "(use a config from 'spanctl gen config' or 'spanctl config new', or --socket for a local machined)"
            )
        # TLS with Python's ssl (OpenSSL): Ed25519 (Talos's default) and ECDSA alike; grpc speaks
        # plaintext HTTP/2 to the dialer's private unix socket (machined/tlsterm.py)
        target = tcp_target(self.endpoint)
        try:
            tls = tlsterm.client_context(ctx.ca, None, ctx.crt, ctx.key)
            self._dialer = tlsterm.ThreadDialer(target, tls)
        except (tlsterm.TlsSetupError, ValueError) as e:
            raise ConnectionSetupError(
                f"the client config context's ca/crt/key cannot be used: {e}"
            ) from None
        opts.append(("grpc.default_authority", target))
        self._channel = self._with_cluster(grpc.insecure_channel(self._dialer.grpc_target, options=opts))
        return self._channel

    def _with_cluster(self, channel: grpc.Channel) -> grpc.Channel:
        if not self.cluster:
            return channel
        return grpc.intercept_channel(channel, _ClusterMetadata(self.cluster))

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._dialer is not None:
            self._dialer.close()
            self._dialer = None

    # -- routing ---------------------------------------------------------------------------------

    def fanout_metadata(self) -> list[tuple[str, str]]:
        """Metadata for a machine API call to every node (apid's ``nodes``)."""
        if self.direct or not self.nodes:
            return []
        return [("nodes", n) for n in self.nodes]

    def node_metadata(self, node: str | None) -> list[tuple[str, str]]:
        """Metadata for a call to one node (apid's ``node``)."""
        if self.direct or not node:
            return []
        return [("node", node)]

    def each_node(self) -> list[str | None]:
        """One entry per node for per-node calls (None: the endpoint's own node)."""
        if self.direct:
            return [self.nodes[0] if self.nodes else None]
        return list(self.nodes) or [None]

    def label(self, node: str | None) -> str:
        """The NODE cell for ``node`` (the endpoint when none was named, as talosctl's peer address)."""
        if node:
            return node
        return self.socket if self.socket else self.endpoint


def split_messages(messages: Iterable[Any], default_node: str) -> tuple[list[Any], list[NodeError]]:
    """Good items and the error entries apid adds for failed nodes (``metadata.error``)."""
    good: list[Any] = []
    errors: list[NodeError] = []
    for m in messages:
        md = m.metadata
        if md.error:
            errors.append(NodeError(md.hostname or default_node, md.error))
        else:
            good.append(m)
    return good, errors


def node_of(message: Any, default: str) -> str:
    """The node an item came from: the hostname apid (or machined) put in its metadata."""
    try:
        return message.metadata.hostname or default
    except AttributeError:
        return default


class Errors:
    """Per-node errors, printed after the output (stderr); any of them makes the exit status 1."""

    def __init__(self) -> None:
        self.items: list[NodeError] = []

    def add(self, node: str, message: str) -> None:
        self.items.append(NodeError(node, message))

    def extend(self, errors: Iterable[NodeError]) -> None:
        self.items.extend(errors)

    def rpc(self, node: str, e: grpc.RpcError, where: str) -> None:
        self.add(node, describe_rpc_error(e, where))

    def __bool__(self) -> bool:
        return bool(self.items)

    def lines(self) -> Iterator[str]:
        for e in self.items:
            yield e.render()

    def report(self, stream: Any = None) -> int:
        stream = stream if stream is not None else sys.stderr
        for line in self.lines():
            print(line, file=stream)
        return 1 if self.items else 0
