"""Peer specs from discovered affiliates, and this node's own affiliate.

Peer specs follow Talos' PeerSpecController:

* affiliates are processed in ascending node-id order; this node and
  affiliates without a KubeSpan public key are skipped;
* a peer's address set is ``(additional prefixes | addresses as single IPs)
  - excluded prefixes | {mesh address}`` (evaluated left to right);
* every part of that set already claimed by a peer processed earlier is
  removed, so **the lower node id keeps a contested address** (a VIP, say);
* AllowedIPs is the minimal prefix cover of what remains; endpoints are copied
  unchanged; the label is the nodename.

Unlike Talos, every such decision is *surfaced* as a :class:`Conflict` for
status output instead of only being logged, and two cases Talos leaves to
chance are made deterministic: a public key used by two affiliates (the lower
node id keeps it) and a peer using this node's own key (skipped: WireGuard
ignores such a peer anyway). Duplicate mesh addresses are reported.

:func:`routed_prefixes` turns peer specs into the destinations the firewall
marks for the mesh (with Talos' fail-closed default and its optional bypass of
down peers, which never applies to a peer that has not connected yet).

The local affiliate follows Talos' LocalAffiliateController: addresses are the
node's addresses minus loopback, link-local, unspecified, multicast and mesh
addresses; endpoints are those addresses plus the public IP the discovery
service saw, filtered by the endpoint filters, on the listen port, followed by
the extra endpoints (de-duplicated, not filtered).
"""

from __future__ import annotations

import bisect
import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

from kubespan.constants import (
    ULA_PURPOSE_KUBESPAN,
    ULA_PURPOSE_SIDEROLINK,
    ULA_PURPOSE_VIRTUAL_SIDEROLINK,
)
from kubespan.endpoints import PeerState
from kubespan.identity import is_ula
from kubespan.ipset import IPSet, Range, range_to_prefixes
from kubespan.wireguard.types import AddrPort, InvalidKeyError, PublicKey
from spanapi.discovery.client import affiliate_pb2
from spanutil.ipcodec import IPAddress, IPNetwork, ip_from_bytes

_MESH_PURPOSES = (ULA_PURPOSE_KUBESPAN, ULA_PURPOSE_SIDEROLINK, ULA_PURPOSE_VIRTUAL_SIDEROLINK)


