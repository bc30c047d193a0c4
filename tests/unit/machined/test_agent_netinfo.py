"""Network status from rtnetlink messages, the live dump, and the rate-limited wake-up."""

from __future__ import annotations

import asyncio

from machined.daemon.agent import RateLimitedWake
from machined.daemon.netinfo import NetlinkInfo, address_spec, link_spec, route_spec


class Msg(dict):
    """Shaped like a pyroute2 message: ``get`` finds header fields and attributes alike."""


def test_link_address_and_route_specs():
    name, link = link_spec(
        Msg(index=2, ifi_type=1, flags=0x1 | 0x2 | 0x40 | 0x1000 | 0x10000, IFLA_IFNAME="eth0",
            IFLA_ADDRESS="2e:1a:b6:53:81:69", IFLA_MTU=1500, IFLA_OPERSTATE="UP", IFLA_CARRIER=1,
            IFLA_LINKINFO=Msg(IFLA_INFO_KIND="veth"))
    )  # fmt: skip
    assert name == "eth0"
    assert link["flags"] == "UP,BROADCAST,RUNNING,MULTICAST,LOWER_UP"
    assert (link["type"], link["kind"], link["operationalState"], link["linkState"]) == (
        "ether",
        "veth",
        "up",
        True,
    )
    names = {2: "eth0", 5: "kubespan"}
    aid, addr = address_spec(
        Msg(index=2, family=2, prefixlen=24, scope=0, IFA_LOCAL="10.1.0.11", IFA_FLAGS=0x80), names
    )
    assert aid == "eth0/10.1.0.11/24"
    assert (addr["family"], addr["scope"], addr["flags"], addr["linkName"]) == (
        "inet4",
        "global",
        "permanent",
        "eth0",
    )
    assert address_spec(Msg(index=2, family=2), names) is None
    rid, route = route_spec(
        Msg(family=2, dst_len=0, table=254, proto=3, scope=0, type=1, RTA_TABLE=254, RTA_GATEWAY="10.1.0.1",
            RTA_OIF=2, RTA_PRIORITY=100),
        names,
    )  # fmt: skip
    assert rid == "main/inet4/10.1.0.1//100"
    assert (route["gateway"], route["outLinkName"], route["protocol"], route["type"]) == (
        "10.1.0.1", "eth0", "boot", "unicast",
    )  # fmt: skip
    rid, route = route_spec(
        Msg(family=10, dst_len=64, table=254, proto=2, scope=0, type=1, RTA_DST="fd00::", RTA_OIF=5), names
    )
    assert rid == "main/inet6//fd00::/64/0/kubespan" and route["dst"] == "fd00::/64"


async def test_a_live_dump_of_this_namespace():
    net = NetlinkInfo()
    try:
        links, addresses, routes = await net.snapshot()
    finally:
        await net.close()
    assert links["lo"]["type"] == "loopback"
    assert isinstance(addresses, dict) and isinstance(routes, dict)


async def test_rate_limited_wake_defers_to_the_end_of_the_window():
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    w = RateLimitedWake(lambda: calls.append(loop.time()), 0.2)
    w()  # first: at once
    for _ in range(5):
        w()  # inside the window: one deferred wake
    assert len(calls) == 1
    await asyncio.sleep(0.3)
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.19
    w.cancel()
