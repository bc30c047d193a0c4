"""The mesh's nftables ruleset as nft JSON: rendering, parsing ``nft -j list table``, set diffs (pure).

One ``inet`` table with the two target sets and the chains that mark and clamp with Talos's semantics;
every rule carries a hash comment so one listing tells whether the live table is exactly what this
config renders. The chains rule by rule: docs/design/nft-ruleset.md.
:class:`~kubespan.dataplane.nft.NftManager` runs the documents.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from kubespan import constants as C
from kubespan.ipset import IPSet, canonical_network, range_to_prefixes
from spanutil.ipcodec import IPNetwork

FAMILY = "inet"
SET_IPV4 = "targets_ipv4"
SET_IPV6 = "targets_ipv6"
SET_VERSIONS = {SET_IPV4: 4, SET_IPV6: 6}
SET_TYPES = {SET_IPV4: "ipv4_addr", SET_IPV6: "ipv6_addr"}
SET_FLAGS = ("interval",)
CHAIN_PREROUTING = "prerouting"
CHAIN_OUTPUT = "output"
CHAIN_FORWARD = "forward"
# regular chains (no hook) that the output chain's one set lookup per family jumps to
CHAIN_MESH = {4: "mesh_ipv4", 6: "mesh_ipv6"}
PRIO_FILTER = 0
PRIO_MANGLE = -150
COMMENT_PREFIX = "kubespan:"


# --- Rendering -------------------------------------------------------------------------------------


# RulesetParams field -> the MeshConfig field it is (the rest have the same name)
_CONFIG_NAMES = {"table": "nft_table", "ifname": "link_name"}


@dataclass(frozen=True, slots=True)
class RulesetParams:
    """Everything the ruleset depends on (set elements aside), taken from a checked MeshConfig:
    :meth:`from_config` for one already built, :meth:`of` for loose values (checked by MeshConfig's
    rules, like the link manager's). The constructor itself checks nothing."""

    table: str = C.NFT_TABLE
    ifname: str = C.LINK_NAME
    mtu: int = C.MTU
    fwmark_wireguard: int = C.FWMARK_WIREGUARD
    fwmark_force: int = C.FWMARK_FORCE
    fwmark_mask: int = C.FWMARK_MASK
    clamp_forwarded_mss: bool = True
    steering: str = C.STEERING_MARKS

    @classmethod
    def from_config(cls, cfg: C.MeshConfig) -> RulesetParams:
        """The ruleset's part of ``cfg`` (which MeshConfig has checked: nothing is checked again)."""
        return cls(**{f.name: getattr(cfg, _CONFIG_NAMES.get(f.name, f.name)) for f in fields(cls)})

    @classmethod
    def of(
        cls,
        table: str = C.NFT_TABLE,
        *,
        ifname: str = C.LINK_NAME,
        mtu: int = C.MTU,
        fwmark_wireguard: int = C.FWMARK_WIREGUARD,
        fwmark_force: int = C.FWMARK_FORCE,
        fwmark_mask: int = C.FWMARK_MASK,
        clamp_forwarded_mss: bool = True,
        steering: str = C.STEERING_MARKS,
    ) -> RulesetParams:
        """Loose values checked by MeshConfig's rules (``check_mesh_fields``, the one validator, which
        the link manager's loose values go through too; ``ConfigError`` names the MeshConfig field)."""
        params = cls(
            table, ifname, mtu, fwmark_wireguard, fwmark_force, fwmark_mask, clamp_forwarded_mss, steering
        )
        C.check_mesh_fields(
            **{_CONFIG_NAMES.get(f.name, f.name): getattr(params, f.name) for f in fields(cls)}
        )
        return params

    @property
    def mss_ipv4(self) -> int:
        return self.mtu - C.MSS_OVERHEAD_IPV4

    @property
    def mss_ipv6(self) -> int:
        return self.mtu - C.MSS_OVERHEAD_IPV6

    @property
    def mark_clear(self) -> int:
        return ~self.fwmark_mask & C.FWMARK_MAX


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


_MSS = {"tcp option": {"name": "maxseg", "field": "size"}}
_ACCEPT = {"accept": None}


def _daddr_in(version: int) -> dict[str, Any]:
    proto = "ip" if version == 4 else "ip6"
    name = SET_IPV4 if version == 4 else SET_IPV6
    return _match({"payload": {"protocol": proto, "field": "daddr"}}, f"@{name}")


def _wg_mark(p: RulesetParams, op: str = "==") -> dict[str, Any]:
    return _match({"&": [_meta("mark"), p.fwmark_mask]}, p.fwmark_wireguard, op)


def _wg_accept(p: RulesetParams) -> list[dict[str, Any]]:
    return [_wg_mark(p), _ACCEPT]


def _set_mark(p: RulesetParams) -> list[dict[str, Any]]:
    value = {"|": [{"&": [_meta("mark"), p.mark_clear]}, p.fwmark_force]}
    return [{"mangle": {"key": _meta("mark"), "value": value}}, _ACCEPT]


# IPv6 neighbour discovery stays on the link: a node's underlay address is often among a peer's
# AllowedIPs (it is advertised), and a Neighbor Advertisement answering that peer's solicitation is
# unicast to it; marked like other traffic to the peer it would be routed into the tunnel, and the
# peer would never learn our link-layer address (nor reach our WireGuard port).
_ND_TYPES = [
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "nd-redirect",
]


def _nd_accept() -> list[dict[str, Any]]:
    return [_match({"payload": {"protocol": "icmpv6", "field": "type"}}, {"set": _ND_TYPES}), _ACCEPT]


_SYN = _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]}, "syn")


