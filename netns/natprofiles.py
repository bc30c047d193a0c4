"""The six NAT profiles of the lab (issue 14, ``shared/reference/nat.md`` §0, §2, §4), as data.

Each profile says how to build it (``routers``, innermost first, each one ``netns.nat`` ruleset) and how it
must then behave for the WireGuard port (``mapping``, ``filtering``, ``wan_input_drop``, ``layers``), so a
lab test can check the built routers against the declaration, and later tests can compute from the same
data which pairs can connect directly (:func:`direct_possible`, the rule of nat.md §2).

========  =======================================================  =======  =========  ====  ======
profile   routers (innermost first)                                mapping  filtering  drop  layers
========  =======================================================  =======  =========  ====  ======
open      none: the node holds a public address                    none     open       no    0
forward   CPE: ``masquerade`` + dnat of udp 51820, firewall        eim      open       yes   1
easy      ``masquerade``, no firewall (the pollution case)         eim      apdf       no    1
easy-fw   ``masquerade`` + ``ct state new drop`` on the WAN        eim      apdf       yes   1
hard      ``masquerade fully-random`` + firewall                   edm      apdf       yes   1
cgnat     easy-fw CPE behind an EIM carrier NAT with firewall      eim      apdf       yes   2
========  =======================================================  =======  =========  ====  ======

``filtering`` is what reaches the node on the WireGuard port after it sent from that port: ``open`` (any
source), ``adf`` (only addresses it sent to; no lab profile has it) or ``apdf`` (only the exact
``ip:port`` it sent to, what Linux ``masquerade`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

WG_PORT = 51820

Mapping = Literal["none", "eim", "edm"]
Filtering = Literal["open", "adf", "apdf"]
Basis = Literal["measured", "reasoned"]


@dataclass(frozen=True)
class RouterSpec:
    """One NAT router of a profile: ``nat`` as ``netns.nat.ruleset`` takes it, the CPE ``firewall``
    (drop new inbound connections on the WAN) and whether udp ``WG_PORT`` is forwarded to the node."""

    nat: str | None
    firewall: bool
    forward_wg_port: bool = False


@dataclass(frozen=True)
class NatProfile:
    """A lab NAT type: how to build it and how the WireGuard port must behave behind it."""

    name: str
    summary: str
    mapping: Mapping
    filtering: Filtering
    wan_input_drop: bool  # unsolicited inbound is dropped before conntrack keeps it (no pollution)
    routers: tuple[RouterSpec, ...]  # innermost (the node's gateway) first

    @property
    def layers(self) -> int:
        """NAT routers between the node and the internet."""
        return len(self.routers)

    @property
    def port_preserved(self) -> bool:
        """The node's source port is the port the internet sees (while the tuple is free)."""
        return self.mapping != "edm"

    @property
    def keeps_port_after_stray_inbound(self) -> bool:
        """An unsolicited packet from a remote before the node's first packet to it leaves the node's
        port unchanged for that remote (nat.md §0: false for a bare ``masquerade`` without input drop)."""
        if self.mapping == "edm":
            return False
        return self.mapping == "none" or self.filtering == "open" or self.wan_input_drop


_CPE = RouterSpec("eim", firewall=True)

PROFILES: dict[str, NatProfile] = {
    p.name: p
    for p in (
        NatProfile("open", "public address, no NAT", "none", "open", False, ()),
        NatProfile(
            "forward",
            "CPE with udp 51820 forwarded to the node (Talos's port-forward case)",
            "eim",
            "open",
            True,
            (RouterSpec("eim", firewall=True, forward_wg_port=True),),
        ),
        NatProfile(
            "easy",
            "endpoint-independent mapping, port-restricted filtering, no WAN input drop",
            "eim",
            "apdf",
            False,
            (RouterSpec("eim", firewall=False),),
        ),
        NatProfile(
            "easy-fw",
            "easy behind a CPE firewall (ct state new drop on the WAN)",
            "eim",
            "apdf",
            True,
            (_CPE,),
        ),
        NatProfile(
            "hard",
            "symmetric: masquerade fully-random, a new port per destination",
            "edm",
            "apdf",
            True,
            (RouterSpec("symmetric", firewall=True),),
        ),
        NatProfile(
            "cgnat",
            "easy CPE behind an endpoint-independent carrier NAT (two NATs in series)",
            "eim",
            "apdf",
            True,
            (_CPE, RouterSpec("eim", firewall=True)),
        ),
    )
}


def profile(name: str | NatProfile) -> NatProfile:
    """The profile called ``name`` (a profile passes through); ValueError names the known ones."""
    if isinstance(name, NatProfile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown NAT profile {name!r}; known: {', '.join(PROFILES)}") from None


class Verdict(NamedTuple):
    """Whether two nodes can reach each other directly, why, and whether the lab measured it."""

    possible: bool
    reason: str
    basis: Basis


# Pairs nat.md §0 measured (unordered); every other verdict follows from the §2 rule by reasoning.
_MEASURED = {
    frozenset({"easy-fw"}),  # both masquerade + input drop: handshake 21 ms, any order
    frozenset({"easy"}),  # no input drop: deadlock without openers, handshake with TTL-2 openers
    frozenset({"hard", "easy-fw"}),  # EDM <-> EIM+APDF: no handshake in 20 s
    frozenset({"hard", "easy"}),
    frozenset({"hard", "forward"}),  # EDM <-> port-forward: 121 ms
}


def direct_verdict(a: str | NatProfile, b: str | NatProfile) -> Verdict:
    """nat.md §2: direct works for anything <-> open/port-forward/1:1, EIM <-> EIM (either filtering) and
    EDM <-> EIM with address-only filtering (reasoned, untested); it fails for EDM <-> EIM+APDF and
    EDM <-> EDM. Symmetric in ``a`` and ``b``. Timing (input drop, openers) decides how fast, not whether."""
    pa, pb = profile(a), profile(b)
    basis: Basis = "measured" if frozenset({pa.name, pb.name}) in _MEASURED else "reasoned"
    for p in (pa, pb):
        if p.filtering == "open":
            return Verdict(True, f"{p.name} accepts any source on the WireGuard port", basis)
    if pa.mapping != "edm" and pb.mapping != "edm":
        return Verdict(True, "both map endpoint-independently", basis)
    if pa.mapping == "edm" and pb.mapping == "edm":
        return Verdict(False, "both behind symmetric NAT", basis)
    eim = pb if pa.mapping == "edm" else pa
    if eim.filtering == "adf":
        return Verdict(True, f"{eim.name} filters by address only, so a symmetric peer gets in", "reasoned")
    return Verdict(False, f"symmetric NAT against {eim.name}'s port-restricted filtering", basis)


def direct_possible(a: str | NatProfile, b: str | NatProfile) -> bool:
    """True when ``a`` and ``b`` can exchange WireGuard packets without a relay (see direct_verdict)."""
    return direct_verdict(a, b).possible
