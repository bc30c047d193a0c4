"""Replicas of one registry behind one endpoint, and the order a session tries them in.

An endpoint names one or more hosts (:func:`~discovery.client.target.parse_endpoint_replicas`); every
address a host name resolves to is a replica. A session connects to one; when it dies the session moves to
the next untried one at once, and backs off only after a whole round failed (:class:`ReplicaRotation`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from discovery.client.target import DiscoveryTarget
from spanutil.ipcodec import is_ip_literal

__all__ = ["Replica", "ReplicaRotation", "is_failover_error", "resolve_replicas"]

# (host, port) -> addresses, in the resolver's order
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Errors that mean "this replica is gone or unreachable"; anything else (a refusal, a redirect loop)
# is the registry's answer and is not retried elsewhere without backoff.
_FAILOVER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


@dataclass(frozen=True, slots=True)
class Replica:
    """One address to connect to; ``name`` is the configured host (TLS is verified against it)."""

    name: DiscoveryTarget
    address: str  # an IP literal

    @property
    def target(self) -> str:
        """gRPC channel target ``ip:port`` (IPv6 bracketed)."""
        return DiscoveryTarget(self.address, self.name.port, self.name.secure).target

    @property
    def by_name(self) -> bool:
        """True when the configured host is a name (not this IP): TLS and ``:authority`` use the name."""
        return self.name.host != self.address

    def __str__(self) -> str:
        return self.target


async def system_resolver(host: str, port: int) -> list[str]:
    """Every A/AAAA address of ``host``, in the system resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


async def resolve_replicas(
    targets: Sequence[DiscoveryTarget], resolver: Resolver = system_resolver
) -> list[Replica]:
    """The replicas behind ``targets``, in order, without duplicates.

    A name that fails to resolve is skipped while others resolve; if none does, its error is raised.
    """
    out: list[Replica] = []
    first_error: OSError | None = None
    for t in targets:
        if is_ip_literal(t.host):
            addrs = [t.host]
        else:
            try:
                addrs = await resolver(t.host, t.port)
            except OSError as e:
                first_error = first_error or e
                continue
        for a in addrs:
            r = Replica(t, str(ipaddress.ip_address(a)))
            if r not in out:
                out.append(r)
    if not out:
        if first_error is not None:
            raise first_error
        raise OSError(f"no address for {', '.join(t.host for t in targets)}")
    return out


def is_failover_error(exc: BaseException) -> bool:
    """True when ``exc`` means the replica is gone (move on at once), not that it refused us."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in _FAILOVER_CODES
    return isinstance(exc, OSError)  # ConnectionError and TimeoutError included


class ReplicaRotation:
    """Which replica a session tries next.

    A round lists the replicas starting after the one tried last (it goes to the end), or without it
    when it just died while serving. The session tries them in turn at once; an empty round means
    back off, then start a full round.
    """

    def __init__(self) -> None:
        self.current: Replica | None = None  # the replica tried last
        self._pending: list[Replica] = []

    def begin_round(self, replicas: Sequence[Replica], *, skip_current: bool = False) -> None:
        order = list(dict.fromkeys(replicas))
        if self.current in order:
            i = order.index(self.current)
            order = order[i + 1 :] + order[: i + 1]
            if skip_current:
                order.pop()
        self._pending = order

    @property
    def untried(self) -> int:
        """Replicas left in this round."""
        return len(self._pending)

    def next(self) -> Replica | None:
        """The next replica of this round (it becomes :attr:`current`), or ``None`` when none is left."""
        if not self._pending:
            return None
        self.current = self._pending.pop(0)
        return self.current
