"""The mesh link's addresses, the table-180 routes and the fwmark rules, over rtnetlink.

Everything goes through pyroute2's :class:`~pyroute2.AsyncIPRoute`. Every
``reconcile_*`` method is level-triggered and idempotent: it reads the live
state first and sends only what differs, returning a human-readable list of
the changes it made (empty when nothing changed). What is "ours":

- **addresses**: every address on the mesh link except IPv6 link-local ones
  (the kernel's autoconf); the link itself belongs to the WireGuard backend and
  is never created here (a missing link raises :class:`LinkNotFoundError`) and
  only removed by ``teardown(remove_link=True)``;
- **routes**: with steering "marks", the IPv4 and IPv6 *default* routes in our
  routing table; with "routes", one route per peer prefix via the link (and no
  default route); other routes in that table (say an operator's LAN bypass) are
  left alone;
- **rules**: rules at our priority that look up our table ("marks": ``fwmark
  force/mask``; "routes": ``not fwmark wireguard/mask``), and with "routes",
  while strict IPv4 reverse-path filtering is on, the WireGuard port's
  exemption one priority before (``ipproto udp sport <port> lookup main``: the
  reverse lookup of an incoming tunnel packet is unmarked, its ports swapped).
  Every other rule is never touched.

The pure helpers (``plan_*``, ``parse_*``, :func:`classify_event`) hold the
decisions and are unit-tested without root; :class:`LinkManager` is the thin
netlink edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import inspect
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubespan import constants as C
from spanutil.ipcodec import IPInterface, IPNetwork, is_node_address

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
IPPROTO_UDP = 17
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
    dst: str | None = None

    @property
    def prefix(self) -> str:
        """``addr/len`` as ipaddress prints it (the key prefix routes are compared by)."""
        return f"{self.dst}/{self.dst_len}"

    def delete_args(self) -> dict[str, Any]:
        """Keyword arguments that make the kernel delete exactly this route."""
        args: dict[str, Any] = {
            "family": self.family,
            "dst": self.prefix if self.dst_len else DEFAULT_DST[self.family],
            "table": self.table,
            "priority": self.metric,
        }
        if self.oif is not None:
            args["oif"] = self.oif
        if self.gateway is not None:
            args["gateway"] = self.gateway
        return args


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
    ip_proto: int = 0
    sport: str | None = None  # "start:end", as pyroute2 renders FRA_SPORT_RANGE

    def delete_args(self) -> dict[str, Any]:
        """Keyword arguments that make the kernel delete exactly this rule."""
        args: dict[str, Any] = {"family": self.family, "priority": self.priority, "table": self.table}
        if self.fwmark is not None:
            args["fwmark"] = self.fwmark
        if self.fwmask is not None:
            args["fwmask"] = self.fwmask
        if self.flags & FIB_RULE_INVERT:
            args["flags"] = FIB_RULE_INVERT
        if self.ip_proto:
            args["ip_proto"] = self.ip_proto
        if self.sport is not None:
            args["sport_range"] = self.sport
        return args

    def describe(self) -> str:
        mark = ""
        if self.fwmark is not None:
            mark = f" fwmark {self.fwmark:#x}" + (f"/{self.fwmask:#x}" if self.fwmask is not None else "")
            if self.flags & FIB_RULE_INVERT:
                mark = " not" + mark
        port = ""
        if self.ip_proto:
            port = f" ipproto {self.ip_proto}" + (f" sport {self.sport}" if self.sport else "")
        shown = [n for n in self.selectors if n not in ("FRA_IP_PROTO", "FRA_SPORT_RANGE") or not port]
        extra = f" +{','.join(shown)}" if shown else ""
        fam = FAMILY_NAMES.get(self.family, self.family)
        return f"{fam} priority {self.priority}{mark}{port} lookup {self.table}{extra}"


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
        dst=msg.get("RTA_DST"),
    )


def _port_range(value: Any) -> str | None:
    """FRA_SPORT_RANGE as ``start:end`` (pyroute2 decodes it to that string)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return f"{value.get('start')}:{value.get('end')}"


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
        ip_proto=msg.get("FRA_IP_PROTO") or 0,
        sport=_port_range(msg.get("FRA_SPORT_RANGE")),
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
    return route.dst_len == 0 and prefix_route_ok(route, oif=oif, mtu=mtu, metric=metric)


