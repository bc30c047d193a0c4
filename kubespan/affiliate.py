"""Affiliates: decoding a discovered (remote) affiliate, and building this node's own.

:class:`RemoteAffiliate` is decoded from the discovery protobuf and checked field by field
(:class:`AffiliateError` names the field). :class:`Traversal` carries our NAT-traversal facts in a
field Talos does not know and skips (``kubespan.traversal``, encrypted like the rest).

The local affiliate follows Talos' LocalAffiliateController: addresses are the
node's addresses minus loopback, link-local, unspecified, multicast and mesh
addresses; endpoints are those addresses, then the mapped endpoint STUN found
(when it does not depend on the destination), then the public IP the discovery
service saw (unless STUN mapped that IP already), filtered by the endpoint
filters, on the listen port, followed by the extra endpoints (de-duplicated, not
filtered).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

from kubespan.constants import (
    ULA_PURPOSE_KUBESPAN,
    ULA_PURPOSE_SIDEROLINK,
    ULA_PURPOSE_VIRTUAL_SIDEROLINK,
)
from kubespan.identity import is_ula
from kubespan.ipset import IPSet
from kubespan.nat.classify import NatClass
from kubespan.wireguard.types import AddrPort, InvalidKeyError, PublicKey
from spanapi.discovery.client import affiliate_pb2
from spanutil.ipcodec import IPAddress, IPNetwork, ip_from_bytes

_MESH_PURPOSES = (ULA_PURPOSE_KUBESPAN, ULA_PURPOSE_SIDEROLINK, ULA_PURPOSE_VIRTUAL_SIDEROLINK)


class AffiliateError(ValueError):
    """A decoded affiliate is malformed; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# --- NAT traversal (our extension) -------------------------------------------------------------


def _wire_nat_classes() -> tuple[str, ...]:
    """The classifier's ``NatClass`` values indexed by their number on the wire: affiliate.proto's
    ``NAT_CLASS_<NAME>`` carries ``NatClass.<NAME>`` (a wire class the classifier lacks fails here)."""
    by_number = {
        n: NatClass[name.removeprefix("NAT_CLASS_")].value for name, n in affiliate_pb2.NatClass.items()
    }
    return tuple(by_number[i] for i in range(len(by_number)))


NAT_CLASSES = _wire_nat_classes()  # index = the NatClass enum value on the wire
MAX_PUNCH_INTENTS = 16  # one affiliate must fit the registry's 2 KiB data limit
CANDIDATES_HASH_LEN = 8


@dataclass(frozen=True, slots=True)
class PunchIntent:
    """ "I punch towards ``peer`` at ``start_ms`` (Unix ms), trying the candidates hashed here"."""

    peer: PublicKey
    candidates_hash: bytes
    start_ms: int