class AffiliateError(ValueError):
    """A decoded affiliate is malformed; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


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


# --- Peer specs ----------------------------------------------------------------------------------


class ConflictKind(enum.StrEnum):
    ADDRESS_OVERLAP = "address-overlap"  # addresses claimed by a lower node id were removed
    DUPLICATE_MESH_ADDRESS = "duplicate-mesh-address"  # same mesh address as a lower node id
    DUPLICATE_PUBLIC_KEY = "duplicate-public-key"  # same key as a lower node id: peer skipped
    LOCAL_PUBLIC_KEY = "local-public-key"  # uses this node's key: peer skipped
    LOCAL_MESH_ADDRESS = "local-mesh-address"  # uses this node's mesh address


@dataclass(frozen=True, slots=True)
class Conflict:
    """One resolved conflict, for status output. ``node_id`` is the node that lost."""

    kind: ConflictKind
    node_id: str
    other_node_id: str | None  # the winner; None when the other side is this node
    prefixes: tuple[IPNetwork, ...] = ()

    def __str__(self) -> str:
        other = self.other_node_id if self.other_node_id is not None else "local node"
        text = f"{self.kind}: {self.node_id} vs {other}"
        if self.prefixes:
            text += " (" + ", ".join(str(p) for p in self.prefixes) + ")"
        return text


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """What the mesh configures for one peer."""

    public_key: PublicKey
    node_id: str
    label: str
    mesh_address: IPv6Address | None
    allowed_ips: tuple[IPNetwork, ...]  # minimal prefix cover, IPv4 first, ascending
    endpoints: tuple[AddrPort, ...]


@dataclass(frozen=True, slots=True)
class PeerSpecs:
    """The result of :func:`compute_peer_specs`."""

    specs: tuple[PeerSpec, ...]  # ascending node id
    conflicts: tuple[Conflict, ...]

    def by_key(self) -> dict[PublicKey, PeerSpec]:
        return {s.public_key: s for s in self.specs}


class PeerSpecMemo:
    """What :func:`compute_peer_specs` derived from each affiliate last time, for reuse.

    :class:`RemoteAffiliate` is immutable, so while the caller passes the *same*
    affiliate object again, its address set (and, when no overlap changed it,
    its :class:`PeerSpec`) is taken from here instead of being recomputed. Only
    the last call's affiliates are kept.
    """

    __slots__ = (
        "claims",
        "entries",
        "involved",
        "keys_changed",
        "local",
        "owner",
        "position",
        "result",
        "seen",
    )

    def __init__(self) -> None:
        self.entries: dict[str, tuple[RemoteAffiliate, IPSet, PeerSpec | None]] = {}
        # For updating the last result in place when few affiliates changed (see compute_peer_specs):
        self.seen: dict[str, RemoteAffiliate] = {}  # every affiliate of the last call, by node id
        self.result: PeerSpecs | None = None
        self.local: tuple[str, PublicKey | None, IPv6Address | None] | None = None
        self.claims = _Claims()  # the final address sets, owner = index into ``owner``'s values
        self.owner: dict[str, int] = {}  # node id -> claims owner index
        self.position: dict[str, int] = {}  # node id -> index in result.specs
        self.involved: frozenset[str] = frozenset()  # node ids named by any conflict
        self.keys_changed = True  # whether the last call may have changed the peers' key sequence


def _peer_spec(aff: RemoteAffiliate, allowed: IPSet) -> PeerSpec:
    """The WireGuard peer for an affiliate with a key, given its final (overlap-free) address set."""
    assert aff.public_key is not None
    return PeerSpec(
        public_key=aff.public_key,
        node_id=aff.node_id,
        label=aff.nodename,
        mesh_address=aff.mesh_address,
        allowed_ips=tuple(allowed.prefixes()),
        endpoints=aff.endpoints,
    )


def _wanted(aff: RemoteAffiliate) -> IPSet:
    """Talos' address set of one affiliate, before overlaps with other peers are resolved."""
    wanted = IPSet(aff.additional_prefixes) | IPSet(aff.addresses)
    wanted = wanted - IPSet(aff.excluded_prefixes)
    if aff.mesh_address is not None:
        wanted = wanted | IPSet([aff.mesh_address])
    return wanted


class _Claims:
    """The addresses already given to peers: one sorted list of disjoint ranges per family,
    each tagged with the index of the peer that owns it (claimed sets never overlap)."""

    __slots__ = ("_his", "_los", "_owners")

    def __init__(self) -> None:
        self._los: dict[int, list[int]] = {4: [], 6: []}
        self._his: dict[int, list[int]] = {4: [], 6: []}
        self._owners: dict[int, list[int]] = {4: [], 6: []}

    def overlaps(self, wanted: IPSet) -> dict[int, IPSet]:
        """Per owner index, the part of ``wanted`` it already holds."""
        found: dict[int, tuple[list[Range], list[Range]]] = {}
        for version in (4, 6):
            los, his, owners = self._los[version], self._his[version], self._owners[version]
            if not los:
                continue
            for lo, hi in wanted.ranges(version):
                i = bisect.bisect_left(his, lo)  # the first claimed range ending at or after lo
                while i < len(los) and los[i] <= hi:
                    parts = found.setdefault(owners[i], ([], []))
                    parts[0 if version == 4 else 1].append((max(lo, los[i]), min(hi, his[i])))
                    i += 1
        return {owner: IPSet.from_ranges(v4, v6) for owner, (v4, v6) in found.items()}

    def add(self, owner: int, claimed: IPSet) -> None:
        for version in (4, 6):
            los, his, owners = self._los[version], self._his[version], self._owners[version]
            for lo, hi in claimed.ranges(version):
                i = bisect.bisect_left(los, lo)
                los.insert(i, lo)
                his.insert(i, hi)
                owners.insert(i, owner)

    def remove(self, owner: int, claimed: IPSet) -> None:
        """Take back exactly what ``add(owner, claimed)`` put in."""
        for version in (4, 6):
            los, his, owners = self._los[version], self._his[version], self._owners[version]
            for lo, hi in claimed.ranges(version):
                i = bisect.bisect_left(los, lo)
                if i == len(los) or los[i] != lo or his[i] != hi or owners[i] != owner:
                    raise ValueError("claims out of step")
                del los[i], his[i], owners[i]


