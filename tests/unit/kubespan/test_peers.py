"""Peer specs (Talos' AllowedIPs and overlap rules, surfaced conflicts) and the local affiliate."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Address, IPv6Interface, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan.affiliate import (
    AffiliateError,
    EndpointFilter,
    RemoteAffiliate,
    build_local_affiliate,
    everything_but,
    filter_ips,
    is_node_address,
)
from kubespan.endpoints import PeerState
from kubespan.ipset import IPSet
from kubespan.peerspec import ConflictKind, PeerSpecMemo, compute_peer_specs
from kubespan.routed import RoutedIndex, routed_prefixes
from kubespan.wireguard.types import AddrPort, PublicKey
from spanapi.discovery.client import affiliate_pb2


def key(n: int) -> PublicKey:
    return PublicKey(bytes([n]) * 32)


def nets(*items):
    return tuple(ip_network(i, strict=False) for i in items)


def ips(*items):
    return tuple(ip_address(i) for i in items)


MESH = "fd7f:175a:b97c:5602::"


def aff(node_id, k, n, **kw):
    return RemoteAffiliate(
        node_id=node_id,
        nodename=f"node-{node_id}",
        public_key=key(k),
        mesh_address=IPv6Address(f"{MESH}{n:x}"),
        **kw,
    )


# --- from_pb -------------------------------------------------------------------------------------


def test_from_pb_converts_every_field():
    pb = affiliate_pb2.Affiliate(
        node_id="n1",
        nodename="worker-1",
        hostname="worker-1.example",
        addresses=[ip_address("10.0.0.1").packed, ip_address("2001:db8::1").packed],
        kubespan=affiliate_pb2.KubeSpan(
            public_key=key(7).b64,
            address=ip_address(MESH + "1").packed,
            additional_addresses=[affiliate_pb2.IPPrefix(ip=ip_address("10.244.1.0").packed, bits=24)],
            exclude_advertised_addresses=[
                affiliate_pb2.IPPrefix(ip=ip_address("10.244.1.7").packed, bits=32)
            ],
        ),
    )
    eps = [
        affiliate_pb2.Endpoint(ip=ip_address("10.0.0.1").packed, port=51820),
        AddrPort("203.0.113.5", 40000),
        affiliate_pb2.Endpoint(ip=ip_address("10.0.0.1").packed, port=51820),  # duplicate
        affiliate_pb2.Endpoint(ip=b"\x01\x02", port=51820),  # malformed: dropped
        affiliate_pb2.Endpoint(ip=ip_address("10.0.0.9").packed, port=0),  # bad port: dropped
    ]
    r = RemoteAffiliate.from_pb(pb, eps)
    assert r.node_id == "n1" and r.nodename == "worker-1" and r.hostname == "worker-1.example"
    assert r.public_key == key(7)
    assert r.mesh_address == IPv6Address(MESH + "1")
    assert r.addresses == ips("10.0.0.1", "2001:db8::1")
    assert r.additional_prefixes == nets("10.244.1.0/24")
    assert r.excluded_prefixes == nets("10.244.1.7/32")
    assert r.endpoints == (AddrPort("10.0.0.1", 51820), AddrPort("203.0.113.5", 40000))


def test_from_pb_without_kubespan_has_no_key():
    r = RemoteAffiliate.from_pb(affiliate_pb2.Affiliate(node_id="m", nodename="member"))
    assert r.public_key is None and r.mesh_address is None


def test_from_pb_masks_prefix_host_bits():
    pb = affiliate_pb2.Affiliate(
        node_id="n",
        kubespan=affiliate_pb2.KubeSpan(
            additional_addresses=[affiliate_pb2.IPPrefix(ip=ip_address("10.1.2.3").packed, bits=16)]
        ),
    )
    assert RemoteAffiliate.from_pb(pb).additional_prefixes == nets("10.1.0.0/16")


@pytest.mark.parametrize(
    ("pb", "field"),
    [
        (affiliate_pb2.Affiliate(addresses=[b"\x01\x02\x03"]), "addresses[0]"),
        (affiliate_pb2.Affiliate(kubespan=affiliate_pb2.KubeSpan(public_key="short")), "kubespan.public_key"),
        (affiliate_pb2.Affiliate(kubespan=affiliate_pb2.KubeSpan(address=b"\x01" * 4)), "kubespan.address"),
        (affiliate_pb2.Affiliate(kubespan=affiliate_pb2.KubeSpan(address=b"\x01" * 5)), "kubespan.address"),
        (
            affiliate_pb2.Affiliate(
                kubespan=affiliate_pb2.KubeSpan(
                    additional_addresses=[affiliate_pb2.IPPrefix(ip=b"\x0a\x00\x00\x00", bits=33)]
                )
            ),
            "kubespan.additional_addresses[0].bits",
        ),
        (
            affiliate_pb2.Affiliate(
                kubespan=affiliate_pb2.KubeSpan(
                    exclude_advertised_addresses=[affiliate_pb2.IPPrefix(ip=b"", bits=0)]
                )
            ),
            "kubespan.exclude_advertised_addresses[0].ip",
        ),
    ],
)
def test_from_pb_rejects_malformed_fields_by_name(pb, field):
    with pytest.raises(AffiliateError) as info:
        RemoteAffiliate.from_pb(pb)
    assert info.value.field == field


# --- peer specs ----------------------------------------------------------------------------------


def test_allowed_ips_talos_formula():
    a = aff(
        "a",
        1,
        1,
        addresses=ips("10.0.0.1", "192.168.1.10", "2001:db8::1"),
        additional_prefixes=nets("10.244.0.0/24", "10.244.1.0/24"),
        excluded_prefixes=nets("10.244.1.0/25", "192.168.1.10/32"),
        endpoints=(AddrPort("10.0.0.1", 51820),),
    )
    res = compute_peer_specs([a], local_node_id="me")
    (spec,) = res.specs
    assert spec.public_key == key(1)
    assert spec.label == "node-a" and spec.node_id == "a"
    assert spec.endpoints == (AddrPort("10.0.0.1", 51820),)  # copied unchanged
    assert spec.allowed_ips == nets(
        "10.0.0.1/32", "10.244.0.0/24", "10.244.1.128/25", "2001:db8::1/128", MESH + "1/128"
    )
    assert res.conflicts == ()


def test_mesh_address_survives_its_own_exclusion():
    a = aff("a", 1, 1, excluded_prefixes=nets("fd00::/8"), additional_prefixes=nets("fd7f::/16"))
    (spec,) = compute_peer_specs([a], "me").specs
    assert spec.allowed_ips == nets(MESH + "1/128")


def test_skips_self_and_non_kubespan_affiliates():
    me = aff("me", 9, 9)
    member = RemoteAffiliate(node_id="m", nodename="plain-member")
    other = aff("b", 2, 2)
    res = compute_peer_specs([me, member, other], "me")
    assert [s.node_id for s in res.specs] == ["b"]


def test_lower_node_id_keeps_contested_vip_and_conflict_is_surfaced():
    vip = "10.0.0.100"
    high = aff("node-z", 1, 1, addresses=ips("10.0.0.2", vip))
    low = aff("node-a", 2, 2, addresses=ips("10.0.0.1", vip))
    res = compute_peer_specs([high, low], "me")
    by_node = {s.node_id: s for s in res.specs}
    assert ip_network(vip + "/32") in by_node["node-a"].allowed_ips
    assert ip_network(vip + "/32") not in by_node["node-z"].allowed_ips
    assert ip_network("10.0.0.2/32") in by_node["node-z"].allowed_ips
    (conflict,) = res.conflicts
    assert conflict.kind == ConflictKind.ADDRESS_OVERLAP
    assert (conflict.node_id, conflict.other_node_id) == ("node-z", "node-a")
    assert conflict.prefixes == nets(vip + "/32")
    assert "address-overlap: node-z vs node-a (10.0.0.100/32)" == str(conflict)


def test_partial_prefix_overlap_carves_minimal_cover():
    a = aff("a", 1, 1, additional_prefixes=nets("10.0.0.0/25"))
    b = aff("b", 2, 2, additional_prefixes=nets("10.0.0.0/24"))
    res = compute_peer_specs([a, b], "me")
    spec_b = res.by_key()[key(2)]
    assert spec_b.allowed_ips == nets("10.0.0.128/25", MESH + "2/128")
    assert res.conflicts[0].prefixes == nets("10.0.0.0/25")


def test_duplicate_mesh_address_reported_and_loser_loses_it():
    a = aff("a", 1, 5, addresses=ips("10.0.0.1"))
    b = aff("b", 2, 5, addresses=ips("10.0.0.2"))
    res = compute_peer_specs([b, a], "me")
    kinds = {(c.kind, c.node_id, c.other_node_id) for c in res.conflicts}
    assert (ConflictKind.DUPLICATE_MESH_ADDRESS, "b", "a") in kinds
    assert (ConflictKind.ADDRESS_OVERLAP, "b", "a") in kinds
    assert res.by_key()[key(2)].allowed_ips == nets("10.0.0.2/32")


def test_duplicate_public_key_lower_node_id_wins():
    a = aff("a", 1, 1)
    b = aff("b", 1, 2)
    res = compute_peer_specs([b, a], "me")
    assert [s.node_id for s in res.specs] == ["a"]
    assert [(c.kind, c.node_id, c.other_node_id) for c in res.conflicts] == [
        (ConflictKind.DUPLICATE_PUBLIC_KEY, "b", "a")
    ]


def test_own_public_key_and_own_mesh_address_reported():
    mine = IPv6Address(MESH + "99")
    a = aff("a", 9, 1)
    b = RemoteAffiliate(node_id="b", public_key=key(2), mesh_address=mine)
    res = compute_peer_specs([a, b], "me", local_public_key=key(9), local_mesh_address=mine)
    assert [s.node_id for s in res.specs] == ["b"]
    kinds = [(c.kind, c.node_id, c.other_node_id) for c in res.conflicts]
    assert (ConflictKind.LOCAL_PUBLIC_KEY, "a", None) in kinds
    assert (ConflictKind.LOCAL_MESH_ADDRESS, "b", None) in kinds
    assert "local node" in str(res.conflicts[0])


def test_peer_without_mesh_address():
    r = RemoteAffiliate(node_id="x", public_key=key(3), addresses=ips("10.9.9.9"))
    (spec,) = compute_peer_specs([r], "me").specs
    assert spec.mesh_address is None
    assert spec.allowed_ips == nets("10.9.9.9/32")


@st.composite
def affiliate_sets(draw):
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        prefixes = draw(st.lists(st.tuples(st.integers(0, 255), st.integers(28, 32)), max_size=3))
        out.append(
            RemoteAffiliate(
                node_id=draw(st.sampled_from("abcdefgh")) + str(i),
                public_key=key(i + 1),
                additional_prefixes=tuple(
                    IPv4Network((0x0A000000 + (o >> (32 - p) << (32 - p)), p)) for o, p in prefixes
                ),
            )
        )
    return out


@settings(max_examples=60)
@given(affiliate_sets(), st.randoms(use_true_random=False))
def test_overlap_resolution_properties(affs, rnd):
    res = compute_peer_specs(affs, "me")
    sets = {s.node_id: IPSet(s.allowed_ips) for s in res.specs}
    wanted = {a.node_id: IPSet(a.additional_prefixes) for a in affs}
    # pairwise disjoint and each within what the peer asked for
    ids = sorted(sets)
    for i, x in enumerate(ids):
        assert not (sets[x] - wanted[x])
        for y in ids[i + 1 :]:
            assert not sets[x].overlaps(sets[y])
    # nothing is lost overall, and every address goes to the lowest node id that wants it
    union_wanted = IPSet()
    for w in wanted.values():
        union_wanted = union_wanted | w
    union_got = IPSet()
    for s in sets.values():
        union_got = union_got | s
    assert union_got == union_wanted
    for x in ids:
        for y in ids:
            if y < x:
                assert not sets[x].overlaps(wanted[y])
    # a conflict is reported exactly for the peers that lost something
    losers = {c.node_id for c in res.conflicts if c.kind == ConflictKind.ADDRESS_OVERLAP}
    assert losers == {x for x in ids if sets[x] != wanted[x]}
    # input order does not matter
    shuffled = list(affs)
    rnd.shuffle(shuffled)
    assert compute_peer_specs(shuffled, "me") == res


def _variant(a: RemoteAffiliate, draw_ints: list[int]) -> RemoteAffiliate:
    """A changed copy of ``a``: new prefixes, sometimes a new key, mesh address or no key at all."""
    from dataclasses import replace

    kind, octet, plen = draw_ints
    prefixes = (IPv4Network((0x0A000000 + (octet >> (32 - plen) << (32 - plen)), plen)),)
    if kind == 0:
        return replace(a, public_key=None)
    if kind == 1:
        return replace(a, public_key=key(200 + octet % 50))
    if kind == 2:
        return replace(a, mesh_address=IPv6Address(f"{MESH}{octet:x}"), additional_prefixes=prefixes)
    if kind == 3:
        return replace(a, addresses=(ip_address(f"192.0.2.{octet}"),), additional_prefixes=())
    return replace(a, additional_prefixes=prefixes)


#: Rounds of changes to a set of affiliates: (kind for :func:`_variant`, which affiliate, octet, prefix length).
change_steps = st.lists(
    st.lists(
        st.tuples(st.integers(0, 7), st.integers(0, 9), st.integers(0, 255), st.integers(26, 32)),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=80)
@given(affiliate_sets(), change_steps)
def test_specs_updated_in_place_equal_a_full_computation(affs, steps):
    memo = PeerSpecMemo()
    current = list(affs)
    local_key, local_mesh = key(77), IPv6Address(f"{MESH}1")
    assert compute_peer_specs(current, "me", local_key, local_mesh, memo=memo) == compute_peer_specs(
        current, "me", local_key, local_mesh
    )
    for step in steps:
        for kind, which, octet, plen in step:
            i = which % len(current)
            current[i] = _variant(current[i], [kind, octet, plen])
        got = compute_peer_specs(current, "me", local_key, local_mesh, memo=memo)
        assert got == compute_peer_specs(current, "me", local_key, local_mesh)


def test_one_changed_affiliate_without_overlaps_is_updated_in_place():
    from dataclasses import replace

    affs = [aff(f"n{i:03d}", i + 1, i + 16, addresses=ips(f"10.1.{i}.1")) for i in range(100)]
    memo = PeerSpecMemo()
    first = compute_peer_specs(affs, "me", memo=memo)
    affs[42] = replace(affs[42], addresses=ips("10.1.42.1", "172.16.0.9"))
    second = compute_peer_specs(affs, "me", memo=memo)
    assert not memo.keys_changed, "updated in place"
    assert second == compute_peer_specs(affs, "me")
    assert all(a is b for i, (a, b) in enumerate(zip(first.specs, second.specs, strict=True)) if i != 42)
    assert ip_network("172.16.0.9/32") in second.specs[42].allowed_ips
    # taking an address another peer holds is a conflict: computed in full, with the conflict
    affs[43] = replace(affs[43], addresses=ips("10.1.43.1", "172.16.0.9"))
    third = compute_peer_specs(affs, "me", memo=memo)
    assert memo.keys_changed and third == compute_peer_specs(affs, "me")
    assert [c.kind for c in third.conflicts] == [ConflictKind.ADDRESS_OVERLAP]
    # and while n043 is part of a conflict, its changes are computed in full too
    affs[43] = replace(affs[43], addresses=ips("10.1.43.1"))
    assert compute_peer_specs(affs, "me", memo=memo) == compute_peer_specs(affs, "me")
    assert memo.keys_changed


@settings(max_examples=80)
@given(affiliate_sets(), change_steps)
def test_routed_index_updates_equal_a_full_computation(affs, steps):
    subnet = IPv6Interface(f"{MESH}1/64").network
    memo = PeerSpecMemo()
    index = RoutedIndex()
    current = list(affs)
    specs = compute_peer_specs(current, "me", memo=memo).specs
    index.reset(specs, subnet, IPSet(routed_prefixes(specs, subnet)))
    for step in steps:
        for kind, which, octet, plen in step:
            i = which % len(current)
            current[i] = _variant(current[i], [kind, octet, plen])
        specs = compute_peer_specs(current, "me", memo=memo).specs
        want = routed_prefixes(specs, subnet)
        got = index.update(specs, subnet)
        if got is None:
            got = index.reset(specs, subnet, IPSet(want))
        assert got[4] + got[6] == want


def test_routed_index_cuts_and_merges_neighbours():
    subnet = IPv6Interface(f"{MESH}1/64").network
    affs = [aff(f"n{i}", i + 1, i + 16, addresses=ips(f"10.0.0.{i}")) for i in range(8)]
    memo = PeerSpecMemo()
    specs = compute_peer_specs(affs, "me", memo=memo).specs
    index = RoutedIndex()
    assert index.reset(specs, subnet, IPSet(routed_prefixes(specs, subnet)))[4] == [ip_network("10.0.0.0/29")]
    from dataclasses import replace

    affs[3] = replace(affs[3], addresses=ips("10.0.1.3"))  # a hole in the middle, a new range
    specs = compute_peer_specs(affs, "me", memo=memo).specs
    assert not memo.keys_changed
    got = index.update(specs, subnet)
    assert got is not None and got[4] == routed_prefixes(specs, subnet)
    affs[3] = replace(affs[3], addresses=ips("10.0.0.3"))  # back: merged into one /29 again
    specs = compute_peer_specs(affs, "me", memo=memo).specs
    assert index.update(specs, subnet) == {4: [ip_network("10.0.0.0/29")], 6: []}


# --- endpoint filters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], ["10.0.0.1", "192.168.1.1", "2001:db8::1", "203.0.113.1"]),
        (["0.0.0.0/0"], ["10.0.0.1", "192.168.1.1", "203.0.113.1"]),
        (["0.0.0.0/0", "!192.168.0.0/16", "::/0"], ["10.0.0.1", "203.0.113.1", "2001:db8::1"]),
        # order matters: a later positive filter re-adds what an earlier negative removed
        (["!192.168.0.0/16", "0.0.0.0/0"], ["10.0.0.1", "192.168.1.1", "203.0.113.1"]),
        # results follow filter order, then address order
        (["203.0.113.0/24", "10.0.0.0/8"], ["203.0.113.1", "10.0.0.1"]),
        # a plain address is a /32 or /128
        (["2001:db8::1"], ["2001:db8::1"]),
        # only negatives select nothing, as in Talos
        (["!10.0.0.0/8", "!2001:db8::/32"], []),
    ],
)
def test_filter_ips(filters, expected):
    addrs = list(ips("10.0.0.1", "192.168.1.1", "2001:db8::1", "203.0.113.1"))
    assert filter_ips(addrs, filters) == list(ips(*expected))


def test_kubespan_run_reads_only_negated_filters_as_everything_but():
    addrs = list(ips("10.0.0.1", "192.168.1.1", "2001:db8::1", "203.0.113.1"))
    picked = filter_ips(addrs, everything_but(["!10.0.0.0/8", "!2001:db8::/32"]))
    assert picked == list(ips("192.168.1.1", "203.0.113.1"))
    assert everything_but(["10.0.0.0/8", "!10.1.0.0/16"]) == ("10.0.0.0/8", "!10.1.0.0/16")
    assert everything_but([]) == ()


def test_endpoint_filter_parse_errors_name_the_field():
    with pytest.raises(ValueError, match="endpoint_filters: 'nope'"):
        EndpointFilter.parse("nope")
    assert str(EndpointFilter.parse(" !10.0.0.0/8 ")) == "!10.0.0.0/8"
    assert EndpointFilter.parse("10.1.2.3/8").network == ip_network("10.0.0.0/8")


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        ("10.0.0.1", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("169.254.1.1", False),
        ("fe80::1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        (MESH + "1", False),  # our mesh subnet
        ("fd00:0:0:3::1", False),  # SideroLink-purpose ULA (byte 7 = 0x03)
        ("fd00:0:0:1::1", True),  # bootstrap-purpose ULA is an ordinary address
        ("2001:db8::1", True),
    ],
)
def test_is_node_address(addr, ok):
    assert is_node_address(ip_address(addr), ip_network(MESH + "/64")) is ok


# --- local affiliate -----------------------------------------------------------------------------


def local(**kw):
    base = dict(
        node_id="me",
        nodename="cp-1",
        hostname="cp-1.example",
        public_key=key(1),
        mesh_address=IPv6Interface(MESH + "1/64"),
        node_addresses=[
            "10.0.0.5/24",
            "127.0.0.1/8",
            "fe80::1/64",
            MESH + "1/64",
            "2001:db8::5/64",
            "10.244.0.1/24",
            "10.0.0.5/24",
        ],
        listen_port=51820,
        exclude_addresses=["10.244.0.0/16"],
    )
    base.update(kw)
    return build_local_affiliate(**base)


def test_local_addresses_drop_loopback_linklocal_mesh_and_excluded():
    la = local()
    assert la.addresses == ips("10.0.0.5", "2001:db8::5")
    assert la.mesh_address == IPv6Address(MESH + "1")


def test_local_endpoints_order_public_ip_and_extras():
    la = local(
        public_ip=ip_address("203.0.113.9"),
        extra_endpoints=["198.51.100.1:4000", AddrPort("10.0.0.5", 51820), "198.51.100.1:4000"],
    )
    assert [str(e) for e in la.endpoints] == [
        "10.0.0.5:51820",
        "[2001:db8::5]:51820",
        "203.0.113.9:51820",
        "198.51.100.1:4000",
    ]


def test_public_ip_not_duplicated_and_not_loopback():
    assert [str(e) for e in local(public_ip=ip_address("10.0.0.5")).endpoints] == [
        "10.0.0.5:51820",
        "[2001:db8::5]:51820",
    ]
    assert len(local(public_ip=ip_address("127.0.0.1")).endpoints) == 2


def test_filters_apply_to_addresses_and_public_ip_but_not_extras():
    la = local(
        public_ip=ip_address("203.0.113.9"),
        listen_port=51999,
        endpoint_filters=["0.0.0.0/0", "!203.0.113.0/24"],
        extra_endpoints=["203.0.113.50:1"],
    )
    assert [str(e) for e in la.endpoints] == ["10.0.0.5:51999", "203.0.113.50:1"]
    # addresses themselves are not filtered
    assert la.addresses == ips("10.0.0.5", "2001:db8::5")


def test_local_affiliate_pb_round_trips_through_remote_conversion():
    la = local(
        advertised=["10.244.0.0/24", "10.244.0.0/24"],
        excluded=["10.244.0.128/25"],
        machine_type="controlplane",
        operating_system="kubespan-py",
    )
    pb = la.to_pb()
    assert pb.machine_type == "controlplane"
    back = RemoteAffiliate.from_pb(
        affiliate_pb2.Affiliate.FromString(pb.SerializeToString()), la.endpoints_pb()
    )
    assert back.node_id == la.node_id and back.nodename == la.nodename and back.hostname == la.hostname
    assert back.public_key == la.public_key
    assert back.mesh_address == la.mesh_address
    assert back.addresses == la.addresses
    assert back.additional_prefixes == nets("10.244.0.0/24")
    assert back.excluded_prefixes == nets("10.244.0.128/25")
    assert back.endpoints == la.endpoints


def test_mesh_address_as_plain_address_uses_its_64():
    la = local(mesh_address=IPv6Address(MESH + "1"), node_addresses=[MESH + "2", "10.0.0.5"])
    assert la.addresses == ips("10.0.0.5")


def test_bad_listen_port():
    with pytest.raises(ValueError, match="listen_port"):
        local(listen_port=0)


# --- routed prefixes -----------------------------------------------------------------------------

MESH_NET = ip_network(MESH + "/64")


def _specs():
    return compute_peer_specs(
        [
            aff("a", 1, 1, addresses=ips("10.0.0.1", "10.0.0.2"), additional_prefixes=nets("10.244.1.0/24")),
            aff("b", 2, 2, addresses=ips("10.0.0.3", "2001:db8::3"), additional_prefixes=nets("fd7f::/16")),
            aff("c", 3, 3, addresses=ips("192.168.5.5")),
        ],
        "me",
    ).specs


def test_routed_prefixes_union_without_mesh_subnet():
    got = routed_prefixes(_specs(), MESH_NET)
    assert IPSet(got) == IPSet(
        ["10.0.0.1/32", "10.0.0.2/31", "10.244.1.0/24", "192.168.5.5/32", "2001:db8::3/128", "fd7f::/16"]
    ) - IPSet([MESH_NET])
    assert not IPSet(got).overlaps(IPSet([MESH_NET]))  # mesh /128s and the /64 hole
    assert got == IPSet(got).prefixes()  # minimal cover, IPv4 first
    assert got[0].version == 4


def test_routed_prefixes_fail_closed_by_default():
    states = {key(3): PeerState.DOWN}
    assert routed_prefixes(_specs(), MESH_NET, states=states) == routed_prefixes(_specs(), MESH_NET)


@pytest.mark.parametrize(
    ("state", "bypass", "routed"),
    [
        (PeerState.UP, False, True),
        (PeerState.DOWN, False, True),  # fail closed: dropped rather than sent in the clear
        (PeerState.UNKNOWN, False, True),
        (None, False, True),  # no state known (not in the map)
        (PeerState.UP, True, True),  # allowDownPeerBypass: as Talos, only peers that are up are routed
        (PeerState.DOWN, True, False),
        (PeerState.UNKNOWN, True, False),  # not connected yet: bypassed too, as Talos
        (None, True, False),
    ],
)
def test_routed_prefixes_by_peer_state_and_bypass(
    state: PeerState | None, bypass: bool, routed: bool
) -> None:
    states = {key(1): PeerState.UP, key(2): PeerState.UP}  # peer 3 owns 192.168.5.5
    if state is not None:
        states[key(3)] = state
    got = IPSet(routed_prefixes(_specs(), MESH_NET, states=states, allow_down_peer_bypass=bypass))
    assert (ip_address("192.168.5.5") in got) is routed
    for other in ("10.0.0.1", "10.244.1.9", "10.0.0.3", "2001:db8::3"):  # peers 1 and 2 are up: routed
        assert ip_address(other) in got


def test_routed_prefixes_bypass_without_states_routes_nothing() -> None:
    assert routed_prefixes(_specs(), MESH_NET, states=None, allow_down_peer_bypass=True) == []


def test_routed_prefixes_without_mesh_subnet_keeps_everything():
    got = IPSet(routed_prefixes(_specs(), None))
    assert ip_address(MESH + "1") in got


# --- the O(n log n) overlap resolution and the memo give Talos' quadratic result ----------------


def _reference_specs(affiliates, local_node_id, local_public_key=None, local_mesh_address=None):
    """The original quadratic algorithm (every peer against every earlier one), kept as the oracle."""
    from kubespan.peerspec import Conflict, PeerSpec, PeerSpecs

    specs, conflicts, claimed, key_owner, mesh_owner = [], [], [], {}, {}
    for a in sorted(affiliates, key=lambda a: a.node_id):
        if a.node_id == local_node_id or a.public_key is None:
            continue
        if local_public_key is not None and a.public_key == local_public_key:
            conflicts.append(Conflict(ConflictKind.LOCAL_PUBLIC_KEY, a.node_id, None))
            continue
        if a.public_key in key_owner:
            conflicts.append(Conflict(ConflictKind.DUPLICATE_PUBLIC_KEY, a.node_id, key_owner[a.public_key]))
            continue
        key_owner[a.public_key] = a.node_id
        wanted = (IPSet(a.additional_prefixes) | IPSet(a.addresses)) - IPSet(a.excluded_prefixes)
        if a.mesh_address is not None:
            wanted = wanted | IPSet([a.mesh_address])
            mesh_net = (ip_network(a.mesh_address),)
            if local_mesh_address is not None and a.mesh_address == local_mesh_address:
                conflicts.append(Conflict(ConflictKind.LOCAL_MESH_ADDRESS, a.node_id, None, mesh_net))
            if a.mesh_address in mesh_owner:
                conflicts.append(
                    Conflict(
                        ConflictKind.DUPLICATE_MESH_ADDRESS, a.node_id, mesh_owner[a.mesh_address], mesh_net
                    )
                )
            else:
                mesh_owner[a.mesh_address] = a.node_id
        for other_id, other_set in claimed:
            overlap = wanted & other_set
            if overlap:
                conflicts.append(
                    Conflict(ConflictKind.ADDRESS_OVERLAP, a.node_id, other_id, tuple(overlap.prefixes()))
                )
                wanted = wanted - other_set
        claimed.append((a.node_id, wanted))
        specs.append(
            PeerSpec(
                a.public_key, a.node_id, a.nodename, a.mesh_address, tuple(wanted.prefixes()), a.endpoints
            )
        )
    return PeerSpecs(tuple(specs), tuple(conflicts))


_v4_pool = [
    ip_network(n) for n in ("10.0.0.0/30", "10.0.0.0/31", "10.0.0.2/32", "10.0.0.4/30", "10.0.0.0/28")
]
_v6_pool = [ip_network(n) for n in ("fd00::/126", "fd00::2/127", "fd00::/64", "2001:db8::/127")]


@st.composite
def messy_affiliates(draw):
    out = []
    for i in range(draw(st.integers(0, 12))):
        out.append(
            RemoteAffiliate(
                node_id=f"n{draw(st.integers(0, 30)):02d}-{i}",
                nodename=f"x{i}",
                public_key=key(draw(st.integers(1, 10))) if draw(st.integers(0, 9)) else None,
                mesh_address=draw(
                    st.none() | st.sampled_from([IPv6Address(f"{MESH}{n}") for n in (1, 2, 3)])
                ),
                addresses=tuple(
                    draw(st.lists(st.sampled_from([*ips("10.0.0.1", "10.0.0.5", "fd00::1")]), max_size=3))
                ),
                additional_prefixes=tuple(draw(st.lists(st.sampled_from(_v4_pool + _v6_pool), max_size=3))),
                excluded_prefixes=tuple(
                    draw(st.lists(st.sampled_from(_v4_pool[:2] + _v6_pool[:1]), max_size=1))
                ),
            )
        )
    return out


@settings(max_examples=50, deadline=None)
@given(messy_affiliates(), messy_affiliates(), st.booleans())
def test_compute_peer_specs_matches_reference_with_and_without_memo(first, second, local):
    from kubespan.peerspec import PeerSpecMemo

    lk, lm = (key(3), IPv6Address(f"{MESH}2")) if local else (None, None)
    want = _reference_specs(first, "n05-0", lk, lm)
    memo = PeerSpecMemo()
    assert compute_peer_specs(first, "n05-0", lk, lm) == want
    assert compute_peer_specs(first, "n05-0", lk, lm, memo=memo) == want
    assert compute_peer_specs(first, "n05-0", lk, lm, memo=memo) == want  # all from the memo
    # some affiliates kept (same objects), others replaced or new: still the reference result
    mixed = first[::2] + second
    assert compute_peer_specs(mixed, "n05-0", lk, lm, memo=memo) == _reference_specs(mixed, "n05-0", lk, lm)


def test_memo_reuses_unchanged_specs_and_forgets_gone_affiliates():
    from kubespan.peerspec import PeerSpecMemo

    a = aff("a", 1, 1, addresses=ips("10.0.0.1"))
    b = aff("b", 2, 2, addresses=ips("10.0.0.2"))
    memo = PeerSpecMemo()
    first = compute_peer_specs([a, b], "me", memo=memo)
    b2 = aff("b", 2, 2, addresses=ips("10.0.0.2", "10.0.0.3"))
    second = compute_peer_specs([a, b2], "me", memo=memo)
    assert second.specs[0] is first.specs[0]  # a: the same object, not recomputed
    assert second.specs[1].allowed_ips == nets("10.0.0.2/31", f"{MESH}2/128")
    compute_peer_specs([b2], "me", memo=memo)
    assert set(memo.entries) == {"b"}
    # a winner that appears later takes the address away from a memoized spec
    c = aff("0c", 3, 3, addresses=ips("10.0.0.2"))
    third = compute_peer_specs([c, b2], "me", memo=memo)
    assert third.specs[1].allowed_ips == nets("10.0.0.3/32", f"{MESH}2/128")


def test_local_endpoints_with_a_stun_mapping():
    # after our addresses (the global IPv6 one among them), before discovery's guess for another IP
    la = local(public_ip=ip_address("203.0.113.9"), mapped_endpoint=AddrPort("198.51.100.7", 40000))
    assert [str(e) for e in la.endpoints] == [
        "10.0.0.5:51820",
        "[2001:db8::5]:51820",
        "198.51.100.7:40000",
        "203.0.113.9:51820",
    ]
    # the same IP as discovery saw: the measured port replaces the guessed one
    la = local(public_ip=ip_address("203.0.113.9"), mapped_endpoint=AddrPort("203.0.113.9", 61000))
    assert [str(e) for e in la.endpoints][2:] == ["203.0.113.9:61000"]
    # endpoint filters apply to it like to the public IP
    la = local(mapped_endpoint=AddrPort("198.51.100.7", 40000), endpoint_filters=["!198.51.100.0/24"])
    assert AddrPort("198.51.100.7", 40000) not in la.endpoints
