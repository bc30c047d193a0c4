"""The mesh link's addresses, the table-180 default routes and the fwmark rules, over rtnetlink.

Everything goes through pyroute2's :class:`~pyroute2.AsyncIPRoute`. Every
``reconcile_*`` method is level-triggered and idempotent: it reads the live
state first and sends only what differs, returning a human-readable list of
the changes it made (empty when nothing changed). What is "ours":

- **addresses**: every address on the mesh link except IPv6 link-local ones
  (the kernel's autoconf); the link itself belongs to the WireGuard backend and
  is never created here (a missing link raises :class:`LinkNotFoundError`) and
  only removed by ``teardown(remove_link=True)``;
- **routes**: the IPv4 and IPv6 *default* routes in our routing table; other
  routes in that table (say an operator's LAN bypass) are left alone;
- **rules**: rules at our priority that look up our table. Every other rule
  is never touched.

The pure helpers (``plan_*``, ``parse_*``, :func:`classify_event`) hold the
decisions and are unit-tested without root; :class:`LinkManager` is the thin
netlink edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubespan import constants as C
from spanutil.ipcodec import IPInterface

log = logging.getLogger("kubespan.dataplane.links")

FAMILIES = (socket.AF_INET, socket.AF_INET6)
FAMILY_NAMES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
DEFAULT_DST = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}

IFF_UP = 0x1
IFA_F_NODAD = 0x02
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
NO_SUPPRESS_PREFIXLEN = 0xFFFFFFFF
# Rule attributes that narrow a rule's match: a rule with any of them is not the rule we want.
RULE_SELECTORS = (
    "FRA_SRC",
    "FRA_DST",
    "FRA_IIFNAME",
    "FRA_OIFNAME",
    "FRA_GOTO",
    "FRA_FLOW",
    "FRA_TUN_ID",
    "FRA_SUPPRESS_IFGROUP",
    "FRA_L3MDEV",
    "FRA_UID_RANGE",
    "FRA_IP_PROTO",
    "FRA_SPORT_RANGE",
    "FRA_DPORT_RANGE",
)
# Netlink errors that mean "already gone" when deleting.
GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL, errno.ENXIO})

WATCH_RETRY_DELAY = 0.5
WATCH_RETRY_MAX = 5.0


class DataplaneError(RuntimeError):
    """A netlink operation failed; the message names the object and the kernel's error."""


class LinkNotFoundError(DataplaneError, LookupError):
    """The mesh link does not exist (the WireGuard backend must create it first)."""


class _Msg(Protocol):
    def get(self, key: Any, default: Any = None) -> Any: ...


# --- Observed state, as plain values ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveAddress:
    interface: IPInterface
    scope: int = 0

    @property
    def owned(self) -> bool:
        """Ours unless it is an IPv6 link-local address (the kernel manages those)."""
        return not (self.interface.version == 6 and self.interface.ip.is_link_local)


@dataclass(frozen=True, slots=True)
class LiveRoute:
    family: int
    dst_len: int
    table: int
    oif: int | None
    metric: int
    mtu: int | None
    gateway: str | None = None
    type: int = RTN_UNICAST
    proto: int = 0


@dataclass(frozen=True, slots=True)
class LiveRule:
    family: int
    priority: int
    table: int
    fwmark: int | None
    fwmask: int | None
    action: int = FR_ACT_TO_TBL
    flags: int = 0
    src_len: int = 0
    dst_len: int = 0
    tos: int = 0
    selectors: tuple[str, ...] = ()

    def delete_args(self) -> dict[str, Any]:
        """Keyword arguments that make the kernel delete exactly this rule."""
        args: dict[str, Any] = {"family": self.family, "priority": self.priority, "table": self.table}
        if self.fwmark is not None:
            args["fwmark"] = self.fwmark
        if self.fwmask is not None:
            args["fwmask"] = self.fwmask
        return args

    def describe(self) -> str:
        mark = ""
        if self.fwmark is not None:
            mark = f" fwmark {self.fwmark:#x}" + (f"/{self.fwmask:#x}" if self.fwmask is not None else "")
        extra = f" +{','.join(self.selectors)}" if self.selectors else ""
        return f"{FAMILY_NAMES.get(self.family, self.family)} priority {self.priority}{mark} lookup {self.table}{extra}"


