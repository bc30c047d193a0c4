"""Test doubles for the engine's ports that have no package of their own: discovery, the prober, STUN,
hole punching and the relay; and status values for the status readers' tests.

A test-support module: production code never imports it (``tests/unit/test_layers.py``
checks). The WireGuard and data-plane fakes are beside their interfaces, in
:mod:`kubespan.wireguard.fake` and :mod:`kubespan.dataplane.fake`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubespan.nat.classify import NatClass, NatReport
from kubespan.probe import Prober
from kubespan.relay.control import Notice
from kubespan.snapshot import MeshStatus, NatStatus, PeerStatus
from kubespan.wireguard.types import AddrPort, PublicKey
from spanapi.discovery.client import affiliate_pb2
from spanutil.ipcodec import IPAddress

Published = tuple[
    affiliate_pb2.Affiliate, list[affiliate_pb2.Endpoint], dict[str, Sequence[affiliate_pb2.Endpoint]]
]


@dataclass(frozen=True)
class Discovered:
    """Shaped like :class:`discovery.client.DiscoveredAffiliate`."""

    id: str
    affiliate: affiliate_pb2.Affiliate
    endpoints: tuple[affiliate_pb2.Endpoint, ...]


@dataclass
class FakeDiscovery:
    """The discovery port in memory, with the client's optional abilities (start, close, leave).

    As the client: change ``entries`` with :meth:`put` and :meth:`remove`, which move
    ``version``; an entry is replaced, never edited in place.
    """

    entries: dict[str, Discovered] = field(default_factory=dict)
    public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    version: int = 0
    published: list[Published] = field(default_factory=list)  # every successful set_local_data
    fail_publishes: int = 0  # the next N set_local_data calls raise (as an oversized affiliate does)
    deleted: int = 0
    started: bool = False
    closed: bool = False

    @property
    def affiliates(self) -> Mapping[str, Discovered]:
        return dict(self.entries)

    def put(self, *entries: Discovered) -> None:
        for e in entries:
            self.entries[e.id] = e
        self.version += 1

    def remove(self, *ids: str) -> None:
        for i in ids:
            self.entries.pop(i, None)
        self.version += 1

    async def set_local_data(
        self,
        affiliate: affiliate_pb2.Affiliate,
        endpoints: Sequence[affiliate_pb2.Endpoint] = (),
        other_endpoints: Mapping[str, Sequence[affiliate_pb2.Endpoint]] | None = None,
    ) -> bool:
        if self.fail_publishes:
            self.fail_publishes -= 1
            raise ValueError("affiliate too large: 2100 bytes, the limit is 2048")
        self.published.append((affiliate, list(endpoints), dict(other_endpoints or {})))
        return True

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def delete_local_affiliate(self) -> None:
        self.deleted += 1


class FakeProber(Prober):
    """Records probes and sends nothing; tests decide which peers answered."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.probes: list[tuple[Hashable, ipaddress.IPv6Address]] = []
        self._unanswered: set[Hashable] = set()  # peers sent a probe that no answer_sent took yet

    def open(self) -> bool:
        return True

    def close(self) -> None:
        return None

    def send(self, peer: Hashable, address: ipaddress.IPv6Address) -> bool:
        self.probes.append((peer, address))
        self._unanswered.add(peer)
        return True

    def answer(self, peer: Hashable) -> None:
        self._answered.add(peer)

    def answer_sent(self, peer: Hashable) -> bool:
        """Answer ``peer`` only if it was sent a probe since its last such answer (as a real peer
        answers the probes it gets, not every packet); whether it answered."""
        if peer not in self._unanswered:
            return False
        self._unanswered.discard(peer)
        self.answer(peer)
        return True


@dataclass
class StunCall:
    """One :meth:`FakeStun.discover` call, as the engine made it."""

    wg_port: int
    servers: tuple[tuple[str, int], ...]
    local_addrs: tuple[IPAddress, ...]


