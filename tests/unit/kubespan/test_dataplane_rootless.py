"""Data plane without root: nft JSON rendering/parsing/diffing, the reconcile paths against a small
nft simulator, the netlink plans and event filter, LinkManager against an in-memory rtnetlink,
and the fakes the engine tests use."""

from __future__ import annotations

import asyncio
import copy
import errno
import ipaddress
import json
import socket
import sys
from collections.abc import Sequence
from ipaddress import ip_interface, ip_network
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from kubespan import constants as C
from kubespan.dataplane import links as L
from kubespan.dataplane import nft as N
from kubespan.dataplane import ruleset as R
from kubespan.dataplane.fake import FakeLinkManager, FakeNftManager
from kubespan.dataplane.links import (
    DataplaneError,
    LinkManager,
    LinkNotFoundError,
    LiveAddress,
    LiveRoute,
    LiveRule,
    NetlinkEvent,
)
from kubespan.dataplane.nft import NftError, NftManager
from kubespan.dataplane.ruleset import SET_IPV4, SET_IPV6, RulesetParams, targets
from kubespan.ipset import IPSet

AF4, AF6 = socket.AF_INET, socket.AF_INET6
MESH = ip_interface("fd7f:175a:b97c:5602::1/64")


# =================================================================================================
# nftables: rendering
# =================================================================================================


def _rules_of(doc: dict, chain: str) -> list[dict]:
    return [
        c["add"]["rule"]
        for c in doc["nftables"]
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


def _mangles(rule: dict) -> list[dict]:
    return [e["mangle"] for e in rule["expr"] if "mangle" in e]


def test_replace_document_is_one_idempotent_transaction() -> None:
    doc = R.render_replace(RulesetParams(), targets(["10.0.0.0/24", "fd00::1"]))
    cmds = doc["nftables"]
    table = {"table": {"family": "inet", "name": "kubespan"}}
    assert cmds[:3] == [{"add": table}, {"delete": table}, {"add": table}]
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in cmds if "set" in c.get("add", {})}
    assert sets[SET_IPV4]["type"] == "ipv4_addr" and sets[SET_IPV6]["type"] == "ipv6_addr"
    assert sets[SET_IPV4]["flags"] == ["interval"] == sets[SET_IPV6]["flags"]
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})}
    assert (chains["prerouting"]["type"], chains["prerouting"]["hook"], chains["prerouting"]["prio"]) == (
        "filter",
        "prerouting",
        0,
    )
    assert (chains["output"]["type"], chains["output"]["hook"]) == ("route", "output")
    assert (chains["forward"]["type"], chains["forward"]["hook"]) == ("filter", "forward")
    base = {n: ch for n, ch in chains.items() if "hook" in ch}
    assert set(base) == {"prerouting", "output", "forward"}
    assert all(ch["policy"] == "accept" for ch in base.values())
    # the regular chains the output chain jumps to, added before any rule can refer to them
    regular = {n: ch for n, ch in chains.items() if "hook" not in ch}
    assert set(regular) == {"mesh_ipv4", "mesh_ipv6"} and not any("type" in ch for ch in regular.values())
    first_rule = next(i for i, c in enumerate(cmds) if "rule" in c.get("add", {}))
    assert all(i < first_rule for i, c in enumerate(cmds) if "chain" in c.get("add", {}))
    elements = [c["add"]["element"] for c in cmds if "element" in c.get("add", {})]
    assert elements == [
        {
            "family": "inet",
            "table": "kubespan",
            "name": SET_IPV4,
            "elem": [{"prefix": {"addr": "10.0.0.0", "len": 24}}],
        },
        {"family": "inet", "table": "kubespan", "name": SET_IPV6, "elem": ["fd00::1"]},
    ]
    json.dumps(doc)  # serialisable as is


def test_empty_sets_send_no_element_commands() -> None:
    doc = R.render_replace(RulesetParams(), {})
    assert not [c for c in doc["nftables"] if "element" in c.get("add", {})]


def test_rules_have_talos_semantics_and_touch_only_the_mask_bits() -> None:
    doc = R.render_replace(RulesetParams(), {})
    pre, out = _rules_of(doc, "prerouting"), _rules_of(doc, "output")
    wg_is = {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 0x60]}, "right": 0x20}
    wg_not = {**wg_is, "op": "!="}
    assert out[0]["expr"] == [{"match": wg_is}, {"accept": None}]  # WireGuard's own, before any lookup
    mark = {
        "key": {"meta": {"key": "mark"}},
        "value": {"|": [{"&": [{"meta": {"key": "mark"}}, 0xFFFFFF9F]}, 0x40]},
    }
    families = (("ip", "@targets_ipv4", "mesh_ipv4", 1368), ("ip6", "@targets_ipv6", "mesh_ipv6", 1348))
    assert len(pre) == 2 and len(out) == 3
    for pre_rule, out_rule, (proto, set_name, chain, mss) in zip(pre, out[1:], families, strict=True):
        # prerouting: the family's target set, not WireGuard's own, then the mark (mask bits only)
        daddr = {"payload": {"protocol": proto, "field": "daddr"}}
        assert pre_rule["expr"][:2] == [
            {"match": {"op": "==", "left": daddr, "right": set_name}},
            {"match": wg_not},
        ]
        assert _mangles(pre_rule) == [mark] and pre_rule["expr"][-1] == {"accept": None}
        # output: the same lookup, once; a hit goes on in the family's chain
        assert out_rule["expr"] == [
            {"match": {"op": "==", "left": daddr, "right": set_name}},
            {"goto": {"target": chain}},
        ]
        rules = _rules_of(doc, chain)
        # loopback accepted, then (IPv6) neighbour discovery, then the clamp, then the mark
        assert rules[0]["expr"] == [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}},
            {"accept": None},
        ]
        clamp, marking = rules[-2:]
        assert _mangles(clamp)[0]["value"] == mss  # the clamp comes before the mark's accept
        assert _mangles(marking) == [mark] and marking["expr"][-1] == {"accept": None}
    # neighbour discovery to a target is never marked into the tunnel (a solicitation's unicast
    # answer to a peer whose underlay address is among the targets would be lost)
    nd_rule = _rules_of(doc, "mesh_ipv6")[1]
    nd = nd_rule["expr"][0]["match"]
    assert nd["left"] == {"payload": {"protocol": "icmpv6", "field": "type"}}
    assert {"nd-neighbor-solicit", "nd-neighbor-advert"} <= set(nd["right"]["set"])
    assert nd_rule["expr"][-1] == {"accept": None}
    assert len(_rules_of(doc, "mesh_ipv4")) == 3  # no ND in IPv4


def test_traffic_that_is_not_ours_meets_one_lookup_and_few_rules() -> None:
    """A packet that is not mesh-bound costs one set lookup per hook (it was two in the output chain:
    clamp, then mark) and passes 3 output and 2 prerouting rules (it was 7 and 3): the exemptions
    that only matter for a target are tested after the lookup. WireGuard's own packets leave the
    output chain at its first rule, before any lookup."""
    doc = R.render_replace(RulesetParams(), {})
    for chain, n_rules in (("output", 3), ("prerouting", 2)):
        rules = _rules_of(doc, chain)
        assert len(rules) == n_rules
        lookups = {"@targets_ipv4": 0, "@targets_ipv6": 0}
        for rule in rules:
            for e in rule["expr"]:
                right = e["match"]["right"] if "match" in e else None
                if isinstance(right, str) and right in lookups:
                    lookups[right] += 1
        assert lookups == {"@targets_ipv4": 1, "@targets_ipv6": 1}, chain
    whats = [r["comment"].split()[0].split(":")[-1] for r in _rules_of(doc, "output")]
    assert whats == ["wireguard", "mesh-ipv4", "mesh-ipv6"]
    for chain in ("mesh_ipv4", "mesh_ipv6"):  # the jump targets look nothing up again
        assert "@targets" not in json.dumps(_rules_of(doc, chain))


_SYN = {
    "match": {
        "op": "==",
        "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]},
        "right": "syn",
    }
}
_MSS_KEY = {"tcp option": {"name": "maxseg", "field": "size"}}