def compute_peer_specs(
    affiliates: Iterable[RemoteAffiliate],
    local_node_id: str,
    local_public_key: PublicKey | None = None,
    local_mesh_address: IPv6Address | None = None,
    *,
    memo: PeerSpecMemo | None = None,
) -> PeerSpecs:
    """Peer specs with Talos' AllowedIPs and overlap rules, plus the conflicts found.

    Affiliates are taken in node-id order and each loses what earlier ones
    already claimed. Claimed sets are disjoint, so a peer's overlap with each
    earlier one is found by binary search over all claimed ranges instead of
    comparing with every earlier peer (quadratic at 1000 peers). ``memo``
    reuses the per-affiliate work of the previous call for unchanged
    affiliates; the result is the same with or without it.
    """
    affiliates = list(affiliates)  # iterated twice with a memo
    if memo is not None:
        updated = _update_specs(affiliates, (local_node_id, local_public_key, local_mesh_address), memo)
        if updated is not None:
            return updated
    specs: list[PeerSpec] = []
    conflicts: list[Conflict] = []
    claims = _Claims()
    claimed_by: list[str] = []  # node id of each claimed set, in processing order
    key_owner: dict[PublicKey, str] = {}
    mesh_owner: dict[IPv6Address, str] = {}
    previous = memo.entries if memo is not None else {}
    entries: dict[str, tuple[RemoteAffiliate, IPSet, PeerSpec | None]] = {}

    for aff in sorted(affiliates, key=lambda a: a.node_id):
        if aff.node_id == local_node_id or aff.public_key is None:
            continue
        if local_public_key is not None and aff.public_key == local_public_key:
            conflicts.append(Conflict(ConflictKind.LOCAL_PUBLIC_KEY, aff.node_id, None))
            continue
        if aff.public_key in key_owner:
            conflicts.append(
                Conflict(ConflictKind.DUPLICATE_PUBLIC_KEY, aff.node_id, key_owner[aff.public_key])
            )
            continue
        key_owner[aff.public_key] = aff.node_id

        entry = previous.get(aff.node_id)
        if entry is not None and entry[0] is aff:
            wanted, cached_spec = entry[1], entry[2]
        else:
            wanted, cached_spec = _wanted(aff), None
        if aff.mesh_address is not None:
            if local_mesh_address is not None and aff.mesh_address == local_mesh_address:
                conflicts.append(
                    Conflict(
                        ConflictKind.LOCAL_MESH_ADDRESS,
                        aff.node_id,
                        None,
                        (ipaddress.ip_network(aff.mesh_address),),
                    )
                )
            if aff.mesh_address in mesh_owner:
                conflicts.append(
                    Conflict(
                        ConflictKind.DUPLICATE_MESH_ADDRESS,
                        aff.node_id,
                        mesh_owner[aff.mesh_address],
                        (ipaddress.ip_network(aff.mesh_address),),
                    )
                )
            else:
                mesh_owner[aff.mesh_address] = aff.node_id

        final = wanted
        overlaps = claims.overlaps(wanted)
        for owner in sorted(overlaps):
            overlap = overlaps[owner]
            conflicts.append(
                Conflict(
                    ConflictKind.ADDRESS_OVERLAP, aff.node_id, claimed_by[owner], tuple(overlap.prefixes())
                )
            )
            final = final - overlap
        claims.add(len(claimed_by), final)
        claimed_by.append(aff.node_id)

        if overlaps or cached_spec is None:
            spec = _peer_spec(aff, final)
        else:
            spec = cached_spec
        specs.append(spec)
        entries[aff.node_id] = (aff, wanted, None if overlaps else spec)
    result = PeerSpecs(tuple(specs), tuple(conflicts))
    if memo is not None:
        memo.entries = entries
        memo.seen = {a.node_id: a for a in affiliates}
        memo.result = result
        memo.local = (local_node_id, local_public_key, local_mesh_address)
        memo.claims = claims
        memo.owner = {node_id: i for i, node_id in enumerate(claimed_by)}
        memo.position = {spec.node_id: i for i, spec in enumerate(result.specs)}
        memo.involved = frozenset(
            n for c in result.conflicts for n in (c.node_id, c.other_node_id) if n is not None
        )
        memo.keys_changed = True
    return result