@dataclass(frozen=True, slots=True)
class Traversal:
    """A node's NAT class, whether it relays for others, and its punch intents."""

    nat_class: str = "unknown"
    relay: bool = False
    punches: tuple[PunchIntent, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.nat_class not in NAT_CLASSES:
            raise ValueError(f"nat_class: {self.nat_class!r} is not one of {NAT_CLASSES}")
        if len(self.punches) > MAX_PUNCH_INTENTS:
            raise ValueError(f"punches: {len(self.punches)} is above the maximum {MAX_PUNCH_INTENTS}")

    @property
    def empty(self) -> bool:
        return self == _NO_TRAVERSAL

    def to_pb(self) -> affiliate_pb2.Traversal:
        return affiliate_pb2.Traversal(
            nat_class=NAT_CLASSES.index(self.nat_class),
            relay=self.relay,
            punch=[
                affiliate_pb2.PunchIntent(
                    peer_public_key=p.peer.raw, candidates_hash=p.candidates_hash, start_unix_ms=p.start_ms
                )
                for p in self.punches
            ],
        )

    @classmethod
    def from_pb(cls, pb: affiliate_pb2.Traversal) -> Traversal:
        """Lenient: a newer peer's unknown NAT class reads as unknown, and a malformed or surplus punch
        intent is dropped (an extension must never cost a peer its mesh)."""
        nat = NAT_CLASSES[pb.nat_class] if 0 <= pb.nat_class < len(NAT_CLASSES) else "unknown"
        punches: list[PunchIntent] = []
        for p in pb.punch[:MAX_PUNCH_INTENTS]:
            if len(p.candidates_hash) != CANDIDATES_HASH_LEN:
                continue
            try:
                peer = PublicKey(p.peer_public_key)
            except InvalidKeyError:
                continue
            punches.append(PunchIntent(peer, bytes(p.candidates_hash), int(p.start_unix_ms)))
        return cls(nat, bool(pb.relay), tuple(punches))


_NO_TRAVERSAL = Traversal()


# --- Remote affiliates ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteAffiliate:
    """Another node as discovery describes it (the fields KubeSpan uses)."""

    node_id: str
    nodename: str = ""
    hostname: str = ""
    public_key: PublicKey | None = None  # None: the node does not run KubeSpan
    mesh_address: IPv6Address | None = None
    addresses: tuple[IPAddress, ...] = ()
    additional_prefixes: tuple[IPNetwork, ...] = ()
    excluded_prefixes: tuple[IPNetwork, ...] = ()
    endpoints: tuple[AddrPort, ...] = ()
    traversal: Traversal = _NO_TRAVERSAL
    api_server_port: int | None = None  # Affiliate.control_plane (8): the node serves the Kubernetes API here

    @classmethod
    def from_pb(
        cls,
        pb: affiliate_pb2.Affiliate,
        endpoints: Iterable[affiliate_pb2.Endpoint | AddrPort] = (),
    ) -> RemoteAffiliate:
        """Convert a decrypted affiliate and its separately decrypted endpoints.

        Malformed affiliate data raises :class:`AffiliateError` naming the field.
        Endpoints are independent records (possibly reported by third nodes), so an
        invalid one is dropped rather than failing the affiliate; duplicates are removed.
        """
        addresses = tuple(_ip_from_bytes(raw, f"addresses[{i}]") for i, raw in enumerate(pb.addresses))
        public_key: PublicKey | None = None
        mesh: IPv6Address | None = None
        additional: tuple[IPNetwork, ...] = ()
        excluded: tuple[IPNetwork, ...] = ()
        traversal = _NO_TRAVERSAL
        if pb.HasField("kubespan"):
            ks = pb.kubespan
            if ks.public_key:
                try:
                    public_key = PublicKey.from_b64(ks.public_key)
                except InvalidKeyError as exc:
                    raise AffiliateError("kubespan.public_key", str(exc)) from None
            if ks.address:
                addr = _ip_from_bytes(ks.address, "kubespan.address")
                if addr.version != 6:
                    raise AffiliateError("kubespan.address", "must be an IPv6 address")
                mesh = addr
            additional = tuple(
                _prefix_from_pb(p, f"kubespan.additional_addresses[{i}]")
                for i, p in enumerate(ks.additional_addresses)
            )
            excluded = tuple(
                _prefix_from_pb(p, f"kubespan.exclude_advertised_addresses[{i}]")
                for i, p in enumerate(ks.exclude_advertised_addresses)
            )
            if ks.HasField("traversal"):
                traversal = Traversal.from_pb(ks.traversal)
        eps: list[AddrPort] = []
        for ep in endpoints:
            if not isinstance(ep, AddrPort):
                try:
                    ep = AddrPort(_ip_from_bytes(ep.ip, "endpoint.ip"), ep.port)
                except ValueError:
                    continue
            if ep not in eps:
                eps.append(ep)
        return cls(
            node_id=pb.node_id,
            nodename=pb.nodename,
            hostname=pb.hostname,
            public_key=public_key,
            mesh_address=mesh,
            addresses=addresses,
            additional_prefixes=additional,
            excluded_prefixes=excluded,
            endpoints=tuple(eps),
            traversal=traversal,
            api_server_port=pb.control_plane.api_server_port if pb.HasField("control_plane") else None,
        )


def _ip_from_bytes(raw: bytes, field: str) -> IPAddress:
    try:
        return ip_from_bytes(raw)
    except ValueError:
        raise AffiliateError(field, f"{len(raw)} bytes, need 4 or 16") from None


def _prefix_from_pb(p: affiliate_pb2.IPPrefix, field: str) -> IPNetwork:
    ip = _ip_from_bytes(p.ip, f"{field}.ip")
    limit = 32 if ip.version == 4 else 128
    if p.bits > limit:
        raise AffiliateError(f"{field}.bits", f"{p.bits} is above the maximum {limit}")
    return ipaddress.ip_network((ip, p.bits), strict=False)


# --- Local affiliate -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointFilter:
    """One endpoint filter: a network, optionally negated with a leading ``!``."""

    network: IPNetwork
    negate: bool = False

    @classmethod
    def parse(cls, text: str) -> EndpointFilter:
        raw = text.strip()
        negate = raw.startswith("!")
        body = raw[1:] if negate else raw
        try:
            net = ipaddress.ip_network(body, strict=False)
        except ValueError:
            raise ValueError(
                f"endpoint_filters: {text!r} is not a CIDR or IP address (optionally prefixed with '!')"
            ) from None
        return cls(net, negate)

    def __str__(self) -> str:
        return ("!" if self.negate else "") + str(self.network)


def filter_ips(ips: Sequence[IPAddress], filters: Sequence[EndpointFilter | str]) -> list[IPAddress]:
    """Apply endpoint filters in order, as Talos does (siderolabs/net ``FilterIPs``).

    Selection starts empty; each positive filter appends the addresses it matches that are not
    selected yet (filter order, then address order) and each ``!`` filter drops the matching
    addresses selected so far, so later filters see the effect of earlier ones. An empty filter
    list keeps all; only ``!`` filters select nothing (``kubespan run`` reads them as "everything
    but": see :func:`everything_but`).
    """
    parsed = [f if isinstance(f, EndpointFilter) else EndpointFilter.parse(f) for f in filters]
    if not parsed:
        return list(ips)
    selected: list[IPAddress] = []
    for flt in parsed:
        if flt.negate:
            selected = [ip for ip in selected if not _net_contains(flt.network, ip)]
        else:
            for ip in ips:
                if _net_contains(flt.network, ip) and ip not in selected:
                    selected.append(ip)
    return selected


def everything_but(filters: Sequence[str]) -> tuple[str, ...]:
    """``kubespan run``'s reading of filters that are all ``!``: every address but those (both
    families first), where Talos's rule would leave the node without endpoints."""
    if filters and all(f.startswith("!") for f in filters):
        return ("0.0.0.0/0", "::/0", *filters)
    return tuple(filters)


def _net_contains(net: IPNetwork, ip: IPAddress) -> bool:
    return net.version == ip.version and ip in net


def is_node_address(ip: IPAddress, mesh_subnet: IPv6Network | None = None) -> bool:
    """Whether an address may be advertised as a node address / endpoint."""
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return False
    if mesh_subnet is not None and ip.version == 6 and ip in mesh_subnet:
        return False
    return not any(is_ula(ip, purpose) for purpose in _MESH_PURPOSES)


@dataclass(frozen=True, slots=True)
class LocalAffiliate:
    """This node's affiliate, ready to publish."""

    node_id: str
    nodename: str
    hostname: str
    public_key: PublicKey
    mesh_address: IPv6Address
    addresses: tuple[IPAddress, ...]
    additional_prefixes: tuple[IPNetwork, ...]
    excluded_prefixes: tuple[IPNetwork, ...]
    endpoints: tuple[AddrPort, ...]
    machine_type: str = ""
    operating_system: str = ""
    traversal: Traversal = _NO_TRAVERSAL  # empty: not written, so the bytes are Talos' own layout
    # Affiliate.control_plane (8): set on control planes, as Talos (cluster.controlPlane.localAPIServerPort);
    # Talos nodes' KubePrism takes every member that has it as a Kubernetes API endpoint
    api_server_port: int | None = None

    def to_pb(self) -> affiliate_pb2.Affiliate:
        pb = affiliate_pb2.Affiliate(
            node_id=self.node_id,
            addresses=[ip.packed for ip in self.addresses],
            hostname=self.hostname,
            nodename=self.nodename,
            machine_type=self.machine_type,
            operating_system=self.operating_system,
            kubespan=affiliate_pb2.KubeSpan(
                public_key=self.public_key.b64,
                address=self.mesh_address.packed,
                additional_addresses=[_prefix_to_pb(p) for p in self.additional_prefixes],
                exclude_advertised_addresses=[_prefix_to_pb(p) for p in self.excluded_prefixes],
            ),
        )
        if not self.traversal.empty:
            pb.kubespan.traversal.CopyFrom(self.traversal.to_pb())
        if self.api_server_port is not None:
            pb.control_plane.api_server_port = self.api_server_port
        return pb

    def endpoints_pb(self) -> list[affiliate_pb2.Endpoint]:
        return [affiliate_pb2.Endpoint(ip=ep.ip.packed, port=ep.port) for ep in self.endpoints]


def _prefix_to_pb(net: IPNetwork) -> affiliate_pb2.IPPrefix:
    return affiliate_pb2.IPPrefix(ip=net.network_address.packed, bits=net.prefixlen)


def _networks(items: Iterable[IPNetwork | str]) -> tuple[IPNetwork, ...]:
    return tuple(dict.fromkeys(ipaddress.ip_network(n, strict=False) for n in items))


def _as_ip(item: IPAddress | IPv4Interface | IPv6Interface | str) -> IPAddress:
    if isinstance(item, IPv4Interface | IPv6Interface):
        return item.ip
    if isinstance(item, str):
        return ipaddress.ip_interface(item).ip
    return item


def build_local_affiliate(
    *,
    node_id: str,
    nodename: str,
    hostname: str,
    public_key: PublicKey,
    mesh_address: IPv6Address | IPv6Interface,
    node_addresses: Iterable[IPAddress | IPv4Interface | IPv6Interface | str],
    listen_port: int,
    advertised: Iterable[IPNetwork | str] = (),
    excluded: Iterable[IPNetwork | str] = (),
    public_ip: IPAddress | None = None,
    extra_endpoints: Iterable[AddrPort | str] = (),
    endpoint_filters: Sequence[EndpointFilter | str] = (),
    exclude_addresses: Iterable[IPNetwork | str] = (),
    machine_type: str = "",
    operating_system: str = "",
    traversal: Traversal = _NO_TRAVERSAL,
    mapped_endpoint: AddrPort | None = None,
    api_server_port: int | None = None,
) -> LocalAffiliate:
    """Build this node's affiliate (see the module docstring for the rules).

    ``node_addresses`` should be in the node's preferred order (it becomes the
    endpoint order). ``exclude_addresses`` drops node addresses inside those
    networks (pod/service CIDRs: Talos' "no-k8s" filter). The mesh subnet is
    taken from ``mesh_address`` when it is an interface, else its /64.
    ``mapped_endpoint`` is what STUN responders saw of the listen port (publishable only: public or
    endpoint-independent mapping); it replaces the guess "public IP on the listen port" for its IP.
    ``api_server_port`` (control planes): published as ``control_plane.api_server_port``; None: not published.
    """
    if isinstance(mesh_address, IPv6Interface):
        mesh_ip, mesh_subnet = mesh_address.ip, mesh_address.network
    else:
        mesh_ip = mesh_address
        mesh_subnet = IPv6Network((mesh_address, 64), strict=False)
    if not 0 < listen_port < 65536:
        raise ValueError(f"listen_port: {listen_port} must be 1..65535")
    if api_server_port is not None and not 0 < api_server_port < 65536:
        raise ValueError(f"api_server_port: {api_server_port} must be 1..65535")
    drop = IPSet(exclude_addresses)

    addresses: list[IPAddress] = []
    for item in node_addresses:
        ip = _as_ip(item)
        if ip == mesh_ip or not is_node_address(ip, mesh_subnet) or ip in drop:
            continue
        if ip not in addresses:
            addresses.append(ip)

    candidates = list(addresses)
    guessed: IPAddress | None = None  # the public IP discovery saw, when it is no address of ours
    if (
        public_ip is not None
        and public_ip not in candidates
        and is_node_address(public_ip, mesh_subnet)
        and not (mapped_endpoint is not None and mapped_endpoint.ip == public_ip)  # measured beats guessed
    ):
        candidates.append(public_ip)
        guessed = public_ip
    chosen = filter_ips(candidates, endpoint_filters)
    endpoints: list[AddrPort] = [AddrPort(ip, listen_port) for ip in chosen if ip != guessed]
    if mapped_endpoint is not None and filter_ips([mapped_endpoint.ip], endpoint_filters):
        if mapped_endpoint not in endpoints:
            endpoints.append(mapped_endpoint)
    if guessed is not None and guessed in chosen:
        endpoints.append(AddrPort(guessed, listen_port))
    for extra in extra_endpoints:
        ep = extra if isinstance(extra, AddrPort) else AddrPort.parse(extra)
        if ep not in endpoints:
            endpoints.append(ep)

    return LocalAffiliate(
        node_id=node_id,
        nodename=nodename,
        hostname=hostname,
        public_key=public_key,
        mesh_address=mesh_ip,
        addresses=tuple(addresses),
        additional_prefixes=_networks(advertised),
        excluded_prefixes=_networks(excluded),
        endpoints=tuple(endpoints),
        machine_type=machine_type,
        operating_system=operating_system,
        traversal=traversal,
        api_server_port=api_server_port,
    )