def test_clamps_test_the_syn_flag_before_anything_else() -> None:
    """Only a SYN of a mesh-bound flow is clamped; every other packet leaves a clamp rule at its
    first match (in the forward chain too, before the interface name is compared)."""
    doc = R.render_replace(RulesetParams(), {})
    rules = [r for ch in ("mesh_ipv4", "mesh_ipv6", "forward") for r in _rules_of(doc, ch)]
    clamps = [r for r in rules if any(m["key"] == _MSS_KEY for m in _mangles(r))]
    assert len(clamps) == 4
    assert all(r["expr"][0] == _SYN for r in clamps)


def test_ruleset_uses_no_conntrack() -> None:
    """No rule needs connection tracking, so the table does not turn it on in the node."""
    text = json.dumps(R.render_replace(RulesetParams(), targets(["10.0.0.0/8", "fd00::/8"])))
    assert '"ct"' not in text and "notrack" not in text and '"ct ' not in text


def test_custom_marks_and_mtu() -> None:
    p = RulesetParams(mtu=1280, fwmark_wireguard=0x200, fwmark_force=0x400, fwmark_mask=0x600)
    doc = R.render_replace(p, {})
    out = _rules_of(doc, "output")
    assert out[0]["expr"][0]["match"] == {
        "op": "==",
        "left": {"&": [{"meta": {"key": "mark"}}, 0x600]},
        "right": 0x200,
    }
    for chain, mss in (("mesh_ipv4", 1228), ("mesh_ipv6", 1208)):
        clamp, marking = _rules_of(doc, chain)[-2:]
        assert _mangles(clamp)[0]["value"] == mss
        assert _mangles(marking)[0]["value"] == {"|": [{"&": [{"meta": {"key": "mark"}}, 0xFFFFF9FF]}, 0x400]}
    fwd = _rules_of(doc, "forward")
    assert [_mangles(r)[0]["value"] for r in fwd] == [1228, 1208]


def test_mss_clamp_only_lowers_syns() -> None:
    (rule4, _rule6) = _rules_of(R.render_replace(RulesetParams(), {}), "forward")
    exprs = rule4["expr"]
    assert exprs[0] == _SYN
    assert exprs[1] == {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "kubespan"}}
    assert exprs[2]["match"]["right"] == "ipv4"
    assert exprs[3]["match"]["op"] == ">" and exprs[3]["match"]["right"] == 1368


def test_forward_clamp_is_optional() -> None:
    doc = R.render_replace(RulesetParams(clamp_forwarded_mss=False), {})
    assert not [c for c in doc["nftables"] if c.get("add", {}).get("chain", {}).get("name") == "forward"]


def test_rule_comments_identify_the_rendering() -> None:
    a = R.render_replace(RulesetParams(), {})
    b = R.render_replace(RulesetParams(mtu=1380), {})
    comments = lambda doc, ch: [r["comment"] for r in _rules_of(doc, ch)]  # noqa: E731
    assert len(set(comments(a, "output"))) == 3
    assert all(c.startswith("kubespan:output:") for c in comments(a, "output"))
    assert comments(a, "prerouting") == comments(b, "prerouting")  # MTU does not matter there
    assert comments(a, "output") == comments(b, "output")  # nor in the output chain's lookups
    assert comments(a, "mesh_ipv4") != comments(b, "mesh_ipv4")  # but in the clamp they jump to
    assert comments(a, "output") == comments(R.render_replace(RulesetParams(), {}), "output")  # stable


def test_loose_params_are_checked_by_mesh_config() -> None:
    with pytest.raises(C.ConfigError, match="mtu"):
        RulesetParams.of(mtu=1279)
    with pytest.raises(C.ConfigError, match="fwmark_force"):
        RulesetParams.of(fwmark_force=0x80)
    with pytest.raises(C.ConfigError, match="nft_table"):
        RulesetParams.of("bad name")
    with pytest.raises(C.ConfigError, match="mtu: 1279 is below the minimum 1280"):
        NftManager(mtu=1279)
    with pytest.raises(C.ConfigError, match="link_name"):
        FakeNftManager(ifname="a/b")
    cfg = C.MeshConfig(mtu=1400, nft_table="ks2", clamp_forwarded_mss=False)
    p = RulesetParams.from_config(cfg)
    assert (p.table, p.mtu, p.clamp_forwarded_mss, p.mss_ipv4, p.mss_ipv6) == ("ks2", 1400, False, 1348, 1328)
    assert RulesetParams.of("ks2", mtu=1400, clamp_forwarded_mss=False) == p


