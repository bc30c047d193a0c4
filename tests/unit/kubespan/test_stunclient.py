"""RawStun, the engine's STUN port over rawstun: resolution once per run, the fwmark, one address family
for the class, and the reasons when nothing can be probed (rawstun's probes are replaced here)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import pytest

from kubespan.nat import rawstun, stunclient
from kubespan.nat.classify import Observation
from kubespan.nat.stunclient import NO_PRIVILEGE, RawStun
from kubespan.wireguard.types import AddrPort

LOCAL = (ipaddress.ip_address("10.0.0.5"),)


class Probes:
    """Stands in for rawstun.probe: records its arguments, answers from ``seen`` (responder -> mapped)."""

    def __init__(self, seen: dict[str, str]) -> None:
        self.seen = seen
        self.calls: list[tuple[int, list[tuple[Any, int]], int]] = []

    async def __call__(self, wg_port: int, servers: Any, timeout: float, fwmark: int) -> list[Observation]:  # noqa: ASYNC109
        servers = list(servers)
        self.calls.append((wg_port, servers, fwmark))
        out = []
        for ip, port in servers:
            where = AddrPort(ipaddress.ip_address(ip), port)
            mapped = self.seen.get(str(where))
            out.append(
                Observation(where, AddrPort.parse(mapped) if mapped else None, "" if mapped else "no answer")
            )
        return out


@pytest.fixture
def allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stunclient, "_raw_allowed", lambda: True)


async def test_no_servers_and_no_privilege_are_reasons_not_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    report = await RawStun().discover(51820, (), LOCAL)
    assert (str(report.nat_class), report.error) == ("unknown", "no STUN responder configured")
    monkeypatch.setattr(stunclient, "_raw_allowed", lambda: False)
    report = await RawStun().discover(51820, [("192.0.2.1", 3478)], LOCAL)
    assert report.error == NO_PRIVILEGE and report.publishable is None


async def test_names_resolve_once_and_probes_carry_the_fwmark(
    monkeypatch: pytest.MonkeyPatch, allowed: None
) -> None:
    lookups: list[str] = []

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        lookups.append(host)
        return [
            (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.1", port)),
            (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.99", port)),  # only the first is kept
            (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("2001:db8::1", port, 0, 0)),
        ]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    probes = Probes(
        {
            "192.0.2.1:3478": "198.51.100.7:40000",
            "192.0.2.2:3478": "198.51.100.7:40000",
            "[2001:db8::1]:3478": "[2001:db8::5]:51820",  # IPv6 has no NAT: another "mapping"
        }
    )
    monkeypatch.setattr(rawstun, "probe", probes)
    stun = RawStun(fwmark=0x20)
    servers = [("stun.example.net", 3478), ("192.0.2.2", 3478)]
    for _ in range(2):
        report = await stun.discover(51820, servers, LOCAL)
        # classified from IPv4 alone: the IPv6 answer would otherwise read as a destination-dependent mapping
        assert str(report.nat_class) == "eim" and str(report.publishable) == "198.51.100.7:40000"
    assert lookups == ["stun.example.net"]
    wg_port, targets, fwmark = probes.calls[-1]
    assert (wg_port, fwmark) == (51820, 0x20)
    assert [(str(ip), port) for ip, port in targets] == [
        ("192.0.2.1", 3478),
        ("2001:db8::1", 3478),
        ("192.0.2.2", 3478),
    ]


async def test_an_unresolvable_name_is_named_in_the_reason(
    monkeypatch: pytest.MonkeyPatch, allowed: None
) -> None:
    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(rawstun, "probe", Probes({}))
    report = await RawStun().discover(51820, [("nowhere.invalid", 3478)], LOCAL)
    assert report.publishable is None
    assert (
        report.error
        == "no STUN responder resolved: nowhere.invalid:3478: cannot resolve: Name or service not known"
    )