def parse_address(msg: _Msg) -> LiveAddress:
    addr = msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")
    return LiveAddress(ipaddress.ip_interface(f"{addr}/{msg.get('prefixlen')}"), msg.get("scope") or 0)


def parse_route(msg: _Msg) -> LiveRoute:
    metrics = msg.get("RTA_METRICS")
    mtu = metrics.get("RTAX_MTU") if metrics is not None else None
    return LiveRoute(
        family=msg.get("family"),
        dst_len=msg.get("dst_len") or 0,
        table=msg.get("RTA_TABLE") or msg.get("table"),
        oif=msg.get("RTA_OIF"),
        metric=msg.get("RTA_PRIORITY") or 0,
        mtu=mtu,
        gateway=msg.get("RTA_GATEWAY"),
        type=msg.get("type", RTN_UNICAST),
        proto=msg.get("proto") or 0,
    )


def parse_rule(msg: _Msg) -> LiveRule:
    selectors = tuple(name for name in RULE_SELECTORS if msg.get(name) is not None)
    suppress = msg.get("FRA_SUPPRESS_PREFIXLEN")
    if suppress is not None and suppress != NO_SUPPRESS_PREFIXLEN:
        selectors += ("FRA_SUPPRESS_PREFIXLEN",)
    return LiveRule(
        family=msg.get("family"),
        priority=msg.get("FRA_PRIORITY") or 0,
        table=msg.get("FRA_TABLE") or msg.get("table"),
        fwmark=msg.get("FRA_FWMARK"),
        fwmask=msg.get("FRA_FWMASK"),
        action=msg.get("action"),
        flags=msg.get("flags") or 0,
        src_len=msg.get("src_len") or 0,
        dst_len=msg.get("dst_len") or 0,
        tos=msg.get("tos") or 0,
        selectors=selectors,
    )


# --- Plans: observed + desired -> what to send ----------------------------------------------------


def plan_addresses(
    live: Iterable[LiveAddress], desired: Iterable[IPInterface]
) -> tuple[list[LiveAddress], list[IPInterface]]:
    """(addresses to remove, addresses to add). Removals come first when applied.

    An address present with the wrong prefix length is removed and re-added.
    IPv6 link-local addresses are never removed.
    """
    want = list(dict.fromkeys(desired))
    have = [a for a in live if a.owned]
    have_ifaces = {a.interface for a in have}
    remove = [a for a in have if a.interface not in want]
    add = [i for i in want if i not in have_ifaces]
    return remove, add


def route_ok(route: LiveRoute, *, oif: int, mtu: int, metric: int) -> bool:
    """Is this default route exactly the one we install?"""
    return (
        route.dst_len == 0
        and route.oif == oif
        and route.mtu == mtu
        and route.metric == metric
        and route.gateway is None
        and route.type == RTN_UNICAST
    )


def plan_routes(
    live: Iterable[LiveRoute], *, family: int, table: int, oif: int, mtu: int, metric: int
) -> tuple[list[LiveRoute], bool]:
    """(stray default routes of ``family`` in ``table`` to remove, whether ours must be added)."""
    defaults = [r for r in live if r.family == family and r.table == table and r.dst_len == 0]
    keep = next((i for i, r in enumerate(defaults) if route_ok(r, oif=oif, mtu=mtu, metric=metric)), None)
    remove = [r for i, r in enumerate(defaults) if i != keep]
    return remove, keep is None


def rule_ours(rule: LiveRule, *, priority: int, table: int) -> bool:
    return rule.priority == priority and rule.table == table


def rule_ok(rule: LiveRule, *, priority: int, table: int, fwmark: int, fwmask: int) -> bool:
    return (
        rule_ours(rule, priority=priority, table=table)
        and rule.fwmark == fwmark
        and rule.fwmask == fwmask
        and rule.action == FR_ACT_TO_TBL
        and not rule.flags & FIB_RULE_INVERT
        and rule.src_len == 0
        and rule.dst_len == 0
        and rule.tos == 0
        and not rule.selectors
    )


def plan_rules(
    live: Iterable[LiveRule], *, family: int, priority: int, table: int, fwmark: int, fwmask: int
) -> tuple[list[LiveRule], bool]:
    """(our stale rules of ``family`` to remove, whether the wanted rule must be added).

    Only rules at our priority that look up our table are considered ours.
    """
    ours = [r for r in live if r.family == family and rule_ours(r, priority=priority, table=table)]
    keep = next(
        (
            i
            for i, r in enumerate(ours)
            if rule_ok(r, priority=priority, table=table, fwmark=fwmark, fwmask=fwmask)
        ),
        None,
    )
    remove = [r for i, r in enumerate(ours) if i != keep]
    return remove, keep is None