def test_adapters_built_from_a_checked_config_do_not_check_again(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = C.MeshConfig(mtu=1400, nft_table="ks2")
    checks: list[dict[str, object]] = []
    real = C.check_mesh_fields

    def counting(**values: object) -> None:
        checks.append(values)
        real(**values)

    monkeypatch.setattr(C, "check_mesh_fields", counting)
    for manager in (NftManager, FakeNftManager):
        assert manager.from_config(cfg).params == RulesetParams.from_config(cfg)
    assert LinkManager.from_config(cfg).mtu == 1400
    assert checks == []
    LinkManager(mtu=1400)  # loose values are checked, by the same rules
    assert len(checks) == 1 and checks[0]["mtu"] == 1400


# =================================================================================================
# nftables: elements, desired sets, diffs, parsing
# =================================================================================================


def test_element_json_never_uses_cidr_strings() -> None:
    assert R.element_json(ip_network("10.0.0.1/32")) == "10.0.0.1"
    assert R.element_json(ip_network("::/0")) == {"prefix": {"addr": "::", "len": 0}}
    assert R.element_json(ip_network("2001:db8::/32")) == {"prefix": {"addr": "2001:db8::", "len": 32}}


def test_parse_element_forms() -> None:
    assert R.parse_element("10.0.0.1", 4) == [ip_network("10.0.0.1/32")]
    assert R.parse_element({"prefix": {"addr": "fd00::", "len": 8}}, 6) == [ip_network("fd00::/8")]
    assert R.parse_element({"range": ["10.0.0.0", "10.0.0.255"]}, 4) == [ip_network("10.0.0.0/24")]
    assert R.parse_element({"range": ["10.0.0.1", "10.0.0.2"]}, 4) == [
        ip_network("10.0.0.1/32"),
        ip_network("10.0.0.2/32"),
    ]
    assert R.parse_element({"elem": {"val": "10.0.0.9", "timeout": 5}}, 4) == [ip_network("10.0.0.9/32")]
    with pytest.raises(ValueError):
        R.parse_element({"what": 1}, 4)


def test_normalize_desired_collapses_and_validates() -> None:
    d = R.normalize_desired(
        {SET_IPV4: ["10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24", ip_network("10.0.0.7/32")]}
    )
    assert d == {SET_IPV4: [ip_network("10.0.0.0/23")], SET_IPV6: []}
    assert R.normalize_desired({SET_IPV6: ["fd00::1", "fd00::/127"]})[SET_IPV6] == [ip_network("fd00::/127")]
    with pytest.raises(ValueError, match="targets_ipv4: fd00::/8 is not an IPv4 prefix"):
        R.normalize_desired({SET_IPV4: ["fd00::/8"]})
    with pytest.raises(ValueError, match="unknown nftables set 'mesh'"):
        R.normalize_desired({"mesh": []})


def test_targets_splits_by_family() -> None:
    assert targets(["10.0.0.1", ip_network("fd00::/8"), "10.1.0.0/16"]) == {
        SET_IPV4: [ip_network("10.0.0.1/32"), ip_network("10.1.0.0/16")],
        SET_IPV6: [ip_network("fd00::/8")],
    }


def test_diff_and_its_transaction_order() -> None:
    live = {
        SET_IPV4: [ip_network("10.0.0.0/24"), ip_network("10.1.0.0/24")],
        SET_IPV6: [ip_network("fd00::/64")],
    }
    want = {SET_IPV4: [ip_network("10.0.0.0/23")], SET_IPV6: [ip_network("fd00::/64")]}
    diffs = R.diff_sets(live, want)
    assert list(diffs) == [SET_IPV4]
    assert diffs[SET_IPV4].add == (ip_network("10.0.0.0/23"),)
    assert diffs[SET_IPV4].delete == (ip_network("10.0.0.0/24"), ip_network("10.1.0.0/24"))
    doc = R.render_diff("kubespan", diffs)
    assert [next(iter(c)) for c in doc["nftables"]] == [
        "delete",
        "add",
    ]  # the wider prefix fits after the deletes
    assert R.diff_sets(want, want) == {}


def test_flush_readd_and_delete_table_documents() -> None:
    doc = R.render_flush_readd(
        "kubespan", {SET_IPV4: [ip_network("10.0.0.0/8")], SET_IPV6: []}, [SET_IPV4, SET_IPV6]
    )
    assert doc["nftables"] == [
        {"flush": {"set": {"family": "inet", "table": "kubespan", "name": SET_IPV4}}},
        {
            "add": {
                "element": {
                    "family": "inet",
                    "table": "kubespan",
                    "name": SET_IPV4,
                    "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}],
                }
            }
        },
        {"flush": {"set": {"family": "inet", "table": "kubespan", "name": SET_IPV6}}},
    ]
    t = {"table": {"family": "inet", "name": "x"}}
    assert R.render_delete_table("x") == {"nftables": [{"add": t}, {"delete": t}]}


# =================================================================================================
# A small nft simulator (what `nft -j list table` / `nft -j -f -` do, for our subset)
# =================================================================================================


class NftSim:
    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Any]] = {}
        self.calls: list[list[str]] = []
        self.documents: list[dict] = []
        self.fail: list[str] = []  # stderr of the next failing -f transactions
        self.handle = 0

    async def __call__(
        self, argv: Sequence[str], stdin: bytes | None, limit: float
    ) -> tuple[int, bytes, bytes]:
        argv = list(argv)
        self.calls.append(argv)
        if argv[:3] == ["ip", "netns", "exec"]:
            argv = argv[4:]
        assert argv[0] == "nft"
        if argv[1:4] == ["-j", "list", "table"]:
            name = argv[5]
            if name not in self.tables:
                return 1, b"", b"Error: No such file or directory\nlist table inet x\n"
            return 0, json.dumps(self.listing(name)).encode(), b""
        assert argv[1:] == ["-j", "-f", "-"] and stdin is not None
        doc = json.loads(stdin)
        self.documents.append(doc)
        if self.fail:
            return 1, b"", self.fail.pop(0).encode()
        saved = copy.deepcopy(self.tables)
        try:
            for cmd in doc["nftables"]:
                self.apply(cmd)
        except ValueError as e:
            self.tables = saved
            return 1, b"", f"internal:0:0-0: Error: {e}\n".encode()
        return 0, b"", b""

    def apply(self, cmd: dict) -> None:
        ((op, body),) = cmd.items()
        ((kind, obj),) = body.items()
        if kind == "table":
            if op == "add":
                self.tables.setdefault(obj["name"], {"sets": {}, "chains": {}, "rules": {}})
            elif op == "delete":
                if obj["name"] not in self.tables:
                    raise ValueError("No such file or directory")
                del self.tables[obj["name"]]
            return
        if obj["table"] not in self.tables:
            raise ValueError("No such file or directory")
        t = self.tables[obj["table"]]
        if kind == "set" and op == "add":
            t["sets"].setdefault(obj["name"], {"type": obj["type"], "flags": obj["flags"], "elem": []})
        elif kind == "set" and op == "flush":
            t["sets"][obj["name"]]["elem"] = []
        elif kind == "chain" and op == "add":
            t["chains"][obj["name"]] = {k: obj.get(k) for k in ("type", "hook", "prio", "policy")}
            t["rules"].setdefault(obj["name"], [])
        elif kind == "rule" and op == "add":
            self.handle += 1
            t["rules"][obj["chain"]].append(
                {"comment": obj.get("comment"), "expr": obj["expr"], "handle": self.handle}
            )
        elif kind == "element":
            s = t["sets"][obj["name"]]
            version = 4 if s["type"] == "ipv4_addr" else 6
            nets = [n for e in obj["elem"] for n in R.parse_element(e, version)]
            for n in nets:
                if op == "add":
                    if n in s["elem"]:
                        continue
                    if IPSet(s["elem"]).overlaps(IPSet([n])):
                        raise ValueError("interval overlaps with an existing one")
                    s["elem"].append(n)
                elif op == "delete":
                    if n not in s["elem"]:
                        raise ValueError("element does not exist")
                    s["elem"].remove(n)
        else:
            raise AssertionError(f"unsupported {cmd}")

    def listing(self, name: str) -> dict:
        t = self.tables[name]
        out: list[dict] = [
            {"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "inet", "name": name, "handle": 1}},
        ]
        for sname, s in t["sets"].items():
            obj = {
                "family": "inet",
                "name": sname,
                "table": name,
                "type": s["type"],
                "handle": 2,
                "flags": s["flags"],
            }
            if s["elem"]:
                obj["elem"] = [R.element_json(n) for n in s["elem"]]
            out.append({"set": obj})
        for cname, c in t["chains"].items():
            listed = {k: v for k, v in c.items() if v is not None}  # a regular chain lists no hook
            out.append({"chain": {"family": "inet", "table": name, "name": cname, "handle": 3, **listed}})
        for cname, rules in t["rules"].items():
            for r in rules:
                rule = {
                    "family": "inet",
                    "table": name,
                    "chain": cname,
                    "handle": r["handle"],
                    "expr": r["expr"],
                }
                if r["comment"] is not None:
                    rule["comment"] = r["comment"]
                out.append({"rule": rule})
        return {"nftables": out}

    def elements(self, name: str = "kubespan") -> dict[str, list]:
        return {
            k: sorted(v["elem"], key=lambda n: (int(n.network_address), n.prefixlen))
            for k, v in self.tables[name]["sets"].items()
        }

    def writes(self) -> int:
        return sum(1 for c in self.calls if c[-1] == "-")


async def test_nft_create_then_nothing_written() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    assert await nm.reconcile(targets(["10.0.0.0/24", "fd00::/64"])) == ["nft table inet kubespan: created"]
    assert [t.kind for t in nm.transactions] == ["create"]
    assert sim.elements() == {SET_IPV4: [ip_network("10.0.0.0/24")], SET_IPV6: [ip_network("fd00::/64")]}
    before = sim.writes()
    for _ in range(3):
        assert await nm.reconcile(targets(["fd00::/64", "10.0.0.0/25", "10.0.0.128/25"])) == []
    assert sim.writes() == before and nm.transactions == []
    assert sim.calls[-1] == ["nft", "-j", "list", "table", "inet", "kubespan"]


async def test_nft_runs_inside_the_namespace() -> None:
    sim = NftSim()
    nm = NftManager("ks", netns="lab-n", runner=sim)
    await nm.reconcile({})
    assert sim.calls[0] == ["ip", "netns", "exec", "lab-n", "nft", "-j", "list", "table", "inet", "ks"]
    assert sim.calls[1] == ["ip", "netns", "exec", "lab-n", "nft", "-j", "-f", "-"]
    assert nm.argv("list", "ruleset") == ["ip", "netns", "exec", "lab-n", "nft", "list", "ruleset"]
    assert NftManager().argv("-j", "list", "ruleset") == ["nft", "-j", "list", "ruleset"]


async def test_nft_one_prefix_changed_is_one_add_one_delete() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    await nm.reconcile(targets(["10.1.0.0/24", "10.2.0.0/24"]))
    assert await nm.reconcile(targets(["10.1.0.0/24", "10.3.0.0/24"])) == [
        "nft set targets_ipv4: add 1, delete 1"
    ]
    (tx,) = nm.transactions
    assert tx.kind == "diff" and tx.ok
    assert [(next(iter(c)), c[next(iter(c))]["element"]["elem"]) for c in tx.document["nftables"]] == [
        ("delete", [{"prefix": {"addr": "10.2.0.0", "len": 24}}]),
        ("add", [{"prefix": {"addr": "10.3.0.0", "len": 24}}]),
    ]
    assert sim.elements()[SET_IPV4] == [ip_network("10.1.0.0/24"), ip_network("10.3.0.0/24")]


async def test_nft_trusted_cache_skips_the_read_until_a_diff_fails() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    await nm.reconcile(targets(["10.1.0.0/24", "10.2.0.0/24"]))
    lists = sum(1 for c in sim.calls if "list" in c)
    changes = await nm.reconcile(targets(["10.1.0.0/24", "10.3.0.0/24"]), trust_cache=True, normalized=True)
    assert changes == ["nft set targets_ipv4: add 1, delete 1"]
    assert sum(1 for c in sim.calls if "list" in c) == lists, "no read"
    assert await nm.reconcile(targets(["10.1.0.0/24", "10.3.0.0/24"]), trust_cache=True) == []
    assert sum(1 for c in sim.calls if "list" in c) == lists
    # changed behind our back: the diff against the cache fails, the table is read and repaired
    sim.tables["kubespan"]["sets"][SET_IPV4]["elem"] = [ip_network("10.9.0.0/24")]
    changes = await nm.reconcile(targets(["10.1.0.0/24"]), trust_cache=True)
    assert [(t.kind, t.ok) for t in nm.transactions] == [("diff", False), ("diff", True)]
    assert sim.elements()[SET_IPV4] == [ip_network("10.1.0.0/24")]
    # a plain reconcile always reads
    await nm.reconcile(targets(["10.1.0.0/24"]))
    assert sim.calls[-1] == ["nft", "-j", "list", "table", "inet", "kubespan"]
    # the table deleted behind our back: re-created
    del sim.tables["kubespan"]
    assert await nm.reconcile(targets(["10.4.0.0/24"]), trust_cache=True) == [
        "nft table inet kubespan: created"
    ]
    assert sim.elements()[SET_IPV4] == [ip_network("10.4.0.0/24")]
    with pytest.raises(ValueError, match="unknown nftables set"):
        await nm.reconcile({"nope": []}, normalized=True)


async def test_nft_widening_prefix_goes_through_the_diff() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    await nm.reconcile(targets(["10.0.0.0/24"]))
    await nm.reconcile(targets(["10.0.0.0/16"]))
    assert [t.kind for t in nm.transactions] == ["diff"]
    assert sim.elements()[SET_IPV4] == [ip_network("10.0.0.0/16")]


async def test_nft_failed_diff_falls_back_to_flush_and_readd() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    await nm.reconcile(targets(["10.1.0.0/24", "fd00::/64"]))
    sim.fail.append("Error: element does not exist\n")
    changes = await nm.reconcile(targets(["10.2.0.0/24", "fd00::/64"]))
    assert changes == ["nft set targets_ipv4: flushed and re-added 1"]
    assert [(t.kind, t.ok) for t in nm.transactions] == [("diff", False), ("flush", True)]
    assert "element does not exist" in (nm.transactions[0].error or "")
    flush = nm.transactions[1].document["nftables"]
    assert flush[0] == {"flush": {"set": {"family": "inet", "table": "kubespan", "name": SET_IPV4}}}
    assert len(flush) == 2  # only the changed set is flushed
    assert sim.elements() == {SET_IPV4: [ip_network("10.2.0.0/24")], SET_IPV6: [ip_network("fd00::/64")]}


async def test_nft_drift_between_read_and_write_is_repaired() -> None:
    """A real failing diff: someone removes the element we are about to delete."""
    sim = NftSim()
    nm = NftManager(runner=sim)
    await nm.reconcile(targets(["10.1.0.0/24"]))

    async def racing(argv: Sequence[str], stdin: bytes | None, limit: float) -> tuple[int, bytes, bytes]:
        if stdin is not None and b'"delete"' in stdin and b"flush" not in stdin:
            sim.tables["kubespan"]["sets"][SET_IPV4]["elem"] = [ip_network("10.0.0.0/8")]
        return await sim(argv, stdin, limit)

    nm2 = NftManager(runner=racing)
    assert await nm2.reconcile(targets(["10.2.0.0/24"])) == ["nft set targets_ipv4: flushed and re-added 1"]
    assert sim.elements()[SET_IPV4] == [ip_network("10.2.0.0/24")]


async def test_nft_flush_failure_then_full_replace_then_error() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    await nm.reconcile(targets(["10.1.0.0/24"]))
    sim.fail += ["Error: one\n", "Error: two\n"]
    assert await nm.reconcile(targets(["10.2.0.0/24"])) == [
        "nft table inet kubespan: replaced (set update failed)"
    ]
    assert [(t.kind, t.ok) for t in nm.transactions] == [("diff", False), ("flush", False), ("replace", True)]
    assert sim.elements()[SET_IPV4] == [ip_network("10.2.0.0/24")]

    sim.fail += ["Error: a\n", "Error: b\n", "Error: Could not process rule: Permission denied\n"]
    with pytest.raises(NftError, match="Permission denied") as info:
        await nm.reconcile(targets(["10.3.0.0/24"]))
    assert info.value.returncode == 1 and info.value.argv[-3:] == ["-j", "-f", "-"]


async def test_nft_structure_drift_or_config_change_replaces_the_table() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    want = targets(["10.1.0.0/24"])
    await nm.reconcile(want)
    # a rule removed from outside
    sim.tables["kubespan"]["rules"]["output"].pop()
    (change,) = await nm.reconcile(want)
    assert change == "nft table inet kubespan: replaced (rules of chain output differ)"
    assert await nm.reconcile(want) == []
    # a chain removed
    del sim.tables["kubespan"]["chains"]["forward"]
    del sim.tables["kubespan"]["rules"]["forward"]
    assert (await nm.reconcile(want))[0].startswith("nft table inet kubespan: replaced (chains differ")
    # a set removed
    del sim.tables["kubespan"]["sets"][SET_IPV6]
    assert (await nm.reconcile(want))[0].startswith("nft table inet kubespan: replaced (sets differ")
    # a new process with another MTU: replaced once, then quiet; elements kept
    nm2 = NftManager(mtu=1380, runner=sim)
    assert (await nm2.reconcile(want))[0].endswith("(rules of chain mesh_ipv4 differ)")  # the clamp
    assert await nm2.reconcile(want) == []
    assert sim.elements()[SET_IPV4] == [ip_network("10.1.0.0/24")]
    # the same configuration in a new process: nothing written
    writes = sim.writes()
    assert await NftManager(mtu=1380, runner=sim).reconcile(want) == []
    assert sim.writes() == writes


async def test_nft_table_removed_is_recreated_with_elements() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    want = targets(["10.1.0.0/24", "fd00::/8"])
    await nm.reconcile(want)
    sim.tables.clear()
    assert await nm.reconcile(want) == ["nft table inet kubespan: created"]
    assert sim.elements() == {SET_IPV4: [ip_network("10.1.0.0/24")], SET_IPV6: [ip_network("fd00::/8")]}
    assert await nm.read_sets() == sim.elements()


async def test_nft_teardown_and_read_sets_when_missing() -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    assert await nm.read_sets() is None
    await nm.reconcile({})
    await nm.teardown()
    assert sim.tables == {}
    await nm.teardown()  # idempotent
    assert [t.kind for t in nm.transactions] == ["teardown"]


async def test_nft_list_errors_and_timeouts_are_clear() -> None:
    async def denied(argv: Sequence[str], stdin: bytes | None, limit: float) -> tuple[int, bytes, bytes]:
        return 1, b"", b"Error: Operation not permitted\n"

    with pytest.raises(NftError, match="list table inet kubespan failed: Error: Operation not permitted"):
        await NftManager(runner=denied).reconcile({})

    async def garbage(argv: Sequence[str], stdin: bytes | None, limit: float) -> tuple[int, bytes, bytes]:
        return 0, b"{not json", b""

    with pytest.raises(NftError, match="cannot parse"):
        await NftManager(runner=garbage).reconcile({})

    async def slow(argv: Sequence[str], stdin: bytes | None, limit: float) -> tuple[int, bytes, bytes]:
        raise TimeoutError

    with pytest.raises(NftError, match=r"timed out after 0\.5s"):
        await NftManager(runner=slow, timeout=0.5).reconcile({})

    with pytest.raises(NftError, match="not found"):
        await NftManager(nft="/nonexistent/nft").reconcile({})


async def test_run_subprocess_status_stdin_and_timeout() -> None:
    rc, out, err = await N.run_subprocess(
        [sys.executable, "-c", "import sys; d=sys.stdin.read(); print(d[::-1]); sys.exit(3)"], b"abc", 10
    )
    assert (rc, out.strip(), err) == (3, b"cba", b"")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await N.run_subprocess([sys.executable, "-c", "import time; time.sleep(30)"], None, 0.3)
    assert loop.time() - t0 < 5


async def test_nft_manager_from_config() -> None:
    cfg = C.MeshConfig(
        link_name="ks1", mtu=1300, nft_table="ks_t", fwmark_force=0x40, clamp_forwarded_mss=False
    )
    nm = NftManager.from_config(cfg, netns="x")
    assert (nm.table, nm.params.ifname, nm.params.mtu, nm.params.clamp_forwarded_mss, nm.netns) == (
        "ks_t",
        "ks1",
        1300,
        False,
        "x",
    )


# =================================================================================================
# netlink: plans, parsing, events
# =================================================================================================


class Msg(dict):
    """A stand-in for a pyroute2 message: ``get`` looks at fields, then at attributes."""

    def __init__(self, attrs: dict[str, Any] | None = None, **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = dict(attrs or {})

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self.attrs:
            return self.attrs[key]
        return super().get(key, default)


def test_plan_addresses() -> None:
    ll = LiveAddress(ip_interface("fe80::1/64"), 253)
    stray = LiveAddress(ip_interface("10.9.9.9/24"))
    wrong_len = LiveAddress(ip_interface("fd7f:175a:b97c:5602::1/128"))
    remove, add = L.plan_addresses([ll, stray, wrong_len], [MESH])
    assert remove == [stray, wrong_len] and add == [MESH]
    assert L.plan_addresses([ll, LiveAddress(MESH)], [MESH]) == ([], [])
    assert L.plan_addresses([LiveAddress(MESH)], [MESH, MESH]) == ([], [])


def _route(**kw: Any) -> LiveRoute:
    base = dict(family=AF4, dst_len=0, table=180, oif=5, metric=1, mtu=1420)
    base.update(kw)
    return LiveRoute(**base)


def test_plan_routes() -> None:
    spec = dict(family=AF4, table=180, oif=5, mtu=1420, metric=1)
    good = _route()
    assert L.plan_routes([good], **spec) == ([], False)
    assert L.plan_routes([], **spec) == ([], True)
    for bad in (
        _route(mtu=1500),
        _route(mtu=None),
        _route(oif=6),
        _route(metric=0),
        _route(gateway="10.0.0.1"),
    ):
        assert L.plan_routes([bad], **spec) == ([bad], True), bad
    # a stray default alongside ours goes, ours stays
    stray = _route(oif=7, metric=0)
    assert L.plan_routes([good, stray], **spec) == ([stray], False)
    # other families, other tables and non-default routes are not ours
    other = [_route(family=AF6, oif=9), _route(table=254, oif=9), _route(dst_len=16, oif=9)]
    assert L.plan_routes([good, *other], **spec) == ([], False)
    # a duplicate of ours is removed
    assert L.plan_routes([good, _route()], **spec) == ([good], False)


def _rule(**kw: Any) -> LiveRule:
    base = dict(family=AF4, priority=32500, table=180, fwmark=0x40, fwmask=0x60)
    base.update(kw)
    return LiveRule(**base)


def test_plan_rules_touches_only_ours() -> None:
    spec = dict(family=AF4, priority=32500, table=180, fwmark=0x40, fwmask=0x60)
    good = _rule()
    assert L.plan_rules([good], **spec) == ([], False)
    assert L.plan_rules([], **spec) == ([], True)
    untouchable = [
        _rule(priority=100, table=100, fwmark=0x1, fwmask=None),
        _rule(table=200),  # same priority, another table: someone else's
        _rule(priority=32501),  # another priority, our table: someone else's
        _rule(family=AF6),  # the other family is planned separately
    ]
    assert L.plan_rules([*untouchable, good], **spec) == ([], False)
    for stale in (
        _rule(fwmark=0x20),
        _rule(fwmask=0xFF),
        _rule(fwmask=None),
        _rule(flags=L.FIB_RULE_INVERT),
        _rule(selectors=("FRA_IIFNAME",)),
        _rule(src_len=8),
        _rule(action=2),
    ):
        assert L.plan_rules([stale], **spec) == ([stale], True), stale
    assert L.plan_rules([good, _rule()], **spec) == ([good], False)


def test_parse_netlink_messages() -> None:
    a = L.parse_address(Msg({"IFA_ADDRESS": "fd7f::1"}, prefixlen=64, scope=0))
    assert a == LiveAddress(ip_interface("fd7f::1/64"), 0) and a.owned
    assert not L.parse_address(Msg({"IFA_ADDRESS": "fe80::1"}, prefixlen=64, scope=253)).owned
    assert L.parse_address(Msg({"IFA_LOCAL": "10.0.0.1"}, prefixlen=24)).interface == ip_interface(
        "10.0.0.1/24"
    )

    r = L.parse_route(
        Msg(
            {"RTA_TABLE": 1000, "RTA_OIF": 3, "RTA_PRIORITY": 1, "RTA_METRICS": Msg({"RTAX_MTU": 1420})},
            family=AF4,
            dst_len=0,
            table=252,
            type=1,
            proto=4,
        )
    )
    assert r == LiveRoute(AF4, 0, 1000, 3, 1, 1420, None, 1, 4)
    assert L.parse_route(Msg({"RTA_OIF": 3}, family=AF6, dst_len=0, table=180)).mtu is None

    rule = L.parse_rule(
        Msg(
            {
                "FRA_TABLE": 180,
                "FRA_PRIORITY": 32500,
                "FRA_FWMARK": 0x40,
                "FRA_FWMASK": 0x60,
                "FRA_SUPPRESS_PREFIXLEN": 0xFFFFFFFF,
            },
            family=AF4,
            table=180,
            action=1,
            flags=0,
        )
    )
    assert rule == _rule() and rule.delete_args() == dict(
        family=AF4, priority=32500, table=180, fwmark=0x40, fwmask=0x60
    )
    assert rule.describe() == "inet priority 32500 fwmark 0x40/0x60 lookup 180"
    narrowed = L.parse_rule(
        Msg(
            {"FRA_PRIORITY": 32500, "FRA_TABLE": 180, "FRA_IIFNAME": "eth0", "FRA_SUPPRESS_PREFIXLEN": 0},
            family=AF4,
            action=1,
        )
    )
    assert narrowed.selectors == ("FRA_IIFNAME", "FRA_SUPPRESS_PREFIXLEN")


def test_classify_event_filters_to_what_we_own() -> None:
    kw = dict(ifname="kubespan", ifindex=5, table=180, priority=32500)
    ev = L.classify_event("RTM_DELLINK", Msg({"IFLA_IFNAME": "kubespan"}, index=5), **kw)
    assert ev == NetlinkEvent("link", "del", "kubespan index 5")
    assert L.classify_event("RTM_NEWLINK", Msg({"IFLA_IFNAME": "eth0"}, index=2), **kw) is None
    assert L.classify_event("RTM_NEWLINK", Msg({"IFLA_IFNAME": "renamed"}, index=5), **kw) is not None
    assert L.classify_event(
        "RTM_DELADDR", Msg({"IFA_ADDRESS": "fd7f::1"}, index=5, prefixlen=64), **kw
    ) == NetlinkEvent("addr", "del", "fd7f::1/64 dev kubespan")
    # another link's global address is a node address: the host view is read again
    assert L.classify_event(
        "RTM_NEWADDR", Msg({"IFA_ADDRESS": "10.0.0.1"}, index=2, prefixlen=24), **kw
    ) == NetlinkEvent("hostaddr", "new", "10.0.0.1/24 index 2")
    assert L.classify_event(
        "RTM_DELADDR", Msg({"IFA_LOCAL": "2001:db8::7"}, index=2, prefixlen=64), **{**kw, "ifindex": None}
    ) == NetlinkEvent("hostaddr", "del", "2001:db8::7/64 index 2")
    for never_a_node_address in ("fe80::1", "127.0.0.2", "169.254.1.1", "::1", None):
        msg = Msg({"IFA_ADDRESS": never_a_node_address}, index=2, prefixlen=64)
        assert L.classify_event("RTM_NEWADDR", msg, **kw) is None
    assert (
        L.classify_event("RTM_DELROUTE", Msg({"RTA_TABLE": 180}, dst_len=0, table=180), **kw).kind == "route"
    )
    assert L.classify_event("RTM_NEWROUTE", Msg({"RTA_TABLE": 254}, dst_len=24, table=254), **kw) is None
    assert (
        L.classify_event("RTM_DELRULE", Msg({"FRA_PRIORITY": 32500, "FRA_TABLE": 180}), **kw).kind == "rule"
    )
    assert L.classify_event("RTM_NEWRULE", Msg({"FRA_PRIORITY": 100, "FRA_TABLE": 180}), **kw) is not None
    assert L.classify_event("RTM_NEWRULE", Msg({"FRA_PRIORITY": 100, "FRA_TABLE": 100}), **kw) is None
    assert L.classify_event("RTM_NEWNEIGH", Msg(), **kw) is None
    assert L.classify_event(None, Msg(), **kw) is None


def test_link_manager_validation_and_from_config() -> None:
    with pytest.raises(C.ConfigError, match="mtu"):
        LinkManager(mtu=1279)
    with pytest.raises(C.ConfigError, match="routing_table"):
        LinkManager(table=254)
    with pytest.raises(C.ConfigError, match="rule_priority"):
        LinkManager(priority=32766)
    with pytest.raises(C.ConfigError, match="fwmark_force"):
        LinkManager(fwmark=0x80)
    with pytest.raises(C.ConfigError, match="link_name"):
        LinkManager("x" * 16)
    with pytest.raises(C.ConfigError, match="route_metric"):
        LinkManager(metric=-1)
    # MeshConfig's rules and messages; a custom mask and force mark need no WireGuard mark here
    with pytest.raises(C.ConfigError) as info:
        LinkManager(mtu=70000, table=0)
    assert [str(e) for e in info.value.errors] == [
        "mtu: 70000 is above the maximum 65455: must be between 1280 and 65455",
        "routing_table: 0 is below the minimum 1: must be between 1 and 4294967295",
    ]
    assert LinkManager(fwmark=0x4000, fwmask=0x6000).fwmark == 0x4000
    cfg = C.MeshConfig(
        link_name="ks1",
        mtu=1300,
        routing_table=4242,
        rule_priority=1000,
        fwmark_wireguard=0x200,
        fwmark_force=0x400,
        fwmark_mask=0x600,
    )
    lm = LinkManager.from_config(cfg, netns="n1")
    assert (lm.ifname, lm.mtu, lm.table, lm.priority, lm.fwmark, lm.fwmask, lm.netns) == (
        "ks1",
        1300,
        4242,
        1000,
        0x400,
        0x600,
        "n1",
    )
    assert "fwmark=0x400/0x600" in repr(lm) and "netns=n1" in repr(lm)


# =================================================================================================
# LinkManager against an in-memory rtnetlink
# =================================================================================================


async def _agen(items: list[Any]) -> Any:
    for i in items:
        yield i


class FakeIPR:
    """The subset of AsyncIPRoute that LinkManager uses, with kernel-like state and errors."""

    def __init__(self, link: bool = True) -> None:
        self.links: dict[str, dict[str, Any]] = {}
        if link:
            self.links["kubespan"] = {"index": 5, "mtu": 1500, "flags": 0}
        self.links["eth0"] = {"index": 2, "mtu": 1500, "flags": 1}
        self.addrs: list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface, int]] = [
            (2, ip_interface("192.0.2.1/24"), 0)
        ]
        self.routes: list[dict[str, Any]] = []
        self.rules: list[dict[str, Any]] = [
            dict(family=AF4, priority=100, table=100, fwmark=1, fwmask=None),
            dict(family=AF4, priority=32766, table=254, fwmark=None, fwmask=None),
            dict(family=AF6, priority=32766, table=254, fwmark=None, fwmask=None),
        ]
        self.writes: list[tuple[str, str, dict[str, Any]]] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def _write(self, obj: str, cmd: str, kw: dict[str, Any]) -> None:
        self.writes.append((obj, cmd, kw))

    async def link(self, cmd: str, **kw: Any) -> Any:
        if cmd == "dump":
            return _agen(
                [
                    Msg({"IFLA_IFNAME": name, "IFLA_MTU": v["mtu"]}, index=v["index"], flags=v["flags"])
                    for name, v in self.links.items()
                    if kw.get("ifname") in (None, name)
                ]
            )
        self._write("link", cmd, kw)
        (name,) = [n for n, v in self.links.items() if v["index"] == kw["index"]]
        if cmd == "set":
            if "mtu" in kw:
                self.links[name]["mtu"] = kw["mtu"]
            if "state" in kw:
                self.links[name]["flags"] = 1 if kw["state"] == "up" else 0
        elif cmd == "del":
            del self.links[name]
            self.addrs = [a for a in self.addrs if a[0] != kw["index"]]
            self.routes = [r for r in self.routes if r["oif"] != kw["index"]]
        return []

    async def addr(self, cmd: str, **kw: Any) -> Any:
        if cmd == "dump":
            return _agen(
                [
                    Msg({"IFA_ADDRESS": str(i.ip)}, index=idx, prefixlen=i.network.prefixlen, scope=scope)
                    for idx, i, scope in self.addrs
                    if idx == kw["index"]
                ]
            )
        self._write("addr", cmd, kw)
        iface = ip_interface(f"{kw['address']}/{kw['prefixlen']}")
        entry = (kw["index"], iface, 0)
        if cmd == "add":
            if any(a[0] == kw["index"] and a[1].ip == iface.ip for a in self.addrs):
                raise NetlinkError(errno.EEXIST)
            self.addrs.append(entry)
        elif cmd == "del":
            if entry not in self.addrs:
                raise NetlinkError(errno.EADDRNOTAVAIL)
            self.addrs.remove(entry)
        return []

    async def route(self, cmd: str, **kw: Any) -> Any:
        if cmd == "dump":
            return _agen(
                [
                    Msg(
                        {
                            "RTA_TABLE": r["table"],
                            "RTA_OIF": r["oif"],
                            "RTA_PRIORITY": r["priority"],
                            "RTA_METRICS": Msg({"RTAX_MTU": r["mtu"]}),
                        },
                        family=r["family"],
                        dst_len=0,
                        table=r["table"] if r["table"] < 256 else 252,
                        type=1,
                    )
                    for r in self.routes
                    if r["family"] == kw["family"] and r["table"] == kw["table"]
                ]
            )
        self._write("route", cmd, kw)
        if not self.links["kubespan"]["flags"] & 1:
            raise NetlinkError(errno.ENETDOWN)
        key = (kw["family"], kw["table"], kw["priority"])
        same = [r for r in self.routes if (r["family"], r["table"], r["priority"]) == key]
        if cmd == "replace":
            for r in same:
                self.routes.remove(r)
            self.routes.append(
                dict(
                    family=kw["family"],
                    table=kw["table"],
                    priority=kw["priority"],
                    oif=kw["oif"],
                    mtu=kw["metrics"]["mtu"],
                )
            )
        elif cmd == "del":
            if not same:
                raise NetlinkError(errno.ESRCH)
            self.routes.remove(same[0])
        return []

    async def rule(self, cmd: str, **kw: Any) -> Any:
        if cmd == "dump":
            return _agen(
                [
                    Msg(
                        {
                            "FRA_PRIORITY": r["priority"],
                            "FRA_TABLE": r["table"],
                            "FRA_FWMARK": r["fwmark"],
                            "FRA_FWMASK": r["fwmask"],
                        },
                        family=r["family"],
                        action=1,
                        flags=0,
                    )
                    for r in self.rules
                    if r["family"] == kw["family"]
                ]
            )
        self._write("rule", cmd, kw)
        entry = {k: kw.get(k) for k in ("family", "priority", "table", "fwmark", "fwmask")}
        if cmd == "add":
            if entry in self.rules:
                raise NetlinkError(errno.EEXIST)
            self.rules.append(entry)
        elif cmd == "del":
            if entry not in self.rules:
                raise NetlinkError(errno.ENOENT)
            self.rules.remove(entry)
        return []


