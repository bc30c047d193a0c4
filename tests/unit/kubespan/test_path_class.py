"""Path labels (kubespan.traversal.classify_path) and the networks they rest on."""

from __future__ import annotations

import ipaddress

import pytest

from kubespan.endpoints import CandidateKind, order_candidates
from kubespan.traversal import classify_path
from kubespan.wireguard.types import AddrPort


def ep(ip: str) -> AddrPort:
    return AddrPort(ipaddress.ip_address(ip), 51820)


@pytest.mark.parametrize(
    ("ip", "label"),
    [
        ("10.1.2.3", "lan"),
        ("172.20.0.1", "lan"),
        ("192.168.1.1", "lan"),
        ("169.254.1.1", "lan"),
        ("fd00::1", "lan"),
        ("fe80::1", "lan"),
        ("100.64.0.1", "direct"),  # carrier-grade NAT space: not a site's LAN
        ("203.0.113.7", "direct"),
        ("2001:db8::1", "direct"),
    ],
)
def test_path_label(ip: str, label: str) -> None:
    assert classify_path(True, ep(ip)) == label


def test_relay_and_down() -> None:
    relay = ep("203.0.113.9")
    assert classify_path(True, relay, relay) == "relay"
    assert classify_path(False, ep("10.0.0.1")) == "none"
    assert classify_path(True, None) == "none"


def test_cgnat_ranks_with_private_endpoints_although_its_path_is_not_lan() -> None:
    """Tried before public ones (a shared carrier network needs no traversal), labelled "direct"."""
    ranked = order_candidates([ep("100.64.0.1"), ep("203.0.113.7")], [ipaddress.ip_interface("192.0.2.5/24")])
    assert [c.kind for c in ranked] == [CandidateKind.PRIVATE, CandidateKind.PUBLIC]