@dataclass
class FakeStun:
    """The STUN port in memory: answers ``report`` (or raises ``error``); with ``hold`` set, every
    call waits until :meth:`release` (to see what the engine does while a discovery is in flight)."""

    report: NatReport = field(default_factory=lambda: NatReport(NatClass.UNKNOWN, None, (), "no answer"))
    error: Exception | None = None
    hold: bool = False
    calls: list[StunCall] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def discover(
        self, wg_port: int, servers: Sequence[tuple[str, int]], local_addrs: Sequence[IPAddress]
    ) -> NatReport:
        self.calls.append(StunCall(wg_port, tuple(servers), tuple(local_addrs)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                await self._gate.wait()
                self._gate.clear()
            if self.error is not None:
                raise self.error
            return self.report
        finally:
            self.in_flight -= 1

    def release(self) -> None:
        """Let the held call finish."""
        self._gate.set()


@dataclass
class PunchCall:
    """One :meth:`FakePunch.punch` call: when (wall clock, as the engine's), towards whom."""

    at: float
    peer: PublicKey
    candidates: tuple[AddrPort, ...]
    start_ms: int
    openers: bool


@dataclass
class FakePunch:
    """The punch port in memory: ``results[peer]`` is what a punch towards ``peer`` finds (None:
    nothing); ``error`` makes the responder's start and every punch raise (no raw-socket privilege)."""

    wall: Callable[[], float] = time.time
    results: dict[PublicKey, AddrPort | None] = field(default_factory=dict)
    error: Exception | None = None
    calls: list[PunchCall] = field(default_factory=list)
    started: bool = False
    known: Callable[[PublicKey], bool] | None = None

    async def start(self, wg_port: int, own: PublicKey, known: Callable[[PublicKey], bool]) -> None:
        if self.error is not None:
            raise self.error
        self.started, self.known = True, known

    async def punch(
        self,
        wg_port: int,
        candidates: Sequence[AddrPort],
        start_ms: int,
        *,
        own: PublicKey,
        peer: PublicKey,
        openers: bool = True,
    ) -> AddrPort | None:
        self.calls.append(PunchCall(self.wall(), peer, tuple(candidates), start_ms, openers))
        if self.error is not None:
            raise self.error
        return self.results.get(peer)

    async def close(self) -> None:
        self.started = False


@dataclass
class FakeRelayClient:
    """The relay client port in memory: ``ports[relay mesh address]`` is the port an ALLOCATE there
    gets (absent: the relay does not answer); ``rtts`` likewise for PING. :meth:`notify` delivers a
    NOTIFY as the real client would."""

    ports: dict[ipaddress.IPv6Address, int] = field(default_factory=dict)
    rtts: dict[ipaddress.IPv6Address, float] = field(default_factory=dict)
    allocations: list[tuple[ipaddress.IPv6Address, PublicKey]] = field(default_factory=list)
    releases: list[tuple[ipaddress.IPv6Address, PublicKey]] = field(default_factory=list)
    started: bool = False
    who: Callable[[str], PublicKey | None] | None = None
    on_notify: Callable[[Notice], None] | None = None

    async def start(
        self,
        host: ipaddress.IPv6Address,
        device: str,
        who: Callable[[str], PublicKey | None],
        on_notify: Callable[[Notice], None],
    ) -> None:
        self.started, self.who, self.on_notify = True, who, on_notify

    async def allocate(self, relay: ipaddress.IPv6Address, peer: PublicKey) -> int:
        self.allocations.append((relay, peer))
        if relay not in self.ports:
            raise TimeoutError(f"no answer from relay {relay}")
        return self.ports[relay]

    async def release(self, relay: ipaddress.IPv6Address, peer: PublicKey) -> None:
        self.releases.append((relay, peer))

    async def ping(self, relay: ipaddress.IPv6Address) -> float:
        if relay not in self.rtts:
            raise TimeoutError(f"no answer from relay {relay}")
        return self.rtts[relay]

    def notify(self, relay_addr: ipaddress.IPv6Address, peer: PublicKey, port: int) -> None:
        """Deliver a NOTIFY from the relay at ``relay_addr`` (it must be a known peer)."""
        assert self.who is not None and self.on_notify is not None, "start() first"
        relay = self.who(str(relay_addr))
        assert relay is not None, f"{relay_addr} is not a peer's mesh address"
        self.on_notify(Notice(relay, str(relay_addr), peer, port, 180))

    async def stop(self) -> None:
        self.started = False


@dataclass
class FakeRelayServer:
    """The relay service port in memory (records that it runs and its directory)."""

    started: bool = False
    host: ipaddress.IPv6Address | None = None
    device: str = ""
    who: Callable[[str], PublicKey | None] | None = None
    where: Callable[[PublicKey], tuple[str, int] | None] | None = None

    async def start(
        self,
        host: ipaddress.IPv6Address,
        device: str,
        who: Callable[[str], PublicKey | None],
        where: Callable[[PublicKey], tuple[str, int] | None],
    ) -> None:
        self.started, self.host, self.device, self.who, self.where = True, host, device, who, where

    def status(self) -> dict[str, Any]:
        return {"running": self.started}

    async def stop(self) -> None:
        self.started = False


def peer_status(label: str = "n2", **fields: Any) -> PeerStatus:
    """A peer's status, up with zero counters and no endpoint; ``fields`` override."""
    base: dict[str, Any] = dict(
        label=label,
        node_id=f"id-{label}",
        public_key=f"pk-{label}",
        mesh_address=None,
        endpoint=None,
        state="up",
        rx_bytes=0,
        tx_bytes=0,
        last_handshake=None,
        last_used_endpoint=None,
        last_endpoint_change=None,
        endpoint_switches=0,
        roams=0,
        failures=0,
        candidates=(),
        learned=(),
        allowed_ips=(),
    )
    return PeerStatus(**(base | fields))


def mesh_status(*peers: PeerStatus, **fields: Any) -> MeshStatus:
    """Node n1's status with ``peers``, ready, on the userspace backend; ``fields`` override."""
    base: dict[str, Any] = dict(
        ready=True,
        node_id="id1",
        nodename="n1",
        public_key="pk1",
        mesh_address="fd00::1",
        listen_port=51820,
        backend="userspace",
        public_ip=None,
        endpoints=(),
        peers=peers,
        conflicts=(),
        errors=(),
        nat=NatStatus(),
    )
    return MeshStatus(**(base | fields))