def plan_routes(
    live: Iterable[LiveRoute], *, family: int, table: int, oif: int, mtu: int, metric: int
) -> tuple[list[LiveRoute], bool]:
    """(stray default routes of ``family`` in ``table`` to remove, whether ours must be added)."""
    defaults = [r for r in live if r.family == family and r.table == table and r.dst_len == 0]
    keep = next((i for i, r in enumerate(defaults) if route_ok(r, oif=oif, mtu=mtu, metric=metric)), None)
    remove = [r for i, r in enumerate(defaults) if i != keep]
    return remove, keep is None


def prefix_route_ok(route: LiveRoute, *, oif: int, mtu: int, metric: int) -> bool:
    """Is this prefix route exactly one we install (via the link, its MTU, our metric)?"""
    return (
        route.oif == oif
        and route.mtu == mtu
        and route.metric == metric
        and route.gateway is None
        and route.type == RTN_UNICAST
    )


def plan_prefix_routes(
    live: Iterable[LiveRoute],
    desired: Iterable[IPNetwork],
    *,
    family: int,
    table: int,
    oif: int,
    mtu: int,
    metric: int,
) -> tuple[list[LiveRoute], list[IPNetwork]]:
    """(routes to remove, prefixes to add) for steering "routes": the table's routes of ``family``
    via our link are ours, and so is any default route in it (the marking layout's, which would
    take every unmarked packet); other routes in the table are left alone."""
    want = {str(n): n for n in desired}
    keep: set[str] = set()
    remove: list[LiveRoute] = []
    for r in live:
        if r.family != family or r.table != table:
            continue
        if r.dst_len == 0:
            remove.append(r)
            continue
        if r.oif != oif:
            continue
        key = r.prefix
        if key in want and key not in keep and prefix_route_ok(r, oif=oif, mtu=mtu, metric=metric):
            keep.add(key)
        else:
            remove.append(r)
    return remove, [n for key, n in want.items() if key not in keep]


def diff_prefixes(
    known: Mapping[int, Iterable[IPNetwork]], desired: Mapping[int, Iterable[IPNetwork]]
) -> tuple[list[IPNetwork], list[IPNetwork]]:
    """(prefixes to delete, prefixes to add) between two ``{4: [...], 6: [...]}`` maps."""
    old = {n for v in known.values() for n in v}
    new = {n for v in desired.values() for n in v}
    key = lambda n: (n.version, int(n.network_address), n.prefixlen)  # noqa: E731
    return sorted(old - new, key=key), sorted(new - old, key=key)


def rule_ours(rule: LiveRule, *, priority: int, table: int) -> bool:
    return rule.priority == priority and rule.table == table


def _plain(rule: LiveRule, *, invert: bool = False) -> bool:
    """A lookup rule with no selector beyond the ones its caller checks (and ``not`` if asked)."""
    return (
        rule.action == FR_ACT_TO_TBL
        and bool(rule.flags & FIB_RULE_INVERT) == invert
        and rule.src_len == 0
        and rule.dst_len == 0
        and rule.tos == 0
    )


def rule_ok(
    rule: LiveRule, *, priority: int, table: int, fwmark: int, fwmask: int, invert: bool = False
) -> bool:
    return (
        rule_ours(rule, priority=priority, table=table)
        and rule.fwmark == fwmark
        and rule.fwmask == fwmask
        and _plain(rule, invert=invert)
        and not rule.selectors
    )


def plan_rules(
    live: Iterable[LiveRule],
    *,
    family: int,
    priority: int,
    table: int,
    fwmark: int,
    fwmask: int,
    invert: bool = False,
) -> tuple[list[LiveRule], bool]:
    """(our stale rules of ``family`` to remove, whether the wanted rule must be added).

    Only rules at our priority that look up our table are considered ours. ``invert``: the rule
    matches packets *without* the mark (steering "routes").
    """
    ours = [r for r in live if r.family == family and rule_ours(r, priority=priority, table=table)]
    keep = next(
        (
            i
            for i, r in enumerate(ours)
            if rule_ok(r, priority=priority, table=table, fwmark=fwmark, fwmask=fwmask, invert=invert)
        ),
        None,
    )
    remove = [r for i, r in enumerate(ours) if i != keep]
    return remove, keep is None


