"""IP addresses: the type aliases (defined here only) and the one byte<->address codec.

Binary form as in Talos's protobufs (Go's ``netip.Addr.AsSlice``): 4 raw bytes for IPv4, 16 for IPv6.
"""

from __future__ import annotations

import ipaddress

__all__ = [
    "IPAddress",
    "IPInterface",
    "IPNetwork",
    "ip_from_bytes",
    "ip_to_bytes",
    "ip_without_scope",
    "is_ip_literal",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def ip_to_bytes(ip: IPAddress | str) -> bytes:
    """Binary form of an IP address: 4 bytes for IPv4, 16 for IPv6."""
    return ipaddress.ip_address(ip).packed


def ip_from_bytes(raw: bytes) -> IPAddress:
    """Parse a 4- or 16-byte binary IP. IPv4-mapped IPv6 stays IPv6 (as Go's ``netip`` keeps it).

    Raises ``ValueError`` for any other length.
    """
    if len(raw) == 4:
        return ipaddress.IPv4Address(bytes(raw))
    if len(raw) == 16:
        return ipaddress.IPv6Address(bytes(raw))
    raise ValueError(f"binary IP address must be 4 or 16 bytes, got {len(raw)}")


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (not a name): TLS checks it as an IP SAN."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ip_without_scope(host: object) -> IPAddress:
    """Parse ``host`` (a socket address's host part) without its IPv6 zone: ``fe80::1%eth0`` → ``fe80::1``.

    A zone makes ``ipaddress`` values unequal to the same address without one; sources from
    ``recvfrom``/``getaddrinfo`` carry it on link-local addresses. Raises ``ValueError`` if not an IP.
    """
    return ipaddress.ip_address(str(host).split("%", 1)[0])


def is_node_address(ip: IPAddress) -> bool:
    """Whether ``ip`` on one of the node's links can be a node address (an endpoint to publish, a
    change worth reacting to): not loopback and not link-local (their scope is the link or the host)."""
    return not (ip.is_loopback or ip.is_link_local)
