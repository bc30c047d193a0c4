"""The engine's STUN port over :mod:`kubespan.nat.rawstun`: probes from the WireGuard port, marked.

Every probe carries WireGuard's fwmark, so the mesh's own policy routing does not take it into the
tunnel. Host names are resolved once per run (the first address of each family; a name that fails is
tried again at the next discovery). The NAT is classified from one address family, IPv4 when an IPv4
responder answers. Without the raw-socket privilege the report says so (the engine then keeps what
works without STUN).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import replace

from kubespan.nat import rawstun
from kubespan.nat.classify import NatClass, NatReport, Observation, classify
from spanutil.ipcodec import IPAddress, ip_without_scope

__all__ = ["NO_PRIVILEGE", "RawStun"]

NO_PRIVILEGE = "no CAP_NET_RAW (raw sockets are needed to probe from the WireGuard port)"


class RawStun:
    """:class:`~kubespan.ports.StunPort` over raw sockets (needs CAP_NET_RAW, and CAP_NET_ADMIN for
    the fwmark)."""

    def __init__(self, *, fwmark: int = 0, timeout: float = rawstun.TIMEOUT) -> None:
        self.fwmark = fwmark
        self.timeout = timeout
        self._resolved: dict[tuple[str, int], tuple[IPAddress, ...]] = {}

    async def discover(
        self, wg_port: int, servers: Sequence[tuple[str, int]], local_addrs: Sequence[IPAddress]
    ) -> NatReport:
        if not servers:
            return NatReport(NatClass.UNKNOWN, None, (), "no STUN responder configured")
        if not _raw_allowed():
            return NatReport(NatClass.UNKNOWN, None, (), NO_PRIVILEGE)
        targets: list[tuple[IPAddress, int]] = []
        unresolved: list[str] = []
        for host, port in servers:
            try:
                ips = await self._resolve(host, port)
            except OSError as e:
                unresolved.append(f"{host}:{port}: cannot resolve: {e.strerror or e}")
                continue
            targets.extend((ip, port) for ip in ips)
        targets = list(dict.fromkeys(targets))
        observations = await rawstun.probe(wg_port, targets, self.timeout, self.fwmark) if targets else []
        report = classify(_one_family(observations), local_addrs, wg_port)
        if unresolved:
            why = "; ".join(unresolved)
            if not observations:
                why = f"no STUN responder resolved: {why}"
            report = replace(report, error=f"{report.error}; {why}" if report.error and observations else why)
        return report

    async def _resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        """``host``'s addresses (one per family, the resolver's first), resolved once per run."""
        key = (host, port)
        if key in self._resolved:
            return self._resolved[key]
        try:
            ips: tuple[IPAddress, ...] = (ipaddress.ip_address(host),)
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP
            )
            by_family: dict[int, IPAddress] = {}
            for family, _, _, _, addr in infos:
                if family in (socket.AF_INET, socket.AF_INET6):
                    by_family.setdefault(family, ip_without_scope(addr[0]))
            ips = tuple(by_family.values())
            if not ips:
                raise OSError(f"{host}: no IPv4 or IPv6 address") from None
        self._resolved[key] = ips
        return ips


def _one_family(observations: Sequence[Observation]) -> list[Observation]:
    """The observations of one address family: IPv4's when an IPv4 responder answered (NAT is an IPv4
    matter; an IPv6 mapping beside it would read as "depends on the destination"), else IPv6's when
    one answered, else all of them (for the reasons)."""
    for version in (4, 6):
        mine = [o for o in observations if o.responder.ip.version == version]
        if any(o.mapped is not None for o in mine):
            return mine
    return list(observations)


def _raw_allowed() -> bool:
    """Whether this process may open a raw UDP socket (rawstun needs one per probe)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP).close()
    except PermissionError:
        return False
    except OSError:
        return True  # e.g. no IPv4 at all: the probes say what is wrong
    return True