_UPDATE_MAX = 8  # more changed affiliates than this: recompute everything


def _update_specs(
    affiliates: Sequence[RemoteAffiliate],
    local: tuple[str, PublicKey | None, IPv6Address | None],
    memo: PeerSpecMemo,
) -> PeerSpecs | None:
    """The last result with the specs of the few changed affiliates replaced, when that is what a
    full computation gives; None when it might not be (then the caller computes everything).

    It is when every changed affiliate keeps its node id, public key and mesh address, was
    part of no conflict, and its new address set overlaps no other peer's: then no other peer's
    spec and no conflict changes, and its own AllowedIPs are just its address set.
    """
    result = memo.result
    if result is None or memo.local != local or len(affiliates) != len(memo.seen):
        return None
    changed = [a for a in affiliates if memo.seen.get(a.node_id) is not a]
    if not changed:
        memo.keys_changed = False
        return result
    if len(changed) > _UPDATE_MAX:
        return None
    node_id = local[0]
    plan: list[tuple[RemoteAffiliate, RemoteAffiliate]] = []
    for new in changed:
        old = memo.seen.get(new.node_id)
        if old is None or new.node_id in memo.involved:
            return None
        skipped = old.node_id == node_id or old.public_key is None
        if skipped and (new.node_id == node_id or new.public_key is None):
            continue  # skipped before and now, with no conflict either way
        if (
            skipped
            or new.public_key != old.public_key
            or new.mesh_address != old.mesh_address
            or new.node_id not in memo.entries
        ):
            return None
        plan.append((old, new))
    specs = list(result.specs)
    for _old, new in plan:
        owner = memo.owner[new.node_id]
        before = memo.entries[new.node_id][1]  # no conflict: its final set is its wanted set
        wanted = _wanted(new)
        if set(memo.claims.overlaps(wanted)) - {owner}:
            # the full computation that follows rebuilds the claims and the rest of the memo
            # (the entries updated so far hold what it would compute for them)
            return None
        memo.claims.remove(owner, before)
        memo.claims.add(owner, wanted)
        spec = _peer_spec(new, wanted)
        specs[memo.position[new.node_id]] = spec
        memo.entries[new.node_id] = (new, wanted, spec)
    for new in changed:
        memo.seen[new.node_id] = new
    memo.result = PeerSpecs(tuple(specs), result.conflicts)
    memo.keys_changed = False
    return memo.result


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
    """Apply endpoint filters in order.

    As in Talos (siderolabs/net ``FilterIPs``): each positive filter appends the
    addresses it matches that are not selected yet (filter order, then address
    order) and each ``!`` filter drops the matching addresses selected so far, so
    later filters see the effect of earlier ones. An empty filter list keeps all.

    One deliberate difference: when *no* filter is positive, selection starts
    from all addresses (Talos would select nothing, leaving the node without
    endpoints), so ``!10.0.0.0/8`` alone means "everything but 10/8".
    """
    parsed = [f if isinstance(f, EndpointFilter) else EndpointFilter.parse(f) for f in filters]
    if not parsed:
        return list(ips)
    selected: list[IPAddress] = [] if any(not f.negate for f in parsed) else list(dict.fromkeys(ips))
    for flt in parsed:
        if flt.negate:
            selected = [ip for ip in selected if not _net_contains(flt.network, ip)]
        else:
            for ip in ips:
                if _net_contains(flt.network, ip) and ip not in selected:
                    selected.append(ip)
    return selected


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

    def to_pb(self) -> affiliate_pb2.Affiliate:
        return affiliate_pb2.Affiliate(
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
) -> LocalAffiliate:
    """Build this node's affiliate (see the module docstring for the rules).

    ``node_addresses`` should be in the node's preferred order (it becomes the
    endpoint order). ``exclude_addresses`` drops node addresses inside those
    networks (pod/service CIDRs: Talos' "no-k8s" filter). The mesh subnet is
    taken from ``mesh_address`` when it is an interface, else its /64.
    """
    if isinstance(mesh_address, IPv6Interface):
        mesh_ip, mesh_subnet = mesh_address.ip, mesh_address.network
    else:
        mesh_ip = mesh_address
        mesh_subnet = IPv6Network((mesh_address, 64), strict=False)
    if not 0 < listen_port < 65536:
        raise ValueError(f"listen_port: {listen_port} must be 1..65535")
    drop = IPSet(exclude_addresses)

    addresses: list[IPAddress] = []
    for item in node_addresses:
        ip = _as_ip(item)
        if ip == mesh_ip or not is_node_address(ip, mesh_subnet) or ip in drop:
            continue
        if ip not in addresses:
            addresses.append(ip)

    candidates = list(addresses)
    if public_ip is not None and public_ip not in candidates and is_node_address(public_ip, mesh_subnet):
        candidates.append(public_ip)
    chosen = filter_ips(candidates, endpoint_filters)
    endpoints: list[AddrPort] = [AddrPort(ip, listen_port) for ip in chosen]
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
    )