def _clamp(mss: int, *between: dict[str, Any]) -> list[dict[str, Any]]:
    """TCP SYN (not RST) with an MSS above ``mss`` -> MSS ``mss`` (never raises a smaller one).

    The SYN test comes first: every other packet leaves the rule after one header load and compare,
    before ``between`` (the rule's other matches: an interface name, a protocol) is looked at."""
    return [_SYN, *between, _match(_MSS, mss, ">"), {"mangle": {"key": _MSS, "value": mss}}]


def _goto_mesh(version: int) -> list[dict[str, Any]]:
    """The family's one lookup of the target set; a hit continues in that family's mesh chain."""
    return [_daddr_in(version), {"goto": {"target": CHAIN_MESH[version]}}]


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """A chain and its rules; ``type``/``hook``/``prio`` None for a regular chain (reached by a jump)."""

    name: str
    type: str | None
    hook: str | None
    prio: int | None
    rules: tuple[tuple[str, tuple[dict[str, Any], ...]], ...]  # (what, expr)

    @property
    def base(self) -> bool:
        return self.hook is not None


def _rules(*items: tuple[str, list[dict[str, Any]]]) -> tuple[tuple[str, tuple[dict[str, Any], ...]], ...]:
    return tuple((what, tuple(expr)) for what, expr in items)


def chain_specs(p: RulesetParams) -> list[ChainSpec]:
    """The chains, ordered for the packets that are not ours: each family's target set is looked up
    once per chain, and the exemptions that only matter for a target (loopback, neighbour discovery)
    are tested after that lookup, in the family's mesh chain (docs/design/nft-ruleset.md). Steering
    "routes" has none of the marking chains: only the forward clamp (the routes carry the MTU)."""
    chains = _marking_chains(p) if p.steering == C.STEERING_MARKS else []
    if p.clamp_forwarded_mss:
        oif = _match(_meta("oifname"), p.ifname)
        chains.append(
            ChainSpec(
                CHAIN_FORWARD,
                "filter",
                "forward",
                PRIO_MANGLE,
                _rules(
                    ("mss-ipv4", _clamp(p.mss_ipv4, oif, _match(_meta("nfproto"), "ipv4"))),
                    ("mss-ipv6", _clamp(p.mss_ipv6, oif, _match(_meta("nfproto"), "ipv6"))),
                ),
            )
        )
    return chains