def _lm(ipr: FakeIPR, **kw: Any) -> LinkManager:
    lm = LinkManager(**kw)
    lm._open = lambda: ipr  # type: ignore[method-assign]
    return lm


async def test_link_manager_reconcile_reads_before_writes() -> None:
    ipr = FakeIPR()
    lm = _lm(ipr)
    changes = await lm.reconcile([MESH])
    assert changes == [
        "link kubespan: mtu 1500 -> 1420",
        "link kubespan: up",
        f"address kubespan: add {MESH}",
        "route table 180: add inet default dev kubespan mtu 1420",
        "route table 180: add inet6 default dev kubespan mtu 1420",
        "rule: add inet priority 32500 fwmark 0x40/0x60 lookup 180",
        "rule: add inet6 priority 32500 fwmark 0x40/0x60 lookup 180",
    ]
    assert ("link", "set", {"index": 5, "mtu": 1420, "state": "up"}) in ipr.writes  # one message for both
    assert (
        "addr",
        "add",
        {"index": 5, "address": str(MESH.ip), "prefixlen": 64, "flags": L.IFA_F_NODAD},
    ) in ipr.writes
    route_add = [w for w in ipr.writes if w[0] == "route"]
    assert route_add[0][2] == dict(
        family=AF4, dst="0.0.0.0/0", oif=5, table=180, priority=1, proto="static", metrics={"mtu": 1420}
    )
    assert route_add[1][2]["dst"] == "::/0"
    rule_add = [w for w in ipr.writes if w[0] == "rule"]
    assert rule_add[0][2] == dict(
        family=AF4, priority=32500, fwmark=0x40, fwmask=0x60, table=180, action="FR_ACT_TO_TBL"
    )

    n = len(ipr.writes)
    assert await lm.reconcile([MESH]) == []
    assert len(ipr.writes) == n  # nothing sent