def exemption_ours(rule: LiveRule, *, priority: int) -> bool:
    """A UDP rule at the exemption's priority that looks up main (steering "routes")."""
    return rule.priority == priority and rule.table == C.MAIN_TABLE and rule.ip_proto == IPPROTO_UDP


def exemption_ok(rule: LiveRule, *, priority: int, port: int) -> bool:
    return (
        exemption_ours(rule, priority=priority)
        and rule.sport == f"{port}:{port}"
        and not rule.fwmark
        and _plain(rule)
        and set(rule.selectors) <= {"FRA_IP_PROTO", "FRA_SPORT_RANGE"}
    )


def plan_exemption(
    live: Iterable[LiveRule], *, family: int, priority: int, port: int | None
) -> tuple[list[LiveRule], bool]:
    """(our stale exemption rules of ``family`` to remove, whether it must be added); ``port``
    None: no exemption wanted (steering "marks"), every one of ours goes."""
    ours = [r for r in live if r.family == family and exemption_ours(r, priority=priority)]
    keep = None
    if port is not None:
        keep = next((i for i, r in enumerate(ours) if exemption_ok(r, priority=priority, port=port)), None)
    remove = [r for i, r in enumerate(ours) if i != keep]
    return remove, port is not None and keep is None


def parse_rp_filter(text: str) -> dict[str, int]:
    """``{interface: rp_filter}`` from ``grep -H . /proc/sys/net/ipv4/conf/*/rp_filter`` lines."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        path, _, value = line.rpartition(":")
        parts = path.split("/")
        if len(parts) >= 2 and parts[-1] == "rp_filter" and value.strip().isdigit():
            out[parts[-2]] = int(value)
    return out


def _read_rp_filter() -> str:
    """This namespace's rp_filter files as ``path:value`` lines (procfs: reads never block)."""
    lines = []
    for path in sorted(glob.glob("/proc/sys/net/ipv4/conf/*/rp_filter")):
        with contextlib.suppress(OSError), open(path) as f:
            lines.append(f"{path}:{f.read().strip()}")
    return "\n".join(lines)


def strict_rp_filter(values: Mapping[str, int], *, ignore: Iterable[str] = ()) -> bool:
    """Does strict IPv4 reverse-path filtering (1) apply to an interface other than ``ignore``? The
    kernel uses max(conf/all, conf/<interface>); 2 (loose, Debian's default) passes tunnel packets."""
    every = values.get("all", 0)
    skip = {"all", "default", "lo", *ignore}
    return any(max(every, v) == 1 for name, v in values.items() if name not in skip)


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
    "RTM_NEWNETCONF": ("netconf", "new"),
}


def classify_event(
    event: str | None,
    msg: _Msg,
    *,
    ifname: str,
    ifindex: int | None,
    table: int,
    priority: int,
    prefix_routes: bool = False,
) -> NetlinkEvent | None:
    """Is this rtnetlink broadcast about something we own, or a node address? The event or ``None``.

    A global address on another link is a ``hostaddr`` event: the node's endpoints may change.

    With ``prefix_routes`` (steering "routes") a new prefix route via our link in our table is
    our own write and ignored (a cold start adds one per peer prefix); its removal still counts,
    as do a rule at the exemption's priority (one before ours) and an IPv4 netconf change (say
    rp_filter: whether the exemption is needed)."""
    kind_action = _EVENT_KINDS.get(event or "")
    if kind_action is None:
        return None
    kind, action = kind_action
    if kind == "netconf":
        return NetlinkEvent(kind, action, "ipv4 netconf") if prefix_routes else None
    if kind == "link":
        name = msg.get("IFLA_IFNAME")
        index = msg.get("index")
        if name == ifname or (ifindex is not None and index == ifindex):
            return NetlinkEvent(kind, action, f"{name or ifname} index {index}")
        return None
    if kind == "addr":
        index = msg.get("index")
        addr = msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")
        if ifindex is not None and index == ifindex:
            return NetlinkEvent(kind, action, f"{addr}/{msg.get('prefixlen')} dev {ifname}")
        try:
            ip = ipaddress.ip_address(addr or "")
        except ValueError:
            return None
        if not is_node_address(ip):  # the rule NetlinkHost.addresses applies
            return None
        return NetlinkEvent("hostaddr", action, f"{addr}/{msg.get('prefixlen')} index {index}")
    if kind == "route":
        t = msg.get("RTA_TABLE") or msg.get("table")
        if (
            prefix_routes
            and action == "new"
            and msg.get("dst_len")
            and ifindex is not None
            and msg.get("RTA_OIF") == ifindex
        ):
            return None
        if t == table:
            dst = msg.get("RTA_DST") or "default"
            return NetlinkEvent(kind, action, f"{dst}/{msg.get('dst_len')} table {t}")
        return None
    # rule
    prio = msg.get("FRA_PRIORITY") or 0
    t = msg.get("FRA_TABLE") or msg.get("table")
    if prio == priority or t == table or (prefix_routes and prio == priority - 1):
        return NetlinkEvent(kind, action, f"priority {prio} lookup {t}")
    return None


