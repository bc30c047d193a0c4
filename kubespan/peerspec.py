"""Peer specs from discovered affiliates.

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
"""

from __future__ import annotations

import bisect
import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address

from kubespan.affiliate import RemoteAffiliate
from kubespan.ipset import IPSet, Range
from kubespan.wireguard.types import AddrPort, PublicKey
from spanutil.ipcodec import IPNetwork

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


UPDATE_MAX = 8  # more changed affiliates (or specs) than this: recompute everything


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
    if len(changed) > UPDATE_MAX:
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