async def test_link_manager_repairs_exactly_what_was_removed() -> None:
    ipr = FakeIPR()
    lm = _lm(ipr)
    await lm.reconcile([MESH])
    ipr.rules = [r for r in ipr.rules if not (r["family"] == AF6 and r["priority"] == 32500)]
    assert await lm.reconcile([MESH]) == ["rule: add inet6 priority 32500 fwmark 0x40/0x60 lookup 180"]
    ipr.routes[0]["mtu"] = 1300
    changes = await lm.reconcile_routes()
    assert changes == [
        "route table 180: del inet default oif 5 metric 1 mtu 1300",
        "route table 180: add inet default dev kubespan mtu 1420",
    ]
    ipr.addrs.append((5, ip_interface("10.9.9.9/24"), 0))
    ipr.addrs.append((5, ip_interface("fe80::1/64"), 253))
    assert await lm.reconcile_link([MESH]) == ["address kubespan: del 10.9.9.9/24"]
    assert (5, ip_interface("fe80::1/64"), 253) in ipr.addrs
    # an address change: the new one in, the old one out
    new = ip_interface("fd7f:175a:b97c:5602::2/64")
    assert await lm.reconcile_link([new]) == [f"address kubespan: del {MESH}", f"address kubespan: add {new}"]


async def test_link_manager_missing_link_and_errors() -> None:
    ipr = FakeIPR(link=False)
    lm = _lm(ipr)
    with pytest.raises(LinkNotFoundError, match="'kubespan' not found"):
        await lm.reconcile_link([MESH])
    with pytest.raises(LinkNotFoundError):
        await lm.reconcile_routes()
    assert len(await lm.reconcile_rules()) == 2  # rules need no link

    ipr2 = FakeIPR()
    lm2 = _lm(ipr2)
    # the kernel refuses IPv4 routes on a down link: a clear error, naming the object
    with pytest.raises(
        DataplaneError, match=r"add inet default route in table 180: Network is down \(errno 100\)"
    ):
        await lm2.reconcile_routes()