Callback = Callable[[NetlinkEvent], Awaitable[None] | None]


def link_args(cfg: C.MeshConfig) -> dict[str, Any]:
    """The :class:`LinkManager` constructor arguments that ``cfg`` sets."""
    routes = cfg.steering == C.STEERING_ROUTES
    return {
        "ifname": cfg.link_name,
        "mtu": cfg.mtu,
        "table": cfg.routing_table,
        "priority": cfg.rule_priority,
        # the rule's mark: "send into the mesh" (marks), or "not WireGuard's own" (routes)
        "fwmark": cfg.fwmark_wireguard if routes else cfg.fwmark_force,
        "fwmask": cfg.fwmark_mask,
        "steering": cfg.steering,
        "listen_port": cfg.listen_port,
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

    async def reconcile_prefix_routes(
        self, desired: Mapping[int, Sequence[IPNetwork]], *, trust_cache: bool = False
    ) -> list[str]:
        raise NotImplementedError

    async def reconcile(self, addresses: Sequence[IPInterface], up: bool = True) -> list[str]:
        """Link, then routes, then rules; the changes made (empty when nothing changed)."""
        changes = await self.reconcile_link(addresses, up)
        if up:
            changes += await self.reconcile_routes()
        changes += await self.reconcile_rules()
        return changes


class LinkManager(ReconcileInOrder):
    """Addresses on the mesh link, the routes in the mesh table and the fwmark rules.

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
        steering: str = C.STEERING_MARKS,
        listen_port: int = C.LISTEN_PORT,
    ) -> None:
        """Loose values, checked by MeshConfig's rules (:meth:`from_config` takes a checked config).
        ``fwmark`` is the rule's mark: fwmark_force with steering "marks", fwmark_wireguard with
        "routes"; ``listen_port`` is WireGuard's (the "routes" exemption rule)."""
        mark = "fwmark_wireguard" if steering == C.STEERING_ROUTES else "fwmark_force"
        C.check_mesh_fields(
            link_name=ifname,
            mtu=mtu,
            routing_table=table,
            rule_priority=priority,
            fwmark_mask=fwmask,
            steering=steering,
            listen_port=listen_port,
            **{mark: fwmark},
        )
        if isinstance(metric, bool) or not isinstance(metric, int) or not 0 <= metric <= 2**32 - 1:
            raise C.ConfigError("route_metric", f"{metric!r} must be an integer in 0..{2**32 - 1}")
        self._setup(
            ifname,
            mtu,
            table,
            priority,
            fwmark,
            fwmask,
            metric=metric,
            netns=netns,
            steering=steering,
            listen_port=listen_port,
        )

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
        steering: str,
        listen_port: int,
    ) -> None:
        self.ifname = ifname
        self.mtu = mtu
        self.table = table
        self.priority = priority
        self.fwmark = fwmark
        self.fwmask = fwmask
        self.metric = metric
        self.netns = netns
        self.steering = steering
        self.listen_port = listen_port
        self._ipr: Any = None
        self._lock = asyncio.Lock()
        # steering "routes": the prefix routes last read or written, and the link they went to
        self._known_prefixes: dict[int, list[IPNetwork]] | None = None
        self._known_index: int | None = None

    @property
    def by_routes(self) -> bool:
        """Steering "routes": a route per peer prefix and a ``not fwmark`` rule, no default route."""
        return self.steering == C.STEERING_ROUTES

    @property
    def exemption_priority(self) -> int:
        return self.priority - 1

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
            f"fwmark={self.fwmark:#x}/{self.fwmask:#x} steering={self.steering}{where})"
        )

    # -- socket lifecycle ---------------------------------------------------------------------

    def _open(self) -> Any:
        from pyroute2.iproute import AsyncIPRoute  # here: keep module import cheap for unit tests

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
        """IPv4 and IPv6 default routes in our table via the link, carrying the link MTU (steering
        "routes": nothing here; :meth:`reconcile_prefix_routes` owns the table, defaults included).

        The link must exist and be up (the kernel refuses IPv4 routes on a down link).
        """
        if self.by_routes:
            return []  # one dump of a table of 2000 routes costs ~100 ms of parsing: done once there
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
                    await self._delete(
                        f"delete {fam} default route in table {self.table}", "route", **r.delete_args()
                    )
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
            strict = self.by_routes and strict_rp_filter(await self._rp_filter(), ignore=(self.ifname,))
            for family in FAMILIES:
                fam = FAMILY_NAMES[family]
                live = [
                    parse_rule(m)
                    for m in await self._dump(f"read {fam} rules", "rule", family=family)
                    if m.get("family") == family
                ]
                invert = self.by_routes
                # the exemption costs every received packet a flow dissection: only where needed
                exempt_port = self.listen_port if strict and family == socket.AF_INET else None
                remove, add = plan_rules(
                    live,
                    family=family,
                    priority=self.priority,
                    table=self.table,
                    fwmark=self.fwmark,
                    fwmask=self.fwmask,
                    invert=invert,
                )
                stale, exempt = plan_exemption(
                    live,
                    family=family,
                    priority=self.exemption_priority,
                    port=exempt_port,
                )
                for r in [*remove, *stale]:
                    await self._delete(f"delete rule {r.describe()}", "rule", **r.delete_args())
                    changes.append(f"rule: del {r.describe()}")
                if exempt:  # before the rule it exempts from
                    port = f"{self.listen_port}:{self.listen_port}"
                    want = LiveRule(
                        family,
                        self.exemption_priority,
                        C.MAIN_TABLE,
                        None,
                        None,
                        ip_proto=IPPROTO_UDP,
                        sport=port,
                    )
                    await self._send(
                        f"add rule {want.describe()}",
                        "rule",
                        "add",
                        family=family,
                        priority=self.exemption_priority,
                        ip_proto=IPPROTO_UDP,
                        sport_range=port,
                        table=C.MAIN_TABLE,
                        action="FR_ACT_TO_TBL",
                    )
                    changes.append(f"rule: add {want.describe()}")
                if add:
                    flags = FIB_RULE_INVERT if invert else 0
                    want = LiveRule(family, self.priority, self.table, self.fwmark, self.fwmask, flags=flags)
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
                        **({"flags": flags} if flags else {}),
                    )
                    changes.append(f"rule: add {want.describe()}")
            self._log(changes)
            return changes

    async def reconcile_prefix_routes(
        self, desired: Mapping[int, Sequence[IPNetwork]], *, trust_cache: bool = False
    ) -> list[str]:
        """Steering "routes": exactly ``desired`` (``{4: [...], 6: [...]}``, minimal prefix covers)
        as routes via the link in our table, carrying the link MTU.

        With ``trust_cache`` the table is not read when an earlier call read or wrote it: the
        difference to that is sent, and only when it fails is the table read and repaired (as
        :meth:`NftManager.reconcile` does with its sets)."""
        want = {4: list(desired.get(4, ())), 6: list(desired.get(6, ()))}
        async with self._lock:
            known, index = self._known_prefixes, self._known_index
            self._known_prefixes = None
            if trust_cache and known is not None and index is not None:
                delete, add = diff_prefixes(known, want)
                try:
                    for n in delete:
                        await self._route_del(index, n)
                    for n in add:
                        await self._route_add(index, n)
                except DataplaneError as e:
                    log.info("prefix routes changed behind our back (%s): reading the table", e)
                else:
                    self._known_prefixes = want
                    return self._counted(len(add), len(delete))
            link = await self._require_link()
            index = link["index"]
            added = deleted = 0
            for family in FAMILIES:
                version = 4 if family == socket.AF_INET else 6
                live = [
                    parse_route(m)
                    for m in await self._dump(
                        f"read {FAMILY_NAMES[family]} routes in table {self.table}",
                        "route",
                        family=family,
                        table=self.table,
                    )
                ]
                stale, missing = plan_prefix_routes(
                    live,
                    want[version],
                    family=family,
                    table=self.table,
                    oif=index,
                    mtu=self.mtu,
                    metric=self.metric,
                )
                for r in stale:
                    args = r.delete_args()
                    await self._delete(f"delete route {args['dst']} in table {self.table}", "route", **args)
                for n in missing:
                    await self._route_add(index, n)
                added, deleted = added + len(missing), deleted + len(stale)
            self._known_prefixes, self._known_index = want, index
            return self._counted(added, deleted)

    async def _route_add(self, index: int, net: IPNetwork) -> None:
        await self._send(
            f"add route {net} in table {self.table}",
            "route",
            "replace",
            family=socket.AF_INET if net.version == 4 else socket.AF_INET6,
            dst=str(net),
            oif=index,
            table=self.table,
            priority=self.metric,
            proto="static",
            metrics={"mtu": self.mtu},
        )

    async def _route_del(self, index: int, net: IPNetwork) -> None:
        if not await self._delete(
            f"delete route {net} in table {self.table}",
            "route",
            family=socket.AF_INET if net.version == 4 else socket.AF_INET6,
            dst=str(net),
            table=self.table,
            oif=index,
            priority=self.metric,
        ):
            raise DataplaneError(f"route {net} in table {self.table} was already gone")

    def _counted(self, added: int, deleted: int) -> list[str]:
        """One change line for a batch of prefix routes (a cold start adds one per peer prefix)."""
        if not (added or deleted):
            return []
        changes = [f"routes in table {self.table} dev {self.ifname}: add {added}, delete {deleted}"]
        self._log(changes)
        return changes

    async def _rp_filter(self) -> dict[str, int]:
        """The namespace's IPv4 rp_filter settings by interface (``all`` and ``default`` too)."""
        if self.netns is None:
            return parse_rp_filter(_read_rp_filter())
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.netns,
            "sh",
            "-c",
            "grep -H . /proc/sys/net/ipv4/conf/*/rp_filter",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        return parse_rp_filter(out.decode())

    async def teardown(self, remove_link: bool = False) -> None:
        """Remove our rules, our routes and addresses (and the link itself if asked)."""
        async with self._lock:
            for family in FAMILIES:
                live = [
                    parse_rule(m)
                    for m in await self._dump("read rules", "rule", family=family)
                    if m.get("family") == family
                ]
                for r in live:
                    if rule_ours(r, priority=self.priority, table=self.table) or exemption_ours(
                        r, priority=self.exemption_priority
                    ):
                        await self._delete(f"delete rule {r.describe()}", "rule", **r.delete_args())
            self._known_prefixes = self._known_index = None
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
                    if r.table == self.table and r.oif == index and (r.dst_len == 0 or self.by_routes):
                        args = r.delete_args()
                        await self._delete(f"delete route {args['dst']}", "route", **args)
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
            RTNLGRP_IPV4_NETCONF,
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
        if self.by_routes:  # rp_filter changes decide the exemption rule
            groups |= 1 << (RTNLGRP_IPV4_NETCONF - 1)
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
                                prefix_routes=self.by_routes,
                            )
                            if (
                                event == "RTM_NEWLINK"
                                and ev is not None
                                and msg.get("IFLA_IFNAME") != self.ifname
                            ):
                                ifindex = None  # renamed away
                            if ev is not None:
                                await notify(callback, ev)
                        if not received:  # pyroute2 ends a read with nothing when the socket closed
                            raise ConnectionError("netlink socket closed")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("netlink watch failed, resubscribing in %.1fs: %s", delay, e)
                await notify(callback, NetlinkEvent("resync", "resync", str(e)))
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_RETRY_MAX)


async def notify(callback: Callback, event: NetlinkEvent) -> None:
    """Call ``callback`` (a plain or coroutine function); its errors are logged, never raised."""
    try:
        result = callback(event)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("dataplane event callback failed")
