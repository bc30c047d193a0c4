"""IPSet algebra against brute force, and minimal prefix covers against the stdlib."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from hypothesis import given
from hypothesis import strategies as st

from kubespan.ipset import IPSet, collapse, range_to_prefixes

BASE = int(ip_address("10.0.0.0"))


@st.composite
def small_v4_nets(draw):
    """Prefixes inside 10.0.0.0/24 so that brute force over 256 addresses is cheap."""
    plen = draw(st.integers(24, 32))
    offset = draw(st.integers(0, 255)) >> (32 - plen) << (32 - plen)
    return IPv4Network((BASE + offset, plen))


def brute(nets):
    return {int(a) for n in nets for a in n}


def members(s: IPSet):
    return {int(a) for p in s.prefixes() for a in p}


nets_lists = st.lists(small_v4_nets(), max_size=8)


@given(nets_lists, nets_lists)
def test_algebra_matches_brute_force(a, b):
    sa, sb = IPSet(a), IPSet(b)
    assert members(sa | sb) == brute(a) | brute(b)
    assert members(sa - sb) == brute(a) - brute(b)
    assert members(sa & sb) == brute(a) & brute(b)
    assert sa.overlaps(sb) == bool(brute(a) & brute(b))
    assert sa.num_addresses(4) == len(brute(a))


@given(nets_lists)
def test_prefix_cover_is_exact_disjoint_and_minimal(a):
    cover = IPSet(a).prefixes()
    # exact
    assert brute(cover) == brute(a)
    # disjoint
    assert sum(n.num_addresses for n in cover) == len(brute(a))
    # minimal: the stdlib's collapse of the same addresses gives the same count
    assert len(cover) == len(list(ipaddress.collapse_addresses(a)))
    # sorted ascending
    assert cover == sorted(cover)


@given(nets_lists)
def test_contains_matches_membership(a):
    s = IPSet(a)
    for off in (0, 1, 127, 128, 200, 255):
        addr = ip_address(BASE + off)
        assert (addr in s) == (BASE + off in brute(a))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_range_to_prefixes_matches_stdlib(x, y):
    lo, hi = min(x, y), max(x, y)
    ours = list(range_to_prefixes(lo, hi, 4))
    theirs = list(ipaddress.summarize_address_range(ip_address(lo), ip_address(hi)))
    assert ours == theirs


def test_full_spaces():
    assert IPSet(["0.0.0.0/0"]).prefixes() == [ip_network("0.0.0.0/0")]
    assert IPSet(["::/0"]).prefixes() == [ip_network("::/0")]
    assert IPSet(["0.0.0.0/1", "128.0.0.0/1"]).prefixes() == [ip_network("0.0.0.0/0")]
    assert list(range_to_prefixes(2**128 - 1, 2**128 - 1, 6)) == [
        ip_network("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128")
    ]


def test_adjacent_prefixes_merge_and_families_stay_apart():
    s = IPSet(["10.0.0.0/25", "10.0.0.128/25", "fd00::/64", ip_address("192.168.1.1")])
    assert s.prefixes() == [
        ip_network("10.0.0.0/24"),
        ip_network("192.168.1.1/32"),
        ip_network("fd00::/64"),
    ]
    assert s.prefixes(6) == [ip_network("fd00::/64")]
    assert s.prefixes(4)[0].version == 4


def test_difference_carves_holes():
    s = IPSet(["10.0.0.0/24"]) - IPSet(["10.0.0.5"])
    assert ip_address("10.0.0.5") not in s
    assert ip_address("10.0.0.4") in s
    assert s.prefixes() == [
        ip_network("10.0.0.0/30"),
        ip_network("10.0.0.4/32"),
        ip_network("10.0.0.6/31"),
        ip_network("10.0.0.8/29"),
        ip_network("10.0.0.16/28"),
        ip_network("10.0.0.32/27"),
        ip_network("10.0.0.64/26"),
        ip_network("10.0.0.128/25"),
    ]


def test_mapped_ipv4_is_ipv6_member():
    s = IPSet(["::ffff:10.0.0.1"])
    assert ip_address("::ffff:10.0.0.1") in s
    assert ip_address("10.0.0.1") not in s
    assert not s.ranges(4)


def test_host_bits_are_cleared_and_equality_hash():
    assert IPSet(["10.0.0.7/24"]) == IPSet(["10.0.0.0/24"])
    assert hash(IPSet(["10.0.0.0/24"])) == hash(IPSet(["10.0.0.0/25", "10.0.0.128/25"]))
    assert IPSet() != IPSet(["10.0.0.0/32"])
    assert not IPSet()
    assert IPSet(["::1"])


def test_collapse_helper():
    assert collapse(["10.0.0.0/8", "10.1.0.0/16", "fd00::1", "fd00::/127"]) == [
        IPv4Network("10.0.0.0/8"),
        IPv6Network("fd00::/127"),
    ]
    assert "IPSet([10.0.0.0/8])" == repr(IPSet(["10.0.0.0/8"]))


# --- shared prefix objects (performance): equal to what ipaddress builds ---------------------------


@given(st.lists(small_v4_nets(), max_size=6), st.lists(st.integers(0, 255), max_size=4))
def test_addresses_are_single_address_ranges(nets, hosts):
    addrs = [ipaddress.IPv4Address(BASE + h) for h in hosts]
    assert IPSet([*nets, *addrs]) == IPSet([*nets, *(IPv4Network(a) for a in addrs)])


def test_prefixes_are_shared_objects_equal_to_fresh_ones():
    from kubespan.ipset import canonical_network

    first = IPSet(["10.0.0.0/24", "fd00::/64", "192.0.2.1"]).prefixes()
    again = IPSet(["10.0.0.0/25", "10.0.0.128/25", "fd00::/64", "192.0.2.1/32"]).prefixes()
    assert first == again == [ip_network("10.0.0.0/24"), ip_network("192.0.2.1/32"), ip_network("fd00::/64")]
    assert all(a is b for a, b in zip(first, again, strict=True))
    fresh = ip_network("10.0.0.0/24")
    assert canonical_network(fresh) is first[0]
    new = ip_network("198.51.100.0/24")
    assert canonical_network(new) is new and canonical_network(ip_network("198.51.100.0/24")) is new
    scoped = IPv6Network("fe80::%eth0/64")
    assert canonical_network(scoped) is scoped  # not equal to the unscoped prefix: never shared
    assert canonical_network(IPv6Network("fe80::/64")) == IPv6Network("fe80::/64") != scoped


def test_shared_prefix_cache_is_bounded(monkeypatch):
    from kubespan import ipset

    monkeypatch.setattr(ipset, "_NETWORKS_MAX", 4)
    monkeypatch.setattr(ipset, "_networks", {})
    for n in range(20):
        (net,) = range_to_prefixes(BASE + n * 256, BASE + n * 256 + 255, 4)
        assert net == IPv4Network((BASE + n * 256, 24))
        assert len(ipset._networks) <= 4
