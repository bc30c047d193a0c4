"""Read-only network state from rtnetlink: links, addresses and routes as plain resource specs.

:class:`NetlinkInfo` dumps the agent's network namespace through pyroute2 and turns each message into
the spec Talos publishes (``LinkStatus``, ``AddressStatus``, ``RouteStatus``; camelCase keys, a
subset of Talos's fields). :class:`StaticNetInfo` is the in-memory stand-in for tests.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubespan.hostinfo import RtnlDumps

Spec = dict[str, Any]

_IFF = (
    (0x1, "UP"),
    (0x2, "BROADCAST"),
    (0x8, "LOOPBACK"),
    (0x10, "POINTOPOINT"),
    (0x40, "RUNNING"),
    (0x80, "NOARP"),
    (0x100, "PROMISC"),
    (0x1000, "MULTICAST"),
    (0x10000, "LOWER_UP"),
)
_ARPHRD = {1: "ether", 772: "loopback", 65534: "none", 776: "sit", 768: "ipip", 823: "ip6gre"}
# RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
_GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400
_SCOPE = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
_TABLE = {253: "default", 254: "main", 255: "local"}
_PROTO = {0: "unspecified", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 16: "dhcp", 186: "bgp"}
_RTYPE = {
    0: "unspecified",
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
}


def _flags(value: int) -> str:
    return ",".join(name for bit, name in _IFF if value & bit)


def _family(af: int) -> str:
    return "inet6" if af == 10 else "inet4"


class NetInfo(Protocol):
    async def links(self) -> dict[str, Spec]: ...  # id (link name) -> LinkStatus spec

    async def addresses(self) -> dict[str, Spec]: ...  # id (link/address) -> AddressStatus spec

    async def routes(self) -> dict[str, Spec]: ...  # id -> RouteStatus spec

    async def snapshot(self) -> tuple[dict[str, Spec], dict[str, Spec], dict[str, Spec]]: ...

    async def close(self) -> None: ...


def link_spec(m: Any) -> tuple[str, Spec]:
    name = m.get("IFLA_IFNAME") or f"if{m.get('index')}"
    info = m.get("IFLA_LINKINFO")
    kind = (info.get("IFLA_INFO_KIND") if info is not None else None) or ""
    return name, {
        "index": m.get("index"),
        "type": _ARPHRD.get(m.get("ifi_type"), str(m.get("ifi_type"))),
        "linkIndex": m.get("IFLA_LINK") or 0,
        "flags": _flags(m.get("flags", 0)),
        "hardwareAddr": m.get("IFLA_ADDRESS") or "",
        "broadcastAddr": m.get("IFLA_BROADCAST") or "",
        "mtu": m.get("IFLA_MTU") or 0,
        "queueDisc": m.get("IFLA_QDISC") or "",
        "operationalState": str(m.get("IFLA_OPERSTATE") or "unknown").lower(),
        "kind": kind,
        "linkState": bool(m.get("IFLA_CARRIER")),
    }


def address_spec(m: Any, names: dict[int, str]) -> tuple[str, Spec] | None:
    addr = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
    if not addr:
        return None
    prefix = f"{addr}/{m.get('prefixlen')}"
    link = names.get(m.get("index"), f"if{m.get('index')}")
    flags = m.get("IFA_FLAGS", m.get("flags", 0)) or 0
    return f"{link}/{prefix}", {
        "address": prefix,
        "local": m.get("IFA_LOCAL") or "",
        "broadcast": m.get("IFA_BROADCAST") or "",
        "linkIndex": m.get("index"),
        "linkName": link,
        "family": _family(m.get("family", 2)),
        "scope": _SCOPE.get(m.get("scope", 0), str(m.get("scope"))),
        "flags": "permanent" if flags & 0x80 else "",
    }


def route_spec(m: Any, names: dict[int, str]) -> tuple[str, Spec]:
    fam = m.get("family", 2)
    dst = m.get("RTA_DST")
    dst_text = f"{dst}/{m.get('dst_len')}" if dst else ""
    table_no = m.get("RTA_TABLE") or m.get("table") or 0
    table = _TABLE.get(table_no, str(table_no))
    gw = m.get("RTA_GATEWAY") or ""
    prio = m.get("RTA_PRIORITY") or 0
    oif = m.get("RTA_OIF") or 0
    spec = {
        "family": _family(fam),
        "dst": dst_text,
        "src": m.get("RTA_PREFSRC") or "",
        "gateway": gw,
        "outLinkIndex": oif,
        "outLinkName": names.get(oif, ""),
        "table": table,
        "priority": prio,
        "scope": _SCOPE.get(m.get("scope", 0), str(m.get("scope"))),
        "type": _RTYPE.get(m.get("type", 0), str(m.get("type"))),
        "protocol": _PROTO.get(m.get("proto", 0), str(m.get("proto"))),
    }
    rid = f"{table}/{_family(fam)}/{gw}/{dst_text}/{prio}"
    if spec["type"] != "unicast" or not gw:
        rid += f"/{names.get(oif, '')}"  # several local/link routes share everything but the link
    return rid, spec


class NetlinkInfo(RtnlDumps):
    """Dumps of the current network namespace (one rtnetlink socket, opened lazily), and
    :meth:`watch` for change notifications (links, addresses, routes)."""

    async def _names(self) -> dict[int, str]:
        return {m.get("index"): m.get("IFLA_IFNAME") for m in await self._dump("link")}

    async def links(self) -> dict[str, Spec]:
        return dict(link_spec(m) for m in await self._dump("link"))

    async def addresses(self) -> dict[str, Spec]:
        names = await self._names()
        out: dict[str, Spec] = {}
        for m in await self._dump("addr"):
            item = address_spec(m, names)
            if item is not None:
                out[item[0]] = item[1]
        return out

    async def routes(self) -> dict[str, Spec]:
        names = await self._names()
        return dict(route_spec(m, names) for m in await self._dump("route"))

    async def snapshot(self) -> tuple[dict[str, Spec], dict[str, Spec], dict[str, Spec]]:
        """Links, addresses and routes from one dump of each."""
        link_msgs = await self._dump("link")
        names = {m.get("index"): m.get("IFLA_IFNAME") for m in link_msgs}
        links = dict(link_spec(m) for m in link_msgs)
        addresses: dict[str, Spec] = {}
        for m in await self._dump("addr"):
            item = address_spec(m, names)
            if item is not None:
                addresses[item[0]] = item[1]
        routes = dict(route_spec(m, names) for m in await self._dump("route"))
        return links, addresses, routes

    async def watch(self, callback: Callable[[], None], *, retry: float = 1.0) -> None:
        """Call ``callback()`` after every burst of rtnetlink notifications about links, addresses or
        routes, and once after each (re)subscription (events may have been missed). The messages are
        not decoded: the callback only learns that something changed. Runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            except OSError:
                await asyncio.sleep(retry)
                continue
            changed = asyncio.Event()
            broken: list[OSError] = []

            def readable(
                sock: socket.socket = sock, changed: asyncio.Event = changed, broken: list[OSError] = broken
            ) -> None:
                try:
                    while sock.recv(1 << 16):
                        pass
                except BlockingIOError:
                    pass
                except OSError as e:
                    if e.errno != errno.ENOBUFS:  # an overrun only means we missed some: re-read anyway
                        broken.append(e)
                changed.set()

            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.bind((0, _GROUPS))
                loop.add_reader(sock.fileno(), readable)
                try:
                    callback()
                    while not broken:
                        await changed.wait()
                        changed.clear()
                        callback()
                finally:
                    loop.remove_reader(sock.fileno())
            except OSError:
                pass
            finally:
                sock.close()
            await asyncio.sleep(retry)


@dataclass
class StaticNetInfo:
    """Fixed specs, for tests."""

    link_specs: dict[str, Spec] = field(default_factory=dict)
    address_specs: dict[str, Spec] = field(default_factory=dict)
    route_specs: dict[str, Spec] = field(default_factory=dict)

    async def links(self) -> dict[str, Spec]:
        return dict(self.link_specs)

    async def addresses(self) -> dict[str, Spec]:
        return dict(self.address_specs)

    async def routes(self) -> dict[str, Spec]:
        return dict(self.route_specs)

    async def close(self) -> None:
        return None

    async def snapshot(self) -> tuple[dict[str, Spec], dict[str, Spec], dict[str, Spec]]:
        return await self.links(), await self.addresses(), await self.routes()

    def add_address(self, link: str, cidr: str, scope: str = "global") -> None:
        iface = ipaddress.ip_interface(cidr)
        self.address_specs[f"{link}/{cidr}"] = {
            "address": cidr,
            "local": str(iface.ip),
            "broadcast": "",
            "linkIndex": 0,
            "linkName": link,
            "family": "inet6" if iface.version == 6 else "inet4",
            "scope": scope,
            "flags": "permanent",
        }