async def test_link_manager_broken_socket_is_reopened() -> None:
    opened: list[FakeIPR] = []

    class Broken(FakeIPR):
        async def link(self, cmd: str, **kw: Any) -> Any:
            raise OSError(errno.EBADF, "closed")

    def open_() -> FakeIPR:
        ipr = Broken() if not opened else FakeIPR()
        opened.append(ipr)
        return ipr

    lm = LinkManager()
    lm._open = open_  # type: ignore[method-assign]
    with pytest.raises(DataplaneError, match="netlink socket failed"):
        await lm.reconcile_link([MESH])
    assert opened[0].closed
    assert len(await lm.reconcile_link([MESH])) == 3
    await lm.close()
    assert opened[1].closed


async def test_link_manager_teardown_removes_only_ours() -> None:
    ipr = FakeIPR()
    lm = _lm(ipr)
    await lm.reconcile([MESH])
    ipr.rules.append(dict(family=AF4, priority=32500, table=200, fwmark=0x40, fwmask=0x60))
    await lm.teardown()
    assert {(r["priority"], r["table"]) for r in ipr.rules} == {(100, 100), (32766, 254), (32500, 200)}
    assert ipr.routes == []
    assert [a for a in ipr.addrs if a[0] == 5] == []
    assert ipr.addrs == [(2, ip_interface("192.0.2.1/24"), 0)]
    assert "kubespan" in ipr.links
    await lm.teardown()  # idempotent
    await lm.teardown(remove_link=True)
    assert "kubespan" not in ipr.links and "eth0" in ipr.links
    await lm.teardown(remove_link=True)