def _marking_chains(p: RulesetParams) -> list[ChainSpec]:
    """Steering "marks": prerouting and output mark packets to a target; the mesh chains clamp."""
    lo_accept = [_match(_meta("oifname"), "lo"), _ACCEPT]
    return [
        ChainSpec(
            CHAIN_PREROUTING,
            "filter",
            "prerouting",
            PRIO_FILTER,
            _rules(
                # to a target and not WireGuard's own: marked (the lookup first, then the mark test)
                ("mark-ipv4", [_daddr_in(4), _wg_mark(p, "!="), *_set_mark(p)]),
                ("mark-ipv6", [_daddr_in(6), _wg_mark(p, "!="), *_set_mark(p)]),
            ),
        ),
        ChainSpec(
            CHAIN_OUTPUT,
            "route",
            "output",
            PRIO_FILTER,
            _rules(
                # WireGuard's own packets (every tunnel packet) leave before any lookup
                ("wireguard", _wg_accept(p)),
                ("mesh-ipv4", _goto_mesh(4)),
                ("mesh-ipv6", _goto_mesh(6)),
            ),
        ),
        # reached only by packets to a target (one set lookup in the output chain): the exemptions,
        # then the clamp (SYNs only), then the mark and accept
        ChainSpec(
            CHAIN_MESH[4],
            None,
            None,
            None,
            _rules(("loopback", lo_accept), ("mss", _clamp(p.mss_ipv4)), ("mark", _set_mark(p))),
        ),
        ChainSpec(
            CHAIN_MESH[6],
            None,
            None,
            None,
            _rules(
                ("loopback", lo_accept),
                ("ndp", _nd_accept()),
                ("mss", _clamp(p.mss_ipv6)),
                ("mark", _set_mark(p)),
            ),
        ),
    ]


def rule_comment(chain: str, what: str, expr: Sequence[dict[str, Any]]) -> str:
    digest = hashlib.sha256(json.dumps([chain, list(expr)], sort_keys=True).encode()).hexdigest()[:12]
    return f"{COMMENT_PREFIX}{chain}:{what} {digest}"


