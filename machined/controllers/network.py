"""Read-only network state (namespace ``network``): LinkStatus, AddressStatus and RouteStatus polled
from netlink, and NodeAddress (``default``, ``current``, ``routed``, ``accumulative``) derived from the
addresses, as Talos names them."""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from machined.runtime import Controller, ControllerContext, Output, weak
from machined.state.catalog import (
    ADDRESS_STATUS,
    LINK_STATUS,
    MACHINE_CONFIG,
    NODE_ADDRESS,
    NS_CONFIG,
    NS_NETWORK,
    ROUTE_STATUS,
)
from spanutil.logs import log_event

from .base import Outputs
from .config import MACHINE_CONFIG_ID, MachineConfigSpec

if TYPE_CHECKING:
    from machined.daemon.netinfo import NetInfo

log = logging.getLogger("controller-runtime.network")

NETWORK_POLL = 60.0


class NetworkStatusController(Controller):
    """Links, addresses and routes of the agent's network namespace: read again whenever the agent
    wakes it (netlink notifications, mesh start and stop) and every ``NETWORK_POLL`` seconds."""

    name = "network.StatusController"
    outputs = (Output(LINK_STATUS), Output(ADDRESS_STATUS), Output(ROUTE_STATUS))
    interval = NETWORK_POLL

    def __init__(self, net: NetInfo) -> None:
        self.net = net
        self.links = Outputs(NS_NETWORK, LINK_STATUS)
        self.addresses = Outputs(NS_NETWORK, ADDRESS_STATUS)
        self.routes = Outputs(NS_NETWORK, ROUTE_STATUS)
        self._failing = False

    async def reconcile(self, ctx: ControllerContext) -> None:
        try:
            links, addresses, routes = await self.net.snapshot()
        except OSError as e:
            if not self._failing:
                log_event(
                    log, "netlink read failed; keeping the last known state", logging.WARNING, error=str(e)
                )
            self._failing = True
            for out in (self.links, self.addresses, self.routes):
                out.keep_all(ctx)
            return
        self._failing = False
        for out, specs in ((self.links, links), (self.addresses, addresses), (self.routes, routes)):
            for id, spec in specs.items():
                await out.put(ctx, id, spec)
            await out.cleanup(ctx)


#: Talos's name for the order below (``nethelpers.AddressSortAlgorithm``: v1 compares addresses, IPv4
#: first, then prefix lengths); NodeAddress specs say which order their lists are in.
SORT_ALGORITHM = "v1"


def _sort_key(text: str) -> tuple[int, int, int]:
    iface = ipaddress.ip_interface(text)
    return iface.ip.version, int(iface.ip), iface.network.prefixlen


class NodeAddressController(Controller):
    """AddressStatus -> NodeAddress. ``current``: global-scope addresses (no loopback, no link-local);
    ``routed``: those not on the mesh link; ``default``: the first routed one; ``accumulative``:
    every current address seen since the agent started."""

    name = "network.NodeAddressController"
    inputs = (weak(NS_NETWORK, ADDRESS_STATUS), weak(NS_CONFIG, MACHINE_CONFIG, MACHINE_CONFIG_ID))
    outputs = (Output(NODE_ADDRESS),)

    def __init__(self) -> None:
        self.out = Outputs(NS_NETWORK, NODE_ADDRESS)
        self._seen: set[str] = set()

    async def reconcile(self, ctx: ControllerContext) -> None:
        mesh_link = "kubespan"
        mc = await ctx.find(NS_CONFIG, MACHINE_CONFIG, MACHINE_CONFIG_ID)
        if mc is not None and isinstance(mc.spec, MachineConfigSpec):
            mesh_link = mc.spec.config.mesh().config.link_name
        current: list[str] = []
        routed: list[str] = []
        for r in await ctx.list(NS_NETWORK, ADDRESS_STATUS):
            s = r.spec
            try:
                iface = ipaddress.ip_interface(s["address"])
            except (KeyError, ValueError):
                continue
            if iface.ip.is_loopback or iface.ip.is_link_local or s.get("scope") not in ("global", "site"):
                continue
            current.append(s["address"])
            if s.get("linkName") != mesh_link:
                routed.append(s["address"])
        current.sort(key=_sort_key)
        routed.sort(key=_sort_key)
        self._seen.update(current)
        for id, addresses in (
            ("current", current),
            ("routed", routed),
            ("default", routed[:1]),
            ("accumulative", sorted(self._seen, key=_sort_key)),
        ):
            await self.out.put(ctx, id, {"addresses": addresses, "sortAlgorithm": SORT_ALGORITHM})
        await self.out.cleanup(ctx)
