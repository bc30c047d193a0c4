"""The routed-prefix index: peer specs turned into the destinations the firewall marks for the mesh.

:func:`routed_prefixes` applies Talos' fail-closed default and, with ``allowDownPeerBypass``,
Talos' fail-open rule (only peers that are up are routed); :class:`RoutedIndex` keeps the union up
to date when a few specs change.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from ipaddress import IPv6Network

from kubespan.endpoints import PeerState
from kubespan.ipset import IPSet, Range, range_to_prefixes
from kubespan.peerspec import UPDATE_MAX, PeerSpec
from kubespan.wireguard.types import PublicKey
from spanutil.ipcodec import IPNetwork

# --- Routed destinations -------------------------------------------------------------------------


def routed_union(
    specs: Iterable[PeerSpec],
    mesh_subnet: IPv6Network | None,
    *,
    states: Mapping[PublicKey, PeerState] | None = None,
    allow_down_peer_bypass: bool = False,
) -> IPSet:
    """The destinations steered into the mesh (the contents of the nftables target sets).

    As in Talos, the union of the peers' AllowedIPs without the mesh addresses:
    mesh-to-mesh traffic takes the link's connected /64 route, so the whole mesh
    subnet is left out. By default every peer counts, whatever its state (fail
    closed: traffic to a peer that is not up is dropped rather than sent in the
    clear). With ``allow_down_peer_bypass`` only peers whose state is ``up`` count,
    as in Talos (its routing set takes a peer when ``forceRouting`` or the peer is
    up): a ``down`` peer, an ``unknown`` one (not connected yet) and one missing
    from ``states`` are bypassed, so their traffic takes the normal routes.
    """
    specs = list(specs)
    if allow_down_peer_bypass:
        up = states or {}
        counted = [spec for spec in specs if up.get(spec.public_key) == PeerState.UP]
    else:
        counted = specs
    union = IPSet(net for spec in counted for net in spec.allowed_ips)
    if mesh_subnet is not None:
        union = union - IPSet([mesh_subnet])
    return union


def routed_prefixes(
    specs: Iterable[PeerSpec],
    mesh_subnet: IPv6Network | None,
    *,
    states: Mapping[PublicKey, PeerState] | None = None,
    allow_down_peer_bypass: bool = False,
) -> list[IPNetwork]:
    """The destinations steered into the mesh (the contents of the nftables target sets).

    See :func:`routed_union`; the result is its minimal prefix cover, IPv4 first.
    """
    return routed_union(
        specs, mesh_subnet, states=states, allow_down_peer_bypass=allow_down_peer_bypass
    ).prefixes()


class RoutedIndex:
    """:func:`routed_union` (without the bypass) kept up to date when a few specs change.

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
        if len(changed) > UPDATE_MAX or any(a.public_key != b.public_key for a, b in changed):
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
