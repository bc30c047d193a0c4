"""What the mesh engine publishes at the end of every pass: one immutable :class:`MeshSnapshot`.

Readers (``Mesh.status()``, machined's mesh host and its controllers) read only the snapshot, never
the engine's working state. Everything in it is immutable (frozen dataclasses, tuples, immutable
key/address types), so a snapshot can be held and compared by identity: a pass that changed nothing
publishes the previous snapshot again, and parts that did not change are the previous objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kubespan.constants import STEERING_MARKS

if TYPE_CHECKING:
    from kubespan.affiliate import LocalAffiliate, RemoteAffiliate
    from kubespan.identity import MeshIdentity
    from kubespan.peerspec import PeerSpecs
    from spanutil.ipcodec import IPAddress


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """One affiliate discovery reports, decoded once (by the engine) for every reader."""

    id: str  # the discovery affiliate id
    affiliate: RemoteAffiliate
    machine_type: str
    operating_system: str


@dataclass(frozen=True, slots=True)
class PeerStatus:
    label: str
    node_id: str
    public_key: str
    mesh_address: str | None
    endpoint: str | None  # what WireGuard uses now
    state: str  # unknown | up | down
    rx_bytes: int
    tx_bytes: int
    last_handshake: float | None  # unix time
    last_used_endpoint: str | None
    last_endpoint_change: float | None  # unix time
    endpoint_switches: int
    roams: int
    failures: int
    candidates: tuple[str, ...]
    learned: tuple[str, ...]
    allowed_ips: tuple[str, ...]
    nat_class: str = "unknown"  # what the peer publishes (public | eim | edm | unknown)
    path: str = "none"  # lan | direct | relay | none (not up)
    relay_via: str | None = None  # the relay's node name while path is relay
    why_not_direct: str | None = None  # e.g. "both behind symmetric NAT"; None on a direct or LAN path
    connect_time: float | None = None  # seconds from both sides' candidates known to the first handshake
    probes: int = 0  # path probes its endpoint machine asked for so far (the probing cost)
    # smoothed round trip of answered path probes, seconds; None: no probe answered yet (no probes
    # so far, or a peer that does not answer them)
    rtt: float | None = None


@dataclass(frozen=True, slots=True)
class NatStatus:
    """This node's endpoint discovery: the NAT class, the mapped endpoint STUN responders saw, the
    one published to peers (None: none, as without STUN), who answered, and why it is not better
    known (``"STUN: ..."``; None when it is)."""

    nat_class: str = "unknown"
    mapped: str | None = None
    published: str | None = None
    responders: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()  # as configured
    error: str | None = None
    checked_at: float | None = None  # unix time the last discovery finished


NO_STUN = NatStatus(error="STUN: no responder configured")


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """This node's relay service (``--relay``): what it carries for other nodes (ciphertext only)."""

    running: bool = False
    allocations: int = 0
    forwarded_packets: int = 0
    forwarded_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # by reason (junk, forged mac1, rate, ...)
    expired: int = 0  # allocations ended by their idle timeout
    requests: int = 0  # control requests answered (ALLOCATE, RELEASE, PING)
    refused: dict[str, int] = field(default_factory=dict)  # control requests refused, by reason

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> RelayStatus:
        """From the relay service's status (:meth:`kubespan.relay.service.RelayService.status`)."""
        control = status.get("control") or {}
        return cls(
            running=bool(status.get("running")),
            allocations=len(status.get("allocations") or ()),
            forwarded_packets=int(status.get("forwarded_packets") or 0),
            forwarded_bytes=int(status.get("forwarded_bytes") or 0),
            dropped=dict(status.get("dropped") or {}),
            expired=int(status.get("expired") or 0),
            requests=sum((control.get("requests") or {}).values()),
            refused=dict(control.get("refused") or {}),
        )


@dataclass(frozen=True, slots=True)
class MeshStatus:
    ready: bool
    node_id: str
    nodename: str
    public_key: str
    mesh_address: str
    listen_port: int
    backend: str
    public_ip: str | None
    endpoints: tuple[str, ...]
    peers: tuple[PeerStatus, ...]
    conflicts: tuple[str, ...]
    errors: tuple[str, ...]
    nat: NatStatus = NO_STUN
    relay: RelayStatus | None = None  # None: this node does not relay
    steering: str = STEERING_MARKS  # how traffic for peers reaches the link (marks or routes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class MeshSnapshot:
    """The mesh after one engine pass."""

    at: float | None  # unix time of the pass that built this content; None: published at start
    node_id: str
    nodename: str
    identity: MeshIdentity
    listen_port: int
    backend: str
    configured: bool  # the WireGuard device has been read and configured (the engine's ``ready``)
    public_ip: IPAddress | None
    remotes: tuple[RemoteRecord, ...]  # well-formed affiliates, in discovery's order
    specs: PeerSpecs
    peers: tuple[PeerStatus, ...]  # in the order of ``specs``
    local: LocalAffiliate | None  # this node's affiliate as the pass computed it
    published_local: LocalAffiliate | None  # what discovery holds (None: nothing published yet)
    errors: tuple[str, ...]  # the last few
    nat: NatStatus = NO_STUN  # endpoint discovery, as the last completed run left it
    relay: RelayStatus | None = None  # the relay service's counters (None: not relaying)
    steering: str = STEERING_MARKS  # the data-plane layout (MeshConfig.steering)

    @property
    def local_published(self) -> bool:
        """Whether this pass's local affiliate is what discovery holds."""
        return self.local is not None and self.local == self.published_local

    def status(self) -> MeshStatus:
        all_up = all(p.state == "up" for p in self.peers)
        published = self.published_local
        return MeshStatus(
            ready=self.configured and all_up,
            node_id=self.node_id,
            nodename=self.nodename,
            public_key=self.identity.public_key.b64,
            mesh_address=str(self.identity.address.ip),
            listen_port=self.listen_port,
            backend=self.backend,
            public_ip=str(self.public_ip) if self.public_ip else None,
            endpoints=tuple(str(e) for e in published.endpoints) if published else (),
            peers=self.peers,
            conflicts=tuple(str(c) for c in self.specs.conflicts),
            errors=self.errors,
            nat=self.nat,
            relay=self.relay,
            steering=self.steering,
        )
