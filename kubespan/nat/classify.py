"""NAT classification from what several STUN responders saw (pure: values in, a value out).

* ``public``: every answer shows a local address and the WireGuard port itself: nothing translates.
* ``eim``: endpoint-independent mapping: responders on two or more IPs saw the same ip:port, so a
  peer will see it too (the endpoint to publish).
* ``edm``: endpoint-dependent ("symmetric"): the mapping differs per destination; the mapped endpoint
  is what *that* responder saw, not what a peer would see.
* ``unknown``: too few answers to tell (fewer than two responder IPs, and no sign of ``public``).

RFC 4787 terms; shared/reference/nat.md §0 shows which Linux NAT rules give which class.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kubespan.wireguard.types import AddrPort
from spanutil.ipcodec import IPAddress

__all__ = ["NatClass", "NatReport", "Observation", "classify"]


class NatClass(StrEnum):
    PUBLIC = "public"
    EIM = "eim"
    EDM = "edm"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Observation:
    """One responder's answer: the mapped endpoint it saw, or why there is none."""

    responder: AddrPort
    mapped: AddrPort | None = None
    error: str = ""


@dataclass(frozen=True)
class NatReport:
    """The class, the mapped endpoint (None without an answer), the responders that answered, and why the
    class is not better known (empty when it is). Shown in status; ``publishable`` goes to peers."""

    nat_class: NatClass
    mapped: AddrPort | None
    responders: tuple[AddrPort, ...] = ()
    error: str = ""
    observations: tuple[Observation, ...] = field(default=(), compare=False)

    @property
    def publishable(self) -> AddrPort | None:
        """The endpoint peers can use: the mapping when it does not depend on the destination."""
        return self.mapped if self.nat_class in (NatClass.PUBLIC, NatClass.EIM) else None

    def to_dict(self) -> dict[str, object]:
        return {
            "class": str(self.nat_class),
            "mapped": str(self.mapped) if self.mapped else None,
            "responders": [str(r) for r in self.responders],
            "error": self.error or None,
        }


def classify(
    observations: Sequence[Observation], local_addrs: Iterable[IPAddress | str], wg_port: int
) -> NatReport:
    """Classify from ``observations`` (one per responder, answered or not) given this host's addresses and
    WireGuard port."""
    obs = tuple(observations)
    answered = [o for o in obs if o.mapped is not None]
    failed = "; ".join(f"{o.responder}: {o.error or 'no answer'}" for o in obs if o.mapped is None)
    if not answered:
        why = failed or "no STUN responder configured"
        return NatReport(NatClass.UNKNOWN, None, (), why, obs)
    local = {ipaddress.ip_address(a) for a in local_addrs}
    responders = tuple(o.responder for o in answered)
    first = answered[0].mapped
    assert first is not None
    mapped = {o.mapped for o in answered}
    if len(mapped) > 1:
        return NatReport(NatClass.EDM, first, responders, "", obs)
    if first.ip in local and first.port == wg_port:
        return NatReport(NatClass.PUBLIC, first, responders, "", obs)
    if len({o.responder.ip for o in answered}) < 2:
        why = "only one responder IP answered; two are needed to tell endpoint-independent mapping"
        return NatReport(NatClass.UNKNOWN, first, responders, f"{why}; {failed}" if failed else why, obs)
    return NatReport(NatClass.EIM, first, responders, "", obs)