# --- Routed destinations -------------------------------------------------------------------------


class PrefixMemo:
    """Each peer's AllowedIPs as an :class:`IPSet` from an earlier :func:`routed_prefixes`, reused
    while the spec's ``allowed_ips`` is the same (immutable) tuple."""

    __slots__ = ("sets",)

    def __init__(self) -> None:
        self.sets: dict[PublicKey, tuple[tuple[IPNetwork, ...], IPSet]] = {}


def routed_union(
    specs: Iterable[PeerSpec],
    mesh_subnet: IPv6Network | None,
    *,
    states: Mapping[PublicKey, PeerState] | None = None,
    allow_down_peer_bypass: bool = False,
    memo: PrefixMemo | None = None,
) -> IPSet:
    """The destinations steered into the mesh (the contents of the nftables target sets).

    As in Talos, the union of the peers' AllowedIPs without the mesh addresses:
    mesh-to-mesh traffic takes the link's connected /64 route, so the whole mesh
    subnet is left out. By default every peer counts (fail closed: traffic to a
    down peer is dropped rather than sent in the clear). With
    ``allow_down_peer_bypass`` a peer whose state is ``down`` is left out, so its
    traffic takes the normal routes; a peer that is ``unknown`` (never connected
    yet) or missing from ``states`` is never bypassed. ``memo`` only saves work; the
    result is the same.
    """
    specs = list(specs)
    counted = [
        spec
        for spec in specs
        if not (
            allow_down_peer_bypass and states is not None and states.get(spec.public_key) == PeerState.DOWN
        )
    ]
    if memo is None:
        union = IPSet(net for spec in counted for net in spec.allowed_ips)
    else:
        v4: list[Range] = []
        v6: list[Range] = []
        sets = dict(memo.sets)
        for spec in counted:
            entry = sets.get(spec.public_key)
            if entry is None or entry[0] is not spec.allowed_ips:
                entry = sets[spec.public_key] = (spec.allowed_ips, IPSet(spec.allowed_ips))
            v4.extend(entry[1].ranges(4))
            v6.extend(entry[1].ranges(6))
        wanted = {spec.public_key for spec in specs}
        memo.sets = {k: v for k, v in sets.items() if k in wanted}
        union = IPSet.from_ranges(v4, v6)
    if mesh_subnet is not None:
        union = union - IPSet([mesh_subnet])
    return union


def routed_prefixes(
    specs: Iterable[PeerSpec],
    mesh_subnet: IPv6Network | None,
    *,
    states: Mapping[PublicKey, PeerState] | None = None,
    allow_down_peer_bypass: bool = False,
    memo: PrefixMemo | None = None,
) -> list[IPNetwork]:
    """The destinations steered into the mesh (the contents of the nftables target sets).

    See :func:`routed_union`; the result is its minimal prefix cover, IPv4 first.
    """
    return routed_union(
        specs, mesh_subnet, states=states, allow_down_peer_bypass=allow_down_peer_bypass, memo=memo
    ).prefixes()


