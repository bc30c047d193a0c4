"""nftables rulesets for lab routers, after ``shared/reference/nat.md`` §0 and §4 (measured on the CI kernel).

* ``eim``: ``oifname WAN masquerade``: endpoint-independent mapping that keeps the inside source port when
  it is free (``nf_nat_core.c`` ``get_unique_tuple``), with address-and-port-dependent filtering ("easy").
* ``symmetric``: ``oifname WAN masquerade fully-random``: a new random external port per destination
  (endpoint-dependent mapping, "hard").
* ``None``: plain routing, no address translation.

The firewall (on by default whenever there is NAT) is the CPE rule nat.md insists on: new connections
arriving on the WAN side are dropped, both to the router itself and through it, except port forwards.
Without it a stray inbound packet leaves an UNREPLIED conntrack entry that makes the NAT pick a random port
for the next flow to that remote (nat.md §0), so EIM would no longer look EIM.

The named lab NAT types (open, forward, easy, easy-fw, hard, cgnat) combine these rulesets: see
``netns.natprofiles`` and ``Lab.site``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

NAT_TYPES = ("eim", "symmetric", None)
NAT_TABLE = "kslab_nat"
FW_TABLE = "kslab_fw"


@dataclass(frozen=True)
class PortForward:
    """DNAT ``proto`` packets to the router's external ``port`` onto ``to`` (``"ip:port"`` or ``"ip"``)."""

    port: int
    to: str
    proto: str = "udp"

    def target(self) -> str:
        host, _, port = self.to.rpartition(":") if self.to.count(":") == 1 else (self.to, "", "")
        ipaddress.IPv4Address(host)  # NAT is modelled for IPv4 only
        return f"{host}:{port or self.port}"

    def rule(self, wan: str) -> str:
        if self.proto not in ("udp", "tcp"):
            raise ValueError(f"port forward protocol must be udp or tcp, not {self.proto!r}")
        return f'iifname "{wan}" {self.proto} dport {int(self.port)} dnat to {self.target()}'


def ruleset(nat: str | None, wan: str, forwards: Sequence[PortForward] = (), firewall: bool = True) -> str:
    """The whole router ruleset as one ``nft -f`` transaction."""
    if nat not in NAT_TYPES:
        raise ValueError(f"nat must be one of {NAT_TYPES}, not {nat!r}")
    masq = {"eim": "masquerade", "symmetric": "masquerade fully-random", None: ""}[nat]
    lines = [
        f"table ip {NAT_TABLE} {{",
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;",
        *(f"    {f.rule(wan)}" for f in forwards),
        "  }",
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;",
        *([f'    oifname "{wan}" {masq}'] if masq else []),
        "  }",
        "}",
    ]
    if firewall:
        lines += [
            f"table inet {FW_TABLE} {{",
            "  chain input { type filter hook input priority filter; policy accept;",
            f'    iifname "{wan}" ct state new counter drop',
            "  }",
            "  chain forward { type filter hook forward priority filter; policy accept;",
            f'    iifname "{wan}" ct state new ct status dnat accept',
            f'    iifname "{wan}" ct state new counter drop',
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"