def element_json(net: IPNetwork) -> str | dict[str, Any]:
    """A set element: a bare address for a host prefix, else ``{"prefix": ...}`` (never a CIDR string,
    which nft would take for a host name)."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _set_ref(table: str, name: str) -> dict[str, Any]:
    return {"family": FAMILY, "table": table, "name": name}


def _elements_cmd(op: str, table: str, name: str, nets: Iterable[IPNetwork]) -> dict[str, Any]:
    return {op: {"element": {**_set_ref(table, name), "elem": [element_json(n) for n in nets]}}}


def render_structure(p: RulesetParams) -> list[dict[str, Any]]:
    """Commands that add the sets, chains and rules (the table must exist)."""
    cmds: list[dict[str, Any]] = []
    for name in (SET_IPV4, SET_IPV6):
        cmds.append(
            {"add": {"set": {**_set_ref(p.table, name), "type": SET_TYPES[name], "flags": list(SET_FLAGS)}}}
        )
    specs = chain_specs(p)
    # regular chains first: a base chain's goto must find its target in the same transaction
    for ch in sorted(specs, key=lambda c: c.base):
        chain: dict[str, Any] = {"family": FAMILY, "table": p.table, "name": ch.name}
        if ch.base:
            chain.update(type=ch.type, hook=ch.hook, prio=ch.prio, policy="accept")
        cmds.append({"add": {"chain": chain}})
    for ch in specs:
        for what, expr in ch.rules:
            cmds.append(
                {
                    "add": {
                        "rule": {
                            "family": FAMILY,
                            "table": p.table,
                            "chain": ch.name,
                            "comment": rule_comment(ch.name, what, expr),
                            "expr": list(expr),
                        }
                    }
                }
            )
    return cmds


def render_replace(p: RulesetParams, elements: Mapping[str, Sequence[IPNetwork]]) -> dict[str, Any]:
    """One transaction that (re)creates the whole table with these elements.

    ``add table; delete table; add table`` works whether or not the table exists.
    """
    table = {"table": {"family": FAMILY, "name": p.table}}
    cmds: list[dict[str, Any]] = [{"add": table}, {"delete": table}, {"add": table}]
    cmds += render_structure(p)
    for name in (SET_IPV4, SET_IPV6):
        if elements.get(name):
            cmds.append(_elements_cmd("add", p.table, name, elements[name]))
    return {"nftables": cmds}


def render_delete_table(table: str) -> dict[str, Any]:
    """Idempotent delete (``add`` first, so a missing table is not an error)."""
    t = {"table": {"family": FAMILY, "name": table}}
    return {"nftables": [{"add": t}, {"delete": t}]}


@dataclass(frozen=True, slots=True)
class SetDiff:
    add: tuple[IPNetwork, ...] = ()
    delete: tuple[IPNetwork, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.delete)


def diff_sets(
    live: Mapping[str, Iterable[IPNetwork]], desired: Mapping[str, Iterable[IPNetwork]]
) -> dict[str, SetDiff]:
    """Per set: exact elements to delete and to add (only sets that differ)."""
    out: dict[str, SetDiff] = {}
    for name in sorted(set(live) | set(desired)):
        have_items = list(live.get(name, ()))
        want_items = list(desired.get(name, ()))
        if have_items == want_items:  # the usual case, and cheap: shared objects compare by identity
            continue
        # a few elements changed: compare only between the common head and tail (the lists hold
        # no duplicates, and mostly the same objects in the same order)
        head, end_have, end_want = 0, len(have_items), len(want_items)
        while head < min(end_have, end_want) and have_items[head] is want_items[head]:
            head += 1
        while end_have > head and end_want > head and have_items[end_have - 1] is want_items[end_want - 1]:
            end_have -= 1
            end_want -= 1
        have = set(have_items[head:end_have])
        want = set(want_items[head:end_want])
        if have != want:
            out[name] = SetDiff(add=tuple(_sorted(want - have)), delete=tuple(_sorted(have - want)))
    return out


def _sorted(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    return sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


def render_diff(table: str, diffs: Mapping[str, SetDiff]) -> dict[str, Any]:
    """Deletes before adds (so a replacing, overlapping prefix can go in), one transaction."""
    cmds = [_elements_cmd("delete", table, n, d.delete) for n, d in diffs.items() if d.delete]
    cmds += [_elements_cmd("add", table, n, d.add) for n, d in diffs.items() if d.add]
    return {"nftables": cmds}


def render_flush_readd(
    table: str, desired: Mapping[str, Sequence[IPNetwork]], names: Iterable[str]
) -> dict[str, Any]:
    cmds: list[dict[str, Any]] = []
    for name in names:
        cmds.append({"flush": {"set": _set_ref(table, name)}})
        if desired.get(name):
            cmds.append(_elements_cmd("add", table, name, desired[name]))
    return {"nftables": cmds}


def normalize_desired(desired_sets: Mapping[str, Iterable[Any]]) -> dict[str, list[IPNetwork]]:
    """Validate set names and families, collapse overlapping/adjacent prefixes (minimal cover)."""
    out: dict[str, list[IPNetwork]] = {name: [] for name in SET_VERSIONS}
    for name, items in desired_sets.items():
        if name not in SET_VERSIONS:
            raise ValueError(f"unknown nftables set {name!r} (known: {', '.join(SET_VERSIONS)})")
        version = SET_VERSIONS[name]
        nets = []
        for item in items:
            net = (
                item
                if isinstance(item, IPv4Network | IPv6Network)
                else ipaddress.ip_network(item, strict=False)
            )
            if net.version != version:
                raise ValueError(f"set {name}: {net} is not an IPv{version} prefix")
            nets.append(net)
        out[name] = IPSet(nets).prefixes(version)  # type: ignore[assignment]
    return out


def targets(prefixes: Iterable[Any]) -> dict[str, list[IPNetwork]]:
    """Split mixed-family prefixes into the ``{set name: prefixes}`` that :meth:`NftManager.reconcile` takes."""
    out: dict[str, list[IPNetwork]] = {SET_IPV4: [], SET_IPV6: []}
    for item in prefixes:
        net = (
            item if isinstance(item, IPv4Network | IPv6Network) else ipaddress.ip_network(item, strict=False)
        )
        out[SET_IPV4 if net.version == 4 else SET_IPV6].append(net)
    return out


# --- Parsing ``nft -j list table`` -----------------------------------------------------------------


@dataclass(slots=True)
class LiveTable:
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"type", "flags"}
    elements: dict[str, list[IPNetwork]] = field(default_factory=dict)
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"type","hook","prio","policy"}
    rules: dict[str, list[str | None]] = field(default_factory=dict)  # chain -> [comment]


# Listed elements parsed before, by their text: every reconcile lists the same elements, and
# parsing an address with ipaddress costs microseconds. The objects are the shared ones of
# kubespan.ipset, so an unchanged listing compares with the desired prefixes by identity.
_ELEMENTS_MAX = 1 << 15
_elements: dict[str, IPNetwork] = {}


def _element(text: str) -> IPNetwork:
    net = _elements.get(text)
    if net is None:
        net = canonical_network(ipaddress.ip_network(text))
        if len(_elements) >= _ELEMENTS_MAX:
            _elements.clear()
        _elements[text] = net
    return net


def parse_element(elem: Any, version: int) -> list[IPNetwork]:
    """One element of an interval set as listed by nft: address, prefix or range."""
    if isinstance(elem, dict) and "elem" in elem:  # element with options (timeout, counter, ...)
        return parse_element(elem["elem"].get("val"), version)
    if isinstance(elem, str):
        return [_element(elem)]
    if isinstance(elem, dict) and "prefix" in elem:
        pfx = elem["prefix"]
        return [_element(f"{pfx['addr']}/{pfx['len']}")]
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = (ipaddress.ip_address(x) for x in elem["range"])
        return list(range_to_prefixes(int(lo), int(hi), version))
    raise ValueError(f"unexpected nftables set element {elem!r}")


def parse_table(listing: Mapping[str, Any], table: str) -> LiveTable:
    live = LiveTable()
    for obj in listing.get("nftables", []):
        if "set" in obj:
            s = obj["set"]
            if s.get("table") != table or s.get("family") != FAMILY:
                continue
            name = s["name"]
            live.sets[name] = {"type": s.get("type"), "flags": sorted(s.get("flags", []))}
            version = 6 if s.get("type") == "ipv6_addr" else 4
            nets: list[IPNetwork] = []
            for e in s.get("elem", []):
                nets.extend(parse_element(e, version))
            live.elements[name] = nets
        elif "chain" in obj:
            c = obj["chain"]
            if c.get("table") != table or c.get("family") != FAMILY:
                continue
            live.chains[c["name"]] = {k: c.get(k) for k in ("type", "hook", "prio", "policy")}
            live.rules.setdefault(c["name"], [])
        elif "rule" in obj:
            r = obj["rule"]
            if r.get("table") != table or r.get("family") != FAMILY:
                continue
            live.rules.setdefault(r["chain"], []).append(r.get("comment"))
    return live


def structure_mismatch(live: LiveTable, p: RulesetParams) -> str | None:
    """Why the live table is not what ``p`` renders (``None`` when it is)."""
    want_sets = {n: {"type": SET_TYPES[n], "flags": sorted(SET_FLAGS)} for n in SET_VERSIONS}
    if live.sets != want_sets:
        return f"sets differ (have {sorted(live.sets)})"
    specs = chain_specs(p)
    want_chains = {
        ch.name: {"type": ch.type, "hook": ch.hook, "prio": ch.prio, "policy": "accept" if ch.base else None}
        for ch in specs
    }
    if live.chains != want_chains:
        return f"chains differ (have {sorted(live.chains)})"
    for ch in specs:
        want = [rule_comment(ch.name, what, expr) for what, expr in ch.rules]
        if live.rules.get(ch.name, []) != want:
            return f"rules of chain {ch.name} differ"
    return None