class RoutedIndex:
    """:func:`routed_union` (without down-peer bypass) kept up to date when a few specs change.

    Peer specs claim disjoint address sets, so the union changes by exactly the changed
    peers' old and new contributions: each old range is cut out of the merged range holding
    it, each new one is inserted and merged with adjacent neighbours. Anything unexpected (a
    different peer list, many changes, an overlap) answers None, and the caller recomputes
    and calls :meth:`reset`. Prefix covers are kept per merged range, so unchanged ranges give
    the same prefix objects again (cheap to compare).
    """

    def __init__(self) -> None:
        self._specs: tuple[PeerSpec, ...] | None = None
        self._subnet: IPv6Network | None = None
        self._merged: dict[int, list[Range]] = {4: [], 6: []}
        self._covers: dict[tuple[int, int, int], tuple[IPNetwork, ...]] = {}

    def reset(
        self, specs: tuple[PeerSpec, ...] | None, mesh_subnet: IPv6Network | None, union: IPSet
    ) -> dict[int, list[IPNetwork]]:
        """Start over from ``union`` (= ``routed_union(specs, mesh_subnet)``; specs None: do not
        update from it later). Returns its prefixes per family."""
        self._specs, self._subnet = specs, mesh_subnet
        self._merged = {v: list(union.ranges(v)) for v in (4, 6)}
        return self._prefixes()

    def update(
        self, specs: tuple[PeerSpec, ...], mesh_subnet: IPv6Network | None
    ) -> dict[int, list[IPNetwork]] | None:
        """The prefixes per family for ``specs``, or None when :meth:`reset` is needed."""
        prev = self._specs
        if prev is None or mesh_subnet != self._subnet or len(prev) != len(specs):
            return None
        if prev is specs:
            return self._prefixes()
        changed = [(a, b) for a, b in zip(prev, specs, strict=True) if a is not b]
        if len(changed) > _UPDATE_MAX or any(a.public_key != b.public_key for a, b in changed):
            return None
        self._specs = None  # until the update completes
        for a, b in changed:
            old, new = self._contribution(a), self._contribution(b)
            for v in (4, 6):
                for r in old.ranges(v):
                    if not self._cut(v, r):
                        return None
            for v in (4, 6):
                for r in new.ranges(v):
                    if not self._insert(v, r):
                        return None
        self._specs = specs
        return self._prefixes()

    def _contribution(self, spec: PeerSpec) -> IPSet:
        own = IPSet(spec.allowed_ips)
        return own - IPSet([self._subnet]) if self._subnet is not None else own

    def _cut(self, v: int, r: Range) -> bool:
        merged = self._merged[v]
        lo, hi = r
        i = bisect.bisect_right(merged, (lo, 1 << 129)) - 1
        if i < 0 or not (merged[i][0] <= lo and hi <= merged[i][1]):
            return False
        first, last = merged[i]
        parts = [p for p in ((first, lo - 1), (hi + 1, last)) if p[0] <= p[1]]
        merged[i : i + 1] = parts
        return True

    def _insert(self, v: int, r: Range) -> bool:
        merged = self._merged[v]
        lo, hi = r
        i = bisect.bisect_left(merged, (lo, -1))
        if (i > 0 and merged[i - 1][1] >= lo) or (i < len(merged) and merged[i][0] <= hi):
            return False  # overlaps: not disjoint after all
        start, end = i, i
        if i > 0 and merged[i - 1][1] + 1 == lo:
            start, lo = i - 1, merged[i - 1][0]
        if i < len(merged) and merged[i][0] == hi + 1:
            end, hi = i + 1, merged[i][1]
        merged[start:end] = [(lo, hi)]
        return True

    def _prefixes(self) -> dict[int, list[IPNetwork]]:
        old, covers = self._covers, {}
        out: dict[int, list[IPNetwork]] = {4: [], 6: []}
        for v in (4, 6):
            acc = out[v]
            for lo, hi in self._merged[v]:
                key = (v, lo, hi)
                cover = old.get(key)
                if cover is None:
                    cover = tuple(range_to_prefixes(lo, hi, v))
                covers[key] = cover
                acc.extend(cover)
        self._covers = covers
        return out