class WatchIPR(FakeIPR):
    """Broadcast side: ``get()`` yields queued batches; an exception in the queue is raised."""

    def __init__(self, batches: asyncio.Queue) -> None:
        super().__init__()
        self.batches = batches
        self.groups = None

    async def __aenter__(self) -> WatchIPR:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def bind(self, groups: int) -> None:
        self.groups = groups

    async def get(self) -> Any:
        batch = await self.batches.get()
        if isinstance(batch, BaseException):
            raise batch
        for msg in batch:
            yield msg


async def test_watch_filters_events_and_resubscribes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "WATCH_RETRY_DELAY", 0.01)
    batches: asyncio.Queue = asyncio.Queue()
    sockets: list[WatchIPR] = []

    def open_() -> WatchIPR:
        s = WatchIPR(batches)
        sockets.append(s)
        return s

    lm = LinkManager()
    lm._open = open_  # type: ignore[method-assign]
    got: asyncio.Queue[NetlinkEvent] = asyncio.Queue()

    async def cb(ev: NetlinkEvent) -> None:
        await got.put(ev)
        if ev.detail == "boom":
            raise RuntimeError("callback errors are logged, not raised")

    ready = asyncio.Event()
    task = asyncio.create_task(lm.watch(cb, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 2)
        assert sockets[0].groups is not None and sockets[0].groups & 0x1  # RTMGRP_LINK
        ev_addr = Msg({"IFA_ADDRESS": "fd7f::1"}, index=5, prefixlen=64, event="RTM_DELADDR")
        noise = Msg({"RTA_TABLE": 254}, table=254, dst_len=8, event="RTM_NEWROUTE")
        ev_rule = Msg({"FRA_PRIORITY": 32500, "FRA_TABLE": 180}, event="RTM_DELRULE")
        await batches.put([noise, ev_addr, noise, ev_rule])
        assert (await asyncio.wait_for(got.get(), 2)).kind == "addr"
        assert (await asyncio.wait_for(got.get(), 2)).kind == "rule"
        # the link is recreated with another index: addresses on the new index are ours
        await batches.put([Msg({"IFLA_IFNAME": "kubespan"}, index=5, event="RTM_DELLINK")])
        assert (await asyncio.wait_for(got.get(), 2)) == NetlinkEvent("link", "del", "kubespan index 5")
        await batches.put(
            [
                Msg({"IFLA_IFNAME": "kubespan"}, index=9, event="RTM_NEWLINK"),
                Msg({"IFA_ADDRESS": "fd7f::1"}, index=9, prefixlen=64, event="RTM_NEWADDR"),
                Msg({"IFA_ADDRESS": "fd7f::1"}, index=5, prefixlen=64, event="RTM_NEWADDR"),
            ]
        )
        assert (await asyncio.wait_for(got.get(), 2)).kind == "link"
        assert (await asyncio.wait_for(got.get(), 2)).detail == "fd7f::1/64 dev kubespan"
        # the old index is another link now: its global address is a node address
        assert (await asyncio.wait_for(got.get(), 2)) == NetlinkEvent("hostaddr", "new", "fd7f::1/64 index 5")
        # a socket error (e.g. ENOBUFS: events lost) -> "resync", then a fresh subscription
        await batches.put(OSError(errno.ENOBUFS, "No buffer space available"))
        ev = await asyncio.wait_for(got.get(), 2)
        assert (ev.kind, ev.action) == ("resync", "resync")
        await batches.put([ev_rule])
        assert (await asyncio.wait_for(got.get(), 2)).kind == "rule"
        assert len(sockets) == 2 and sockets[0].closed
        # a closed socket (an empty read) also resubscribes
        await batches.put([])
        assert (await asyncio.wait_for(got.get(), 2)).kind == "resync"
        assert got.empty()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_notify_accepts_sync_and_async_callbacks() -> None:
    seen: list[str] = []
    await L.notify(lambda ev: seen.append(ev.kind), NetlinkEvent("link", "new"))

    async def acb(ev: NetlinkEvent) -> None:
        seen.append(ev.action)

    await L.notify(acb, NetlinkEvent("link", "del"))

    def bad(ev: NetlinkEvent) -> None:
        raise ValueError("x")

    await L.notify(bad, NetlinkEvent("link", "del"))
    assert seen == ["link", "del"]


# =================================================================================================
# The fakes
# =================================================================================================


async def test_fake_link_manager_models_creation_removal_and_repair() -> None:
    lm = FakeLinkManager()
    assert len(await lm.reconcile([MESH])) == 7 and lm.healthy
    assert await lm.reconcile([MESH]) == []
    events: list[NetlinkEvent] = []
    ready = asyncio.Event()
    task = asyncio.create_task(lm.watch(events.append, ready=ready))
    await ready.wait()
    try:
        await lm.remove_address(MESH)
        assert await lm.reconcile([MESH]) == [f"address kubespan: add {MESH}"]
        await lm.remove_route("inet6")
        assert await lm.reconcile([MESH]) == ["route table 180: add inet6 default dev kubespan mtu 1420"]
        await lm.remove_rule("inet")
        assert await lm.reconcile([MESH]) == ["rule: add inet priority 32500 fwmark 0x40/0x60 lookup 180"]
        await lm.remove_link()
        with pytest.raises(LinkNotFoundError):
            await lm.reconcile([MESH])
        await lm.create_link()
        assert len(await lm.reconcile([MESH])) == 5 and lm.healthy
        assert [(e.kind, e.action) for e in events] == [
            ("addr", "del"),
            ("route", "del"),
            ("rule", "del"),
            ("link", "del"),
            ("link", "new"),
        ]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    lm.fail_next("reconcile_routes", DataplaneError("injected"))
    with pytest.raises(DataplaneError, match="injected"):
        await lm.reconcile([MESH])
    assert await lm.reconcile([MESH]) == []
    await lm.teardown()
    assert not lm.healthy and lm.link_exists and not lm.addresses
    assert ("teardown", False) in lm.calls


async def test_fake_nft_manager_matches_the_real_one() -> None:
    """Same inputs, same change strings and same end state as NftManager on the simulator."""
    sim = NftSim()
    real = NftManager(runner=sim)
    fake = FakeNftManager()
    steps = [
        ["10.1.0.0/24", "fd00::/64"],
        ["10.1.0.0/24", "fd00::/64"],
        ["10.1.0.0/24", "10.2.0.0/24", "10.2.0.0/25"],
        ["10.3.0.0/16", "fd00::/64", "fd01::1"],
        [],
    ]
    for prefixes in steps:
        want = targets(prefixes)
        assert await fake.reconcile(want) == await real.reconcile(want), prefixes
        assert [t.kind for t in fake.transactions] == [t.kind for t in real.transactions]
        assert await fake.read_sets() == await real.read_sets()
    fake.remove_table()
    sim.tables.clear()
    assert await fake.reconcile(targets(["10.0.0.0/8"])) == await real.reconcile(targets(["10.0.0.0/8"]))
    # the fallback
    fake.fail_diffs = 1
    sim.fail.append("Error: injected\n")
    want = targets(["10.0.0.0/9"])
    assert await fake.reconcile(want) == await real.reconcile(want)
    assert [(t.kind, t.ok) for t in fake.transactions] == [(t.kind, t.ok) for t in real.transactions]
    await fake.teardown()
    assert await fake.read_sets() is None
    fake.fail_next("reconcile", NftError("boom"))
    with pytest.raises(NftError):
        await fake.reconcile({})
    assert FakeNftManager.from_config(C.MeshConfig(mtu=1300)).params.mtu == 1300
    assert FakeLinkManager.from_config(C.MeshConfig(routing_table=7)).table == 7


# --- parsed elements are shared objects; an unchanged listing diffs by identity (performance) -----


def test_parsed_elements_are_shared_and_equal_to_ipaddress():
    from kubespan.ipset import IPSet as _IPSet

    a = R.parse_element("10.1.2.3", 4)
    b = R.parse_element({"prefix": {"addr": "10.1.0.0", "len": 16}}, 4)
    c = R.parse_element({"elem": {"val": "fd00::1"}}, 6)
    assert (
        a == [ip_network("10.1.2.3/32")]
        and b == [ip_network("10.1.0.0/16")]
        and c == [ip_network("fd00::1/128")]
    )
    assert R.parse_element("10.1.2.3", 4)[0] is a[0]
    # the same objects the desired side (minimal covers) is built from
    assert _IPSet(["10.1.0.0/16"]).prefixes()[0] is b[0]
    with pytest.raises(ValueError):
        R.parse_element("10.1.2.3/8", 4)  # host bits set: still rejected (strict), never cached
    with pytest.raises(ValueError):
        R.parse_element({"prefix": {"addr": "nope", "len": 8}}, 4)


def test_element_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(R, "_ELEMENTS_MAX", 3)
    monkeypatch.setattr(R, "_elements", {})
    for n in range(10):
        assert R.parse_element(f"192.0.2.{n}", 4) == [ip_network(f"192.0.2.{n}/32")]
        assert len(R._elements) <= 3


def test_diff_sets_same_result_for_equal_lists_in_any_order():
    nets = [ip_network(f"10.0.{n}.0/24") for n in range(5)]
    fresh = [ip_network(f"10.0.{n}.0/24") for n in range(5)]  # equal, not the same objects
    assert R.diff_sets({SET_IPV4: nets}, {SET_IPV4: fresh}) == {}
    assert R.diff_sets({SET_IPV4: nets}, {SET_IPV4: list(reversed(fresh))}) == {}
    d = R.diff_sets({SET_IPV4: nets[:4]}, {SET_IPV4: fresh[1:]})
    assert d == {SET_IPV4: R.SetDiff(add=(fresh[4],), delete=(nets[0],))}
    assert R.diff_sets({}, {SET_IPV6: []}) == {}


async def test_nft_normalization_reused_only_for_equal_input(monkeypatch) -> None:
    sim = NftSim()
    nm = NftManager(runner=sim)
    calls: list[int] = []
    original = R.normalize_desired

    def counting(sets):
        calls.append(1)
        return original(sets)

    monkeypatch.setattr(N, "normalize_desired", counting)
    wanted = targets(["10.0.0.0/25", "10.0.0.128/25", "fd00::/64"])
    await nm.reconcile(wanted)
    await nm.reconcile(targets(["10.0.0.0/25", "10.0.0.128/25", "fd00::/64"]))  # equal lists: reused
    assert len(calls) == 1
    wanted[SET_IPV4].append(ip_network("10.9.0.0/16"))  # the caller's list changed afterwards
    assert await nm.reconcile(wanted) == ["nft set targets_ipv4: add 1, delete 0"]
    assert len(calls) == 2
    assert sim.elements()[SET_IPV4] == [ip_network("10.0.0.0/24"), ip_network("10.9.0.0/16")]
