"""Immutable sets of IP addresses with exact set algebra and minimal prefix covers.

The semantics follow an "IP set builder" as Talos uses it for AllowedIPs: add
prefixes and single addresses, remove prefixes, then read back the *minimal*
list of prefixes that covers exactly the set. Internally each family is a
sorted tuple of disjoint, non-adjacent inclusive integer ranges, so every
operation is linear in the number of ranges.

IPv4 and IPv6 are separate universes: an IPv4-mapped IPv6 address
(``::ffff:a.b.c.d``) is an IPv6 member, as in Go's ``netip``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from spanutil.ipcodec import IPAddress, IPNetwork

Range = tuple[int, int]

_BITS = {4: 32, 6: 128}


def _merge(ranges: Iterable[Range]) -> tuple[Range, ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _subtract(a: tuple[Range, ...], b: tuple[Range, ...]) -> tuple[Range, ...]:
    out: list[Range] = []
    j = 0
    for lo, hi in a:
        cur = lo
        while j < len(b) and b[j][1] < cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] <= hi:
            blo, bhi = b[k]
            if blo > cur:
                out.append((cur, blo - 1))
            cur = max(cur, bhi + 1)
            if cur > hi:
                break
            k += 1
        if cur <= hi:
            out.append((cur, hi))
    return tuple(out)


def _intersect(a: tuple[Range, ...], b: tuple[Range, ...]) -> tuple[Range, ...]:
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


# Prefix objects built from (address, length), kept for reuse: reconciles rebuild the same
# covers over and over, and constructing an ipaddress network costs microseconds while the
# objects are immutable. Cleared when it outgrows _NETWORKS_MAX.
_NETWORKS_MAX = 1 << 15
_networks: dict[tuple[int, int, int], IPNetwork] = {}


def _network(version: int, lo: int, plen: int) -> IPNetwork:
    key = (version, lo, plen)
    net = _networks.get(key)
    if net is None:
        net = (IPv4Network if version == 4 else IPv6Network)((lo, plen))
        if len(_networks) >= _NETWORKS_MAX:
            _networks.clear()
        _networks[key] = net
    return net


def canonical_network(net: IPNetwork) -> IPNetwork:
    """The shared object equal to ``net`` (the one :func:`range_to_prefixes` returns for it).

    Lists of shared objects compare by identity, without ipaddress' Python-level ``__eq__``.
    """
    if net.version == 6 and net.network_address.scope_id:  # type: ignore[union-attr]
        return net  # not equal to the unscoped prefix with the same bits
    key = (net.version, int(net.network_address), net.prefixlen)
    cached = _networks.get(key)
    if cached is None:
        if len(_networks) >= _NETWORKS_MAX:
            _networks.clear()
        _networks[key] = cached = net
    return cached


def range_to_prefixes(lo: int, hi: int, version: int) -> Iterator[IPNetwork]:
    """The minimal list of prefixes covering exactly ``[lo, hi]`` (ascending)."""
    bits = _BITS[version]
    while lo <= hi:
        # the largest aligned block starting at lo ...
        size = (lo & -lo) if lo else 1 << bits
        # ... that does not run past hi
        while size > hi - lo + 1:
            size >>= 1
        yield _network(version, lo, bits - size.bit_length() + 1)
        lo += size


def _as_network(item: IPNetwork | IPAddress | str) -> IPNetwork:
    if isinstance(item, IPv4Network | IPv6Network):
        return item
    if isinstance(item, IPv4Address | IPv6Address):
        return ipaddress.ip_network(item)
    return ipaddress.ip_network(item, strict=False)


def _range_of(net: IPNetwork) -> Range:
    lo = int(net.network_address)  # host bits are zero: the last address is lo | hostmask
    return lo, lo | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


class IPSet:
    """An immutable set of IPv4 and IPv6 addresses."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, items: Iterable[IPNetwork | IPAddress | str] = ()) -> None:
        v4: list[Range] = []
        v6: list[Range] = []
        for item in items:
            if isinstance(item, IPv4Address | IPv6Address):  # a single address: no network object needed
                value = int(item)
                (v4 if item.version == 4 else v6).append((value, value))
                continue
            net = _as_network(item)
            (v4 if net.version == 4 else v6).append(_range_of(net))
        self._v4 = _merge(v4)
        self._v6 = _merge(v6)

    @classmethod
    def from_ranges(cls, v4: Iterable[Range] = (), v6: Iterable[Range] = ()) -> IPSet:
        """The set of these inclusive integer ranges per family (any order; overlaps are merged)."""
        return cls._from_ranges(_merge(v4), _merge(v6))

    @classmethod
    def _from_ranges(cls, v4: tuple[Range, ...], v6: tuple[Range, ...]) -> IPSet:
        obj = cls.__new__(cls)
        obj._v4 = v4
        obj._v6 = v6
        return obj

    def ranges(self, version: int) -> tuple[Range, ...]:
        return self._v4 if version == 4 else self._v6

    def union(self, other: IPSet) -> IPSet:
        return IPSet._from_ranges(_merge(self._v4 + other._v4), _merge(self._v6 + other._v6))

    def difference(self, other: IPSet) -> IPSet:
        return IPSet._from_ranges(_subtract(self._v4, other._v4), _subtract(self._v6, other._v6))

    def intersection(self, other: IPSet) -> IPSet:
        return IPSet._from_ranges(_intersect(self._v4, other._v4), _intersect(self._v6, other._v6))

    __or__ = union
    __sub__ = difference
    __and__ = intersection

    def overlaps(self, other: IPSet) -> bool:
        return bool(self.intersection(other))

    def __contains__(self, item: IPAddress | str) -> bool:
        addr = ipaddress.ip_address(item) if isinstance(item, str) else item
        value = int(addr)
        return any(lo <= value <= hi for lo, hi in self.ranges(addr.version))

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IPSet):
            return NotImplemented
        return self._v4 == other._v4 and self._v6 == other._v6

    def __hash__(self) -> int:
        return hash((self._v4, self._v6))

    def num_addresses(self, version: int) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges(version))

    def prefixes(self, version: int | None = None) -> list[IPNetwork]:
        """The minimal prefix cover: IPv4 first, each family ascending."""
        out: list[IPNetwork] = []
        for ver in (4, 6) if version is None else (version,):
            for lo, hi in self.ranges(ver):
                out.extend(range_to_prefixes(lo, hi, ver))
        return out

    def __repr__(self) -> str:
        return f"IPSet([{', '.join(str(p) for p in self.prefixes())}])"


def collapse(nets: Iterable[IPNetwork | IPAddress | str]) -> list[IPNetwork]:
    """Merge overlapping/adjacent prefixes into the minimal cover of their union."""
    return IPSet(nets).prefixes()
