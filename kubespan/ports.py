"""The mesh engine's ports: what it calls on its links, nftables and discovery adapters.

Each port is the small surface :class:`~kubespan.engine.Mesh` (and
:mod:`kubespan.wiring`) actually uses; the WireGuard port is
:class:`~kubespan.wireguard.backend.WireGuardBackend`. An ability only some
adapters have is its own runtime-checkable Protocol, tested with
``isinstance`` where it is used. The in-memory fakes that implement these
live in test-support modules (``kubespan.testing``, ``kubespan.dataplane.fake``,
``kubespan.wireguard.fake``) that production code never imports.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kubespan.wireguard.backend import WireGuardBackend
from spanutil.ipcodec import IPAddress, IPInterface, IPNetwork

if TYPE_CHECKING:
    import asyncio
    from ipaddress import IPv6Address

    from kubespan.dataplane.links import NetlinkEvent
    from kubespan.nat.classify import NatReport
    from kubespan.relay.control import Notice
    from kubespan.wireguard.types import AddrPort, PublicKey
    from spanapi.discovery.client import affiliate_pb2

__all__ = [
    "ChangeWatcher",
    "Closable",
    "DiscoveryPort",
    "Leaver",
    "LinkPort",
    "NftPort",
    "PunchPort",
    "RelayClientPort",
    "RelayServerPort",
    "Startable",
    "StunPort",
    "WireGuardBackend",
]


@runtime_checkable
class LinkPort(Protocol):
    """The mesh link's addresses, the routes in the mesh table and the fwmark rules.

    Every ``reconcile_*`` is idempotent and returns the changes it made (``[]``: none).
    """

    async def reconcile_link(self, addresses: Sequence[IPInterface], up: bool = True) -> list[str]: ...

    async def reconcile_routes(self) -> list[str]: ...

    async def reconcile_rules(self) -> list[str]: ...

    async def reconcile_prefix_routes(
        self, desired: Mapping[int, Sequence[IPNetwork]], *, trust_cache: bool = False
    ) -> list[str]: ...

    async def teardown(self, remove_link: bool = False) -> None: ...


@runtime_checkable
class ChangeWatcher(Protocol):
    """Reports changes made from outside to what a data-plane port owns; runs until cancelled.

    The link port's link, addresses, routes and rules (optional: when it has ``watch``), or the
    nftables table (:class:`kubespan.dataplane.nftwatch.NftWatch`). ``ready`` is set once
    subscribed; a ``resync`` event means changes may have been lost.
    """

    async def watch(
        self,
        callback: Callable[[NetlinkEvent], Awaitable[None] | None],
        *,
        ready: asyncio.Event | None = None,
    ) -> None: ...


@runtime_checkable
class NftPort(Protocol):
    """The mesh's nftables table and its destination sets.

    ``what`` names what the sets become, for error messages ("nftables", "prefix routes").
    """

    what: str

    async def reconcile(
        self,
        desired_sets: Mapping[str, Iterable[Any]],
        *,
        trust_cache: bool = False,
        normalized: bool = False,
    ) -> list[str]: ...

    async def teardown(self) -> None: ...


@runtime_checkable
class DiscoveryPort(Protocol):
    """The part of :class:`discovery.client.DiscoveryClient` the engine uses.

    ``affiliates`` maps an affiliate id to an entry with ``affiliate`` (the
    protobuf) and ``endpoints``. ``version`` changes whenever ``affiliates``
    does, and a changed entry is a new object (never modified in place): the
    engine re-reads nothing while the version stands, and converts only the
    entries that are new objects.
    """

    @property
    def affiliates(self) -> Mapping[str, Any]: ...

    @property
    def version(self) -> int: ...

    @property
    def public_ip(self) -> IPAddress | None: ...

    async def set_local_data(
        self,
        affiliate: affiliate_pb2.Affiliate,
        endpoints: Sequence[affiliate_pb2.Endpoint] = (),
        other_endpoints: Mapping[str, Sequence[affiliate_pb2.Endpoint]] | None = None,
    ) -> bool: ...


@runtime_checkable
class StunPort(Protocol):
    """Endpoint discovery: what STUN responders see of the WireGuard port, and the NAT class.

    ``servers`` are ``(host, port)`` pairs as configured (names are the adapter's to resolve);
    ``local_addrs`` are this host's addresses (an answer showing one of them with ``wg_port``
    means no NAT). Never raises for a responder's failure: the report's ``error`` says why.
    """

    async def discover(
        self, wg_port: int, servers: Sequence[tuple[str, int]], local_addrs: Sequence[IPAddress]
    ) -> NatReport: ...


@runtime_checkable
class Startable(Protocol):
    """Optional: must be started before use (the discovery client's sessions and watches)."""

    async def start(self) -> None: ...


@runtime_checkable
class Closable(Protocol):
    """Optional: holds resources (sockets, sessions) released by ``close``."""

    async def close(self) -> None: ...


@runtime_checkable
class Leaver(Protocol):
    """Optional: can delete our own discovery entry, so peers drop us at once."""

    async def delete_local_affiliate(self) -> None: ...


@runtime_checkable
class PunchPort(Protocol):
    """Hole punching from the WireGuard port (docs/design/nat-traversal.md).

    ``start`` opens the responder that answers known peers' probes (``known(key)``); ``punch`` runs
    one punch now (the engine waits for the agreed start): openers unless ``openers`` is False
    (a public node sends none), probes a second later; the address the peer answered from, or None.
    Raises for a missing privilege (the engine then relies on the relay)."""

    async def start(self, wg_port: int, own: PublicKey, known: Callable[[PublicKey], bool]) -> None: ...

    async def punch(
        self,
        wg_port: int,
        candidates: Sequence[AddrPort],
        start_ms: int,
        *,
        own: PublicKey,
        peer: PublicKey,
        openers: bool = True,
    ) -> AddrPort | None: ...

    async def close(self) -> None: ...


@runtime_checkable
class RelayClientPort(Protocol):
    """Every node's relay client on its mesh address (docs/design/relay.md): requests to relays'
    control servers at their mesh addresses, and NOTIFYs delivered to ``on_notify``."""

    async def start(
        self,
        host: IPv6Address,
        device: str,
        who: Callable[[str], PublicKey | None],
        on_notify: Callable[[Notice], None],
    ) -> None: ...

    async def allocate(self, relay: IPv6Address, peer: PublicKey) -> int:
        """The port on the relay's public address to send ``peer``'s traffic to."""
        ...

    async def release(self, relay: IPv6Address, peer: PublicKey) -> None: ...

    async def ping(self, relay: IPv6Address) -> float: ...

    async def stop(self) -> None: ...


@runtime_checkable
class RelayServerPort(Protocol):
    """The relay service of a node that relays (``--relay``): forwarder and control server."""

    async def start(
        self,
        host: IPv6Address,
        device: str,
        who: Callable[[str], PublicKey | None],
        where: Callable[[PublicKey], tuple[str, int] | None],
    ) -> None: ...

    def status(self) -> dict[str, Any]: ...

    async def stop(self) -> None: ...