# --- Events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetlinkEvent:
    """A change to something the data plane owns ("link", "addr", "route", "rule" or "resync")."""

    kind: str
    action: str  # "new", "del" or "resync"
    detail: str = ""


_EVENT_KINDS = {
    "RTM_NEWLINK": ("link", "new"),
    "RTM_DELLINK": ("link", "del"),
    "RTM_NEWADDR": ("addr", "new"),
    "RTM_DELADDR": ("addr", "del"),
    "RTM_NEWROUTE": ("route", "new"),
    "RTM_DELROUTE": ("route", "del"),
    "RTM_NEWRULE": ("rule", "new"),
    "RTM_DELRULE": ("rule", "del"),
}


def classify_event(
    event: str | None, msg: _Msg, *, ifname: str, ifindex: int | None, table: int, priority: int
) -> NetlinkEvent | None:
    """Is this rtnetlink broadcast about something we own? Returns the event or ``None``."""
    kind_action = _EVENT_KINDS.get(event or "")
    if kind_action is None:
        return None
    kind, action = kind_action
    if kind == "link":
        name = msg.get("IFLA_IFNAME")
        index = msg.get("index")
        if name == ifname or (ifindex is not None and index == ifindex):
            return NetlinkEvent(kind, action, f"{name or ifname} index {index}")
        return None
    if kind == "addr":
        index = msg.get("index")
        if ifindex is not None and index == ifindex:
            addr = msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")
            return NetlinkEvent(kind, action, f"{addr}/{msg.get('prefixlen')} dev {ifname}")
        return None
    if kind == "route":
        t = msg.get("RTA_TABLE") or msg.get("table")
        if t == table:
            dst = msg.get("RTA_DST") or "default"
            return NetlinkEvent(kind, action, f"{dst}/{msg.get('dst_len')} table {t}")
        return None
    # rule
    prio = msg.get("FRA_PRIORITY") or 0
    t = msg.get("FRA_TABLE") or msg.get("table")
    if prio == priority or t == table:
        return NetlinkEvent(kind, action, f"priority {prio} lookup {t}")
    return None


Callback = Callable[[NetlinkEvent], Awaitable[None] | None]


def link_args(cfg: C.MeshConfig) -> dict[str, Any]:
    """The :class:`LinkManager` constructor arguments that ``cfg`` sets."""
    return {
        "ifname": cfg.link_name,
        "mtu": cfg.mtu,
        "table": cfg.routing_table,
        "priority": cfg.rule_priority,
        "fwmark": cfg.fwmark_force,
        "fwmask": cfg.fwmark_mask,
    }


# --- The netlink edge -----------------------------------------------------------------------------


class ReconcileInOrder:
    """``reconcile``: the link, then its routes (only when up), then the rules, from the three steps
    a link port has; :class:`LinkManager` and its fake share it."""

    async def reconcile_link(self, addresses: Sequence[IPInterface], up: bool = True) -> list[str]:
        raise NotImplementedError

    async def reconcile_routes(self) -> list[str]:
        raise NotImplementedError

    async def reconcile_rules(self) -> list[str]:
        raise NotImplementedError

    async def reconcile(self, addresses: Sequence[IPInterface], up: bool = True) -> list[str]:
        """Link, then routes, then rules; the changes made (empty when nothing changed)."""
        changes = await self.reconcile_link(addresses, up)
        if up:
            changes += await self.reconcile_routes()
        changes += await self.reconcile_rules()
        return changes


