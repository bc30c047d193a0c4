"""What the mesh needs to know about the host: its links (for the MAC) and addresses.

An adapter over rtnetlink (pyroute2); ``StaticHost`` is the in-memory stand-in
for unit tests.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubespan.identity import LinkInfo
from spanutil.ipcodec import IPInterface, is_node_address


class HostInfo(Protocol):
    async def links(self) -> list[LinkInfo]: ...

    async def addresses(self, exclude_links: Sequence[str] = ()) -> list[IPInterface]: ...

    async def close(self) -> None: ...


@dataclass
class StaticHost:
    link_list: list[LinkInfo] = field(default_factory=list)
    address_list: list[IPInterface] = field(default_factory=list)

    async def links(self) -> list[LinkInfo]:
        return list(self.link_list)

    async def addresses(self, exclude_links: Sequence[str] = ()) -> list[IPInterface]:
        return list(self.address_list)

    async def close(self) -> None:
        return None


# Link kinds that are not physical NICs (everything with IFLA_LINKINFO is virtual).
def _link_info(msg: Any) -> LinkInfo:
    name = msg.get("IFLA_IFNAME") or ""
    mac_text = msg.get("IFLA_ADDRESS")
    mac = bytes.fromhex(mac_text.replace(":", "")) if mac_text and len(mac_text) == 17 else None
    kind = None
    info = msg.get("IFLA_LINKINFO")
    if info is not None:
        kind = info.get("IFLA_INFO_KIND")
    loopback = name == "lo" or bool(msg.get("flags", 0) & 0x8)
    return LinkInfo(name=name, mac=mac, physical=kind is None and not loopback, loopback=loopback)


class RtnlDumps:
    """Whole-table dumps (``link``, ``addr``, ``route``) of the current network namespace over one
    rtnetlink socket, opened on first use; a socket that fails is closed and the next dump opens
    another. Shared by the mesh's host view and machined's network resources."""

    def __init__(self) -> None:
        self._ipr: Any = None

    def _sock(self) -> Any:
        if self._ipr is None:
            from pyroute2.iproute import AsyncIPRoute

            self._ipr = AsyncIPRoute()
        return self._ipr

    async def _dump(self, method: str) -> list[Any]:
        try:
            return [m async for m in await getattr(self._sock(), method)("dump")]
        except (OSError, EOFError):
            await self.close()
            raise

    async def close(self) -> None:
        if self._ipr is not None:
            try:
                self._ipr.close()
            finally:
                self._ipr = None


class NetlinkHost(RtnlDumps):
    """Reads links and addresses of the current network namespace."""

    async def links(self) -> list[LinkInfo]:
        return [_link_info(m) for m in await self._dump("link")]

    async def addresses(self, exclude_links: Sequence[str] = ()) -> list[IPInterface]:
        """Global addresses of every link but ``exclude_links`` (absent ones are ignored). The
        excluded links' indexes come from if_nametoindex: a link dump (every 2 s in an idle agent)
        costs more than the address dump itself."""
        skip: set[int] = set()
        for name in exclude_links:
            try:
                skip.add(socket.if_nametoindex(name))
            except OSError:  # no such link
                pass
        out: list[IPInterface] = []
        for m in await self._dump("addr"):
            if m.get("index") in skip:
                continue
            addr = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
            if not addr:
                continue
            iface = ipaddress.ip_interface(f"{addr}/{m.get('prefixlen')}")
            if not is_node_address(iface.ip):
                continue
            out.append(iface)
        return out
