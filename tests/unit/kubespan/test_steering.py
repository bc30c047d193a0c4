"""Steering "routes" without root: the config rule, the plans (prefix routes, inverted rule, the
WireGuard port's exemption), the event filter, the clamp-only ruleset, RouteSteering over the fakes
and the engine wired with it."""

from __future__ import annotations

import socket
from ipaddress import ip_network
from typing import Any

import pytest

from kubespan import constants as C
from kubespan.dataplane import links as L
from kubespan.dataplane import ruleset as R
from kubespan.dataplane.fake import FakeLinkManager, FakeNftManager
from kubespan.dataplane.links import LiveRoute, LiveRule
from kubespan.dataplane.ruleset import SET_IPV4, SET_IPV6, RulesetParams, targets
from kubespan.dataplane.steering import RouteSteering

AF4, AF6 = socket.AF_INET, socket.AF_INET6
ROUTES = C.MeshConfig(steering=C.STEERING_ROUTES)


class Msg(dict):
    """A pyroute2 message stand-in: ``get`` looks at attributes, then fields."""

    def __init__(self, attrs: dict[str, Any] | None = None, **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = dict(attrs or {})

    def get(self, key: Any, default: Any = None) -> Any:
        return self.attrs[key] if key in self.attrs else super().get(key, default)


def _route(prefix: str, **kw: Any) -> LiveRoute:
    net = ip_network(prefix)
    base: dict[str, Any] = dict(
        family=AF4 if net.version == 4 else AF6,
        dst_len=net.prefixlen,
        table=180,
        oif=5,
        metric=1,
        mtu=1420,
        dst=str(net.network_address),
    )
    base.update(kw)
    return LiveRoute(**base)


def test_steering_is_checked_with_the_other_mesh_fields() -> None:
    assert C.MeshConfig().steering == "marks"  # Talos's layout by default
    with pytest.raises(C.ConfigError) as e:
        C.MeshConfig(steering="tunnels")
    assert e.value.field == "steering" and "marks, routes" in str(e.value)
    with pytest.raises(C.ConfigError) as e:
        C.MeshConfig(steering="routes", rule_priority=1)
    assert e.value.field == "rule_priority" and "exemption" in str(e.value)
    assert C.MeshConfig(steering="marks", rule_priority=1).rule_priority == 1


def test_plan_prefix_routes_keeps_exact_ones_and_leaves_others_alone() -> None:
    spec = dict(family=AF4, table=180, oif=5, mtu=1420, metric=1)
    want = [ip_network("10.1.0.0/24"), ip_network("10.2.0.7/32")]
    good = _route("10.1.0.0/24")
    wrong_mtu = _route("10.2.0.7/32", mtu=1500)
    gone_peer = _route("10.3.0.0/16")
    others = [
        _route("10.4.0.0/24", oif=9),  # someone else's, via another link
        _route("fd00::/64"),  # the other family
        _route("10.5.0.0/24", table=254),  # another table
    ]
    default = _route("0.0.0.0/0", dst=None, oif=7)  # the marking layout's: it would take everything
    remove, add = L.plan_prefix_routes([good, wrong_mtu, gone_peer, default, *others], want, **spec)
    assert remove == [wrong_mtu, gone_peer, default]
    assert add == [ip_network("10.2.0.7/32")]
    assert L.plan_prefix_routes([good, _route("10.2.0.7/32")], want, **spec) == ([], [])
    # a duplicate of a wanted route goes
    assert L.plan_prefix_routes([good, good], want[:1], **spec) == ([good], [])


def test_route_delete_args_name_exactly_that_route() -> None:
    assert _route("10.1.0.0/24").delete_args() == dict(
        family=AF4, dst="10.1.0.0/24", table=180, priority=1, oif=5
    )
    default = _route("::/0", dst=None, oif=None, gateway="fe80::1", metric=7)
    assert default.delete_args() == dict(family=AF6, dst="::/0", table=180, priority=7, gateway="fe80::1")
    # the default route check is the prefix route check plus "default"
    assert L.route_ok(_route("0.0.0.0/0", dst=None), oif=5, mtu=1420, metric=1)
    assert not L.route_ok(_route("10.1.0.0/24"), oif=5, mtu=1420, metric=1)
    assert not L.route_ok(_route("0.0.0.0/0", dst=None, mtu=1500), oif=5, mtu=1420, metric=1)


def test_diff_prefixes() -> None:
    known = {4: [ip_network("10.1.0.0/24"), ip_network("10.2.0.0/24")], 6: [ip_network("fd00::/64")]}
    desired = {4: [ip_network("10.2.0.0/24"), ip_network("10.3.0.0/24")], 6: []}
    assert L.diff_prefixes(known, desired) == (
        [ip_network("10.1.0.0/24"), ip_network("fd00::/64")],
        [ip_network("10.3.0.0/24")],
    )
    assert L.diff_prefixes(known, known) == ([], [])


def test_inverted_rule_and_exemption_plans() -> None:
    spec = dict(family=AF4, priority=32500, table=180, fwmark=0x20, fwmask=0x60)
    inverted = LiveRule(AF4, 32500, 180, 0x20, 0x60, flags=L.FIB_RULE_INVERT)
    plain = LiveRule(AF4, 32500, 180, 0x40, 0x60)
    assert L.plan_rules([inverted], **spec, invert=True) == ([], False)
    assert L.plan_rules([plain], **spec, invert=True) == ([plain], True)  # the marks rule goes
    assert L.plan_rules([inverted], **{**spec, "fwmark": 0x40}) == ([inverted], True)  # and back
    assert inverted.describe() == "inet priority 32500 not fwmark 0x20/0x60 lookup 180"
    assert inverted.delete_args()["flags"] == L.FIB_RULE_INVERT

    exempt = L.parse_rule(
        Msg(
            {
                "FRA_PRIORITY": 32499,
                "FRA_TABLE": 254,
                "FRA_IP_PROTO": 17,
                "FRA_SPORT_RANGE": "51820:51820",
            },
            family=AF4,
            action=1,
            flags=0,
        )
    )
    assert exempt.describe() == "inet priority 32499 ipproto 17 sport 51820:51820 lookup 254"
    assert exempt.delete_args() == dict(
        family=AF4, priority=32499, table=254, ip_proto=17, sport_range="51820:51820"
    )
    assert L.plan_exemption([exempt], family=AF4, priority=32499, port=51820) == ([], False)
    assert L.plan_exemption([], family=AF4, priority=32499, port=51820) == ([], True)
    assert L.plan_exemption([exempt], family=AF4, priority=32499, port=51999) == ([exempt], True)
    assert L.plan_exemption([exempt], family=AF4, priority=32499, port=None) == ([exempt], False)
    # someone's rule at that priority that is not a UDP lookup of main is never ours
    theirs = LiveRule(AF4, 32499, 254, None, None)
    tcp = LiveRule(AF4, 32499, 254, None, None, ip_proto=6, sport="51820:51820")
    assert L.plan_exemption([theirs, tcp], family=AF4, priority=32499, port=None) == ([], False)
    assert L._port_range({"start": 1, "end": 2}) == "1:2" and L._port_range(None) is None


def test_strict_rp_filter_is_the_larger_of_all_and_the_interface() -> None:
    text = "/proc/sys/net/ipv4/conf/all/rp_filter:0\n/proc/sys/net/ipv4/conf/eth0/rp_filter:1\nbad line"
    assert L.parse_rp_filter(text) == {"all": 0, "eth0": 1}
    assert L.strict_rp_filter({"all": 0, "eth0": 1})
    assert not L.strict_rp_filter({"all": 2, "eth0": 1})  # max(2, 1): loose
    assert L.strict_rp_filter({"all": 1, "eth0": 0})
    assert not L.strict_rp_filter({"all": 1, "default": 1, "lo": 1})  # no interface of the underlay
    assert not L.strict_rp_filter({"all": 0, "kubespan": 1}, ignore=("kubespan",))
    assert not L.strict_rp_filter({"all": 2, "eth0": 2}) and not L.strict_rp_filter({})


def test_events_of_our_own_prefix_routes_are_quiet() -> None:
    kw = dict(ifname="kubespan", ifindex=5, table=180, priority=32500, prefix_routes=True)
    add = Msg({"RTA_TABLE": 180, "RTA_OIF": 5, "RTA_DST": "10.1.0.0"}, dst_len=24)
    assert L.classify_event("RTM_NEWROUTE", add, **kw) is None
    assert L.classify_event("RTM_DELROUTE", add, **kw).kind == "route"
    default = Msg({"RTA_TABLE": 180, "RTA_OIF": 5}, dst_len=0)
    assert L.classify_event("RTM_NEWROUTE", default, **kw).kind == "route"  # a default is never ours
    assert L.classify_event("RTM_NEWROUTE", add, **{**kw, "prefix_routes": False}).kind == "route"
    exempt = Msg({"FRA_PRIORITY": 32499, "FRA_TABLE": 254})
    assert L.classify_event("RTM_DELRULE", exempt, **kw).kind == "rule"
    assert L.classify_event("RTM_DELRULE", exempt, **{**kw, "prefix_routes": False}) is None
    assert L.classify_event("RTM_NEWNETCONF", Msg(), **kw).kind == "netconf"  # rp_filter may have changed
    assert L.classify_event("RTM_NEWNETCONF", Msg(), **{**kw, "prefix_routes": False}) is None


def test_link_manager_from_config_takes_the_wireguard_mark() -> None:
    lm = L.LinkManager.from_config(ROUTES)
    assert (lm.fwmark, lm.by_routes, lm.exemption_priority, lm.listen_port) == (0x20, True, 32499, 51820)
    assert "steering=routes" in repr(lm)
    marks = L.LinkManager.from_config(C.MeshConfig())
    assert (marks.fwmark, marks.by_routes) == (0x40, False)
    with pytest.raises(C.ConfigError, match="fwmark_wireguard"):
        L.LinkManager(fwmark=0x100, steering="routes")  # outside the mask, named as the WireGuard mark


def test_ruleset_for_routes_has_only_the_forward_clamp() -> None:
    routes = R.chain_specs(RulesetParams.from_config(ROUTES))
    assert [c.name for c in routes] == [R.CHAIN_FORWARD]
    assert R.chain_specs(RulesetParams(steering="routes", clamp_forwarded_mss=False)) == []
    marks = [c.name for c in R.chain_specs(RulesetParams())]
    assert R.CHAIN_OUTPUT in marks and R.CHAIN_PREROUTING in marks
    # a table rendered for the other layout is replaced, not patched
    live = R.parse_table(R.render_replace(RulesetParams(), {}), C.NFT_TABLE)
    assert R.structure_mismatch(live, RulesetParams(steering="routes")) is not None


async def test_route_steering_turns_sets_into_routes() -> None:
    links, nft = FakeLinkManager(ROUTES), FakeNftManager.from_config(ROUTES)
    steer = RouteSteering(links, nft)
    await links.reconcile([])
    want = targets(["10.1.0.0/24", "10.1.0.0/25", "fd00:1::/64"])  # normalized on the way
    assert await steer.reconcile(want) == [
        "nft table inet kubespan: created",
        "routes in table 180 dev kubespan: add 2, delete 0",
    ]
    assert links.prefix_routes == {4: {ip_network("10.1.0.0/24")}, 6: {ip_network("fd00:1::/64")}}
    assert nft.sets == {SET_IPV4: set(), SET_IPV6: set()}  # the table's sets stay empty
    assert await steer.reconcile(want, trust_cache=True) == []
    assert await steer.reconcile(targets(["fd00:1::/64"]), trust_cache=True) == [
        "routes in table 180 dev kubespan: add 0, delete 1"
    ]
    assert links.routes == set() and links.healthy  # no default routes with "routes"
    await steer.teardown()
    assert nft.sets is None


async def test_build_mesh_wires_route_steering(tmp_path: Any) -> None:
    from kubespan.engine import MeshOptions
    from kubespan.testing import FakeDiscovery
    from kubespan.wireguard.fake import FakeWireGuard
    from kubespan.wiring import MeshDeps, build_mesh

    opts = MeshOptions(
        cluster_id="c", cluster_secret=b"\x01" * 32, state_dir=tmp_path, nodename="n", config=ROUTES
    )
    links, nft = FakeLinkManager(ROUTES), FakeNftManager.from_config(ROUTES)
    runner = await build_mesh(
        opts,
        discovery_urls=[],
        backend="userspace",
        deps=MeshDeps(backend=FakeWireGuard(), discovery=FakeDiscovery(), links=links, nft=nft),
    )
    steer = runner.mesh.nft
    assert isinstance(steer, RouteSteering) and steer.routes is links and steer.nft is nft