class LinkManager(ReconcileInOrder):
    """Addresses on the mesh link, default routes in the mesh table and the fwmark rules.

    ``netns`` names a network namespace (``ip netns`` name) to work in; it is
    never created here. Use as ``async with LinkManager(...) as lm:`` or call
    :meth:`close` to release the netlink socket.
    """

    def __init__(
        self,
        ifname: str = C.LINK_NAME,
        mtu: int = C.MTU,
        table: int = C.ROUTING_TABLE,
        priority: int = C.RULE_PRIORITY,
        fwmark: int = C.FWMARK_FORCE,
        fwmask: int = C.FWMARK_MASK,
        *,
        metric: int = C.ROUTE_METRIC,
        netns: str | None = None,
    ) -> None:
        """Loose values, checked by MeshConfig's rules (:meth:`from_config` takes a checked config)."""
        C.check_mesh_fields(
            link_name=ifname,
            mtu=mtu,
            routing_table=table,
            rule_priority=priority,
            fwmark_force=fwmark,
            fwmark_mask=fwmask,
        )
        if isinstance(metric, bool) or not isinstance(metric, int) or not 0 <= metric <= 2**32 - 1:
            raise C.ConfigError("route_metric", f"{metric!r} must be an integer in 0..{2**32 - 1}")
        self._setup(ifname, mtu, table, priority, fwmark, fwmask, metric=metric, netns=netns)

    def _setup(
        self,
        ifname: str,
        mtu: int,
        table: int,
        priority: int,
        fwmark: int,
        fwmask: int,
        *,
        metric: int,
        netns: str | None,
    ) -> None:
        self.ifname = ifname
        self.mtu = mtu
        self.table = table
        self.priority = priority
        self.fwmark = fwmark
        self.fwmask = fwmask
        self.metric = metric
        self.netns = netns
        self._ipr: Any = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, cfg: C.MeshConfig, *, netns: str | None = None) -> LinkManager:
        """The manager for ``cfg``, which MeshConfig has checked: nothing is checked again."""
        manager = cls.__new__(cls)
        manager._setup(**link_args(cfg), metric=C.ROUTE_METRIC, netns=netns)
        return manager

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return (
            f"LinkManager({self.ifname} mtu={self.mtu} table={self.table} priority={self.priority} "
            f"fwmark={self.fwmark:#x}/{self.fwmask:#x}{where})"
        )

    # -- socket lifecycle ---------------------------------------------------------------------

    def _open(self) -> Any:
        from pyroute2 import AsyncIPRoute  # local import: keep module import cheap for unit tests

        # flags=0: never create the namespace (pyroute2's default is O_CREAT).
        if self.netns is None:
            return AsyncIPRoute()
        return AsyncIPRoute(netns=self.netns, flags=0)

    def _sock(self) -> Any:
        if self._ipr is None:
            try:
                self._ipr = self._open()
            except FileNotFoundError as e:
                raise DataplaneError(f"network namespace {self.netns!r} does not exist") from e
        return self._ipr

    def _drop_socket(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None

    async def close(self) -> None:
        self._drop_socket()

    async def __aenter__(self) -> LinkManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, what: str, coro_fn: Callable[[Any], Awaitable[Any]]) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._sock()
        try:
            return await coro_fn(ipr)
        except NetlinkError as e:
            raise DataplaneError(f"{what}: {os.strerror(e.code)} (errno {e.code})") from e
        except (OSError, EOFError) as e:
            # a broken socket: start over with a fresh one next time
            self._drop_socket()
            raise DataplaneError(f"{what}: netlink socket failed: {e}") from e

    async def _dump(self, what: str, method: str, **kw: Any) -> list[Any]:
        async def run(ipr: Any) -> list[Any]:
            return [m async for m in await getattr(ipr, method)("dump", **kw)]

        return await self._call(what, run)

    async def _send(self, what: str, method: str, command: str, **kw: Any) -> None:
        async def run(ipr: Any) -> None:
            await getattr(ipr, method)(command, **kw)

        await self._call(what, run)

    async def _delete(self, what: str, method: str, **kw: Any) -> bool:
        """Delete; ``False`` when it was already gone."""
        try:
            await self._send(what, method, "del", **kw)
        except DataplaneError as e:
            cause = e.__cause__
            if getattr(cause, "code", None) in GONE:
                return False
            raise
        return True

    async def _delete_address(self, index: int, a: LiveAddress) -> bool:
        return await self._delete(
            f"delete address {a.interface}",
            "addr",
            index=index,
            address=str(a.interface.ip),
            prefixlen=a.interface.network.prefixlen,
        )

    async def _link(self) -> Any | None:
        links = await self._dump(f"read link {self.ifname}", "link", ifname=self.ifname)
        return links[0] if links else None

    async def _require_link(self) -> Any:
        link = await self._link()
        if link is None:
            raise LinkNotFoundError(
                f"link {self.ifname!r} not found" + (f" in netns {self.netns}" if self.netns else "")
            )
        return link

    # -- reconcile ----------------------------------------------------------------------------

    async def reconcile_link(self, addresses: Sequence[IPInterface], up: bool = True) -> list[str]:
        """MTU, admin state and addresses of the mesh link.

        Raises :class:`LinkNotFoundError` when the link does not exist.
        """
        desired = [ipaddress.ip_interface(a) for a in addresses]
        async with self._lock:
            link = await self._require_link()
            index = link["index"]
            changes: list[str] = []
            settings: dict[str, Any] = {}
            mtu = link.get("IFLA_MTU")
            if mtu != self.mtu:
                settings["mtu"] = self.mtu
                changes.append(f"link {self.ifname}: mtu {mtu} -> {self.mtu}")
            is_up = bool(link["flags"] & IFF_UP)
            if is_up != up:
                settings["state"] = "up" if up else "down"
                changes.append(f"link {self.ifname}: {'up' if up else 'down'}")
            if settings:
                await self._send(f"set link {self.ifname}", "link", "set", index=index, **settings)

            live = [parse_address(m) for m in await self._dump("read addresses", "addr", index=index)]
            remove, add = plan_addresses(live, desired)
            for a in remove:
                await self._delete_address(index, a)
                changes.append(f"address {self.ifname}: del {a.interface}")
            for i in add:
                await self._send(
                    f"add address {i} to {self.ifname}",
                    "addr",
                    "add",
                    index=index,
                    address=str(i.ip),
                    prefixlen=i.network.prefixlen,
                    flags=IFA_F_NODAD if i.version == 6 else 0,
                )
                changes.append(f"address {self.ifname}: add {i}")
            self._log(changes)
            return changes

    async def reconcile_routes(self) -> list[str]:
        """IPv4 and IPv6 default routes in our table via the link, carrying the link MTU.

        The link must exist and be up (the kernel refuses IPv4 routes on a down link).
        """
        async with self._lock:
            link = await self._require_link()
            index = link["index"]
            changes: list[str] = []
            for family in FAMILIES:
                fam = FAMILY_NAMES[family]
                live = [
                    parse_route(m)
                    for m in await self._dump(
                        f"read {fam} routes in table {self.table}", "route", family=family, table=self.table
                    )
                ]
                remove, add = plan_routes(
                    live, family=family, table=self.table, oif=index, mtu=self.mtu, metric=self.metric
                )
                for r in remove:
                    kw: dict[str, Any] = {
                        "family": family,
                        "dst": DEFAULT_DST[family],
                        "table": self.table,
                        "priority": r.metric,
                    }
                    if r.oif is not None:
                        kw["oif"] = r.oif
                    if r.gateway is not None:
                        kw["gateway"] = r.gateway
                    await self._delete(f"delete {fam} default route in table {self.table}", "route", **kw)
                    changes.append(
                        f"route table {self.table}: del {fam} default oif {r.oif} metric {r.metric} mtu {r.mtu}"
                    )
                if add:
                    await self._send(
                        f"add {fam} default route in table {self.table}",
                        "route",
                        "replace",
                        family=family,
                        dst=DEFAULT_DST[family],
                        oif=index,
                        table=self.table,
                        priority=self.metric,
                        proto="static",
                        metrics={"mtu": self.mtu},
                    )
                    changes.append(
                        f"route table {self.table}: add {fam} default dev {self.ifname} mtu {self.mtu}"
                    )
            self._log(changes)
            return changes

    async def reconcile_rules(self) -> list[str]:
        """``priority P: fwmark F/M lookup T`` for IPv4 and IPv6; other rules are never touched."""
        async with self._lock:
            changes: list[str] = []
            for family in FAMILIES:
                fam = FAMILY_NAMES[family]
                live = [
                    parse_rule(m)
                    for m in await self._dump(f"read {fam} rules", "rule", family=family)
                    if m.get("family") == family
                ]
                remove, add = plan_rules(
                    live,
                    family=family,
                    priority=self.priority,
                    table=self.table,
                    fwmark=self.fwmark,
                    fwmask=self.fwmask,
                )
                for r in remove:
                    await self._delete(f"delete rule {r.describe()}", "rule", **r.delete_args())
                    changes.append(f"rule: del {r.describe()}")
                if add:
                    want = LiveRule(family, self.priority, self.table, self.fwmark, self.fwmask)
                    await self._send(
                        f"add rule {want.describe()}",
                        "rule",
                        "add",
                        family=family,
                        priority=self.priority,
                        fwmark=self.fwmark,
                        fwmask=self.fwmask,
                        table=self.table,
                        action="FR_ACT_TO_TBL",
                    )
                    changes.append(f"rule: add {want.describe()}")
            self._log(changes)
            return changes

    async def teardown(self, remove_link: bool = False) -> None:
        """Remove our rules, default routes and addresses (and the link itself if asked)."""
        async with self._lock:
            for family in FAMILIES:
                live = [
                    parse_rule(m)
                    for m in await self._dump("read rules", "rule", family=family)
                    if m.get("family") == family
                ]
                for r in live:
                    if rule_ours(r, priority=self.priority, table=self.table):
                        await self._delete(f"delete rule {r.describe()}", "rule", **r.delete_args())
            link = await self._link()
            if link is None:
                return  # its routes and addresses went with it
            index = link["index"]
            for family in FAMILIES:
                routes = [
                    parse_route(m)
                    for m in await self._dump("read routes", "route", family=family, table=self.table)
                ]
                for r in routes:
                    if r.table == self.table and r.dst_len == 0 and r.oif == index:
                        await self._delete(
                            "delete default route",
                            "route",
                            family=family,
                            dst=DEFAULT_DST[family],
                            table=self.table,
                            oif=index,
                            priority=r.metric,
                        )
            for a in [parse_address(m) for m in await self._dump("read addresses", "addr", index=index)]:
                if a.owned:
                    await self._delete_address(index, a)
            if remove_link:
                await self._delete(f"delete link {self.ifname}", "link", index=index)
            log.info("dataplane teardown done", extra={"link": self.ifname, "removed_link": remove_link})

    def _log(self, changes: list[str]) -> None:
        for c in changes:
            log.info("dataplane change: %s", c)

    # -- events -------------------------------------------------------------------------------

    async def watch(self, callback: Callback, *, ready: asyncio.Event | None = None) -> None:
        """Call ``callback`` for every rtnetlink change to our link, addresses, routes or rules.

        Runs until cancelled. ``ready`` is set once subscribed. A broken socket
        yields a ``NetlinkEvent("resync", "resync")`` (events may have been lost)
        and a resubscription. Callback errors are logged, never raised.
        """
        from pyroute2.netlink.rtnl import (
            RTMGRP_IPV4_IFADDR,
            RTMGRP_IPV4_ROUTE,
            RTMGRP_IPV4_RULE,
            RTMGRP_IPV6_IFADDR,
            RTMGRP_IPV6_ROUTE,
            RTMGRP_IPV6_RULE,
            RTMGRP_LINK,
        )

        groups = (
            RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE
            | RTMGRP_IPV4_RULE
            | RTMGRP_IPV6_RULE
        )
        delay = WATCH_RETRY_DELAY
        while True:
            try:
                async with self._open() as ipr:
                    await ipr.bind(groups=groups)
                    ifindex = None
                    links = [m async for m in await ipr.link("dump", ifname=self.ifname)]
                    if links:
                        ifindex = links[0]["index"]
                    if ready is not None:
                        ready.set()
                    delay = WATCH_RETRY_DELAY
                    while True:
                        received = 0
                        async for msg in ipr.get():
                            received += 1
                            event = msg.get("event")
                            if event in ("RTM_NEWLINK", "RTM_DELLINK"):
                                name = msg.get("IFLA_IFNAME")
                                if name == self.ifname:
                                    ifindex = msg["index"] if event == "RTM_NEWLINK" else None
                            ev = classify_event(
                                event,
                                msg,
                                ifname=self.ifname,
                                ifindex=ifindex,
                                table=self.table,
                                priority=self.priority,
                            )
                            if (
                                event == "RTM_NEWLINK"
                                and ev is not None
                                and msg.get("IFLA_IFNAME") != self.ifname
                            ):
                                ifindex = None  # renamed away
                            if ev is not None:
                                await _notify(callback, ev)
                        if not received:  # pyroute2 ends a read with nothing when the socket closed
                            raise ConnectionError("netlink socket closed")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("netlink watch failed, resubscribing in %.1fs: %s", delay, e)
                await _notify(callback, NetlinkEvent("resync", "resync", str(e)))
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_RETRY_MAX)


async def _notify(callback: Callback, event: NetlinkEvent) -> None:
    try:
        result = callback(event)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("dataplane event callback failed")
