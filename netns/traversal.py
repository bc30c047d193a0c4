"""NAT traversal labs (issue 14): real ``kubespan run`` agents behind the lab's NAT profiles, a registry
that also answers STUN, and a public relay node; and the pair matrix read from the agents' status.

Built by :func:`build` inside a :class:`netns.lab.Lab` (use :func:`netns.mesh.mesh_lab` so the agents
stop together)::

    internet 203.0.113.0/24
      disc   .2 and .3   discovery-service :3000, STUN (--stun-addr) on .2:3478 and .3:3478
      relay  .(100+k)    ``open`` + ``kubespan run --relay`` (``build(relays=...)``: other names, or none)
      <name> per site    ``Lab.site(name, profile)``: open, forward, easy, easy-fw, hard, cgnat

Every agent gets ``--stun-server`` for both responders. :func:`pair_matrix` reads every agent's
``/status`` once and gives, per ordered pair, the path (``lan`` / ``direct`` / ``relay`` / ``none``),
whether the peer is up, and its ``connect_time`` (seconds from both sides' candidates known to the first
handshake, the agent's own figure). :func:`expected_path` is what nat.md §2 says the pair must get
(``netns.natprofiles.direct_possible``). Used by tests/integration/test_nat_matrix.py,
test_blindness.py, test_traversal_netns.py, test_traversal_upgrade.py, test_endpoint_discovery.py and
bench/nat_traversal.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from netns.lab import Lab, LabError, Node, Site
from netns.mesh import MeshLab, MeshNode
from netns.natprofiles import direct_possible
from netns.probe import PingResult, ping

INTERNET = "203.0.113"
STUN_IPS = (f"{INTERNET}.2", f"{INTERNET}.3")  # the registry host's two internet addresses
STUN_PORT = 3478
DISC_PORT = 3000
RELAY = "relay"
PROFILES = ("open", "forward", "easy", "easy-fw", "hard", "cgnat")
# The full pair matrix (agent name -> profile): every profile, plus a second easy (easy<->easy, the
# pollution case) and a second hard (symmetric<->symmetric): 8 agents, 28 pairs. Used by
# tests/integration/test_nat_matrix.py and bench/nat_traversal.py.
MATRIX_AGENTS: Mapping[str, str] = MappingProxyType(
    {
        "open": "open",
        "forward": "forward",
        "easy": "easy",
        "easy-2": "easy",
        "easy-fw": "easy-fw",
        "hard": "hard",
        "hard-2": "hard",
        "cgnat": "cgnat",
    }
)


def stun_flags() -> tuple[str, ...]:
    """``--stun-server`` for both responders."""
    return tuple(a for ip in STUN_IPS for a in ("--stun-server", f"{ip}:{STUN_PORT}"))


@dataclass(frozen=True)
class Link:
    """One ordered pair as the first node's agent sees the second."""

    path: str  # lan | direct | relay | none
    up: bool
    connect_time: float | None
    relay_via: str | None = None
    why_not_direct: str | None = None


@dataclass
class TraversalLab:
    lab: Lab
    ml: MeshLab
    disc: Node
    url: str
    sites: dict[str, Site]  # every agent's site, the relays' included
    profiles: dict[str, str]  # agent name -> NAT profile (the relays: open)
    agent_flags: tuple[str, ...] = ()
    relays: tuple[str, ...] = (RELAY,)  # the public relay nodes' names (each in sites and profiles)
    node_flags: Mapping[str, Sequence[str]] = field(default_factory=dict)  # more flags for some agents

    def start_agents(self) -> None:
        """``kubespan run`` in every site (with ``--stun-server`` for both responders; ``--relay`` on the
        relay nodes); does not wait."""
        for name, site in self.sites.items():
            if name not in self.ml.nodes:
                relay = ("--relay",) if name in self.relays else ()
                own = self.node_flags.get(name, ())
                self.ml.start_node(site.node, *stun_flags(), *relay, *self.agent_flags, *own)

    @property
    def agents(self) -> dict[str, MeshNode]:
        return self.ml.nodes

    @property
    def names(self) -> list[str]:
        """The agents behind the requested profiles, in the order given (the relays not included)."""
        return [n for n in self.profiles if n not in self.relays]

    def pairs(self, names: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """Unordered pairs of ``names`` (default: every agent but the relays)."""
        return list(itertools.combinations(self.names if names is None else names, 2))

    def relay_pairs(self, names: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """(name, relay) for each of ``names`` and each relay node (none when the lab has no relay)."""
        return [(n, r) for r in self.relays for n in (self.names if names is None else names)]

    def expected(self, a: str, b: str) -> str:
        return expected_path(self.profiles[a], self.profiles[b])

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for name, mn in self.agents.items():
            try:
                out[name] = mn.status()
            except LabError:
                out[name] = None
        return out

    def matrix(self) -> dict[tuple[str, str], Link]:
        return pair_matrix(self.statuses())

    def settled(self, names: Sequence[str] | None = None) -> bool:
        """Every pair of ``names`` up on both sides on the path nat.md §2 expects, and each of them up
        with each relay node (direct: it is public), which relayed pairs depend on."""
        m = self.matrix()
        for a, b in self.pairs(names) + self.relay_pairs(names):
            want = self.expected(a, b)
            for x, y in ((a, b), (b, a)):
                link = m.get((x, y))
                if link is None or not link.up or link.path != want:
                    return False
        return True

    def wait_settled(self, timeout: float, names: Sequence[str] | None = None) -> float:
        """Wait until :meth:`settled`; return the seconds it took; TimeoutError with the matrix."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.settled(names):
                return time.monotonic() - t0
            time.sleep(0.5)
        raise TimeoutError(f"matrix not settled in {timeout:.0f}s:\n{self.describe()}\n{self.logs()}")

    def describe(self) -> str:
        """One line per unordered pair: profiles, expected and seen paths (both sides), connect times."""
        m = self.matrix()
        lines = []
        for a, b in self.pairs() + self.relay_pairs():
            ab, ba = m.get((a, b)), m.get((b, a))
            seen = "/".join(x.path if x else "?" for x in (ab, ba))
            cts = "/".join(f"{x.connect_time}" if x else "?" for x in (ab, ba))
            why = (ab.why_not_direct if ab else None) or (ba.why_not_direct if ba else None)
            lines.append(
                f"  {a}({self.profiles[a]})<->{b}({self.profiles[b]}): want {self.expected(a, b)}, "
                f"seen {seen}, connect {cts}" + (f", {why}" if why else "")
            )
        return "\n".join(lines)

    def logs(self, n: int = 15) -> str:
        return "\n".join(f"--- {name}\n{mn.log_tail(n)}" for name, mn in self.agents.items())

    def mesh_addresses(self) -> dict[str, str]:
        return {n: st["mesh_address"] for n, st in self.statuses().items() if st is not None}

    def ping(self, a: str, b: str, count: int = 3) -> PingResult:
        """``count`` pings from ``a`` to ``b``'s mesh address (bounded by ping's own timeout)."""
        addr = self.agents[b].status()["mesh_address"]
        return ping(self.agents[a], addr, count, 2, 0.2)


def expected_path(a: str, b: str) -> str:
    """``direct`` where nat.md §2 says two profiles can connect without a relay, else ``relay``."""
    return "direct" if direct_possible(a, b) else "relay"


def pair_matrix(statuses: Mapping[str, dict[str, Any] | None]) -> dict[tuple[str, str], Link]:
    """{(a, b): Link} for every peer ``b`` each readable status ``a`` lists (by label)."""
    out: dict[tuple[str, str], Link] = {}
    for a, st in statuses.items():
        for p in (st or {}).get("peers", []):
            out[(a, p["label"])] = Link(
                path=p.get("path", "none"),
                up=p.get("state") == "up",
                connect_time=p.get("connect_time"),
                relay_via=p.get("relay_via"),
                why_not_direct=p.get("why_not_direct"),
            )
    return out


def pair_connect_time(m: Mapping[tuple[str, str], Link], a: str, b: str) -> float | None:
    """The pair's time from both candidates known to the first handshake: each side measures from when
    it learned the other, so the later learner's figure (the smaller one) starts when both knew."""
    times = [lk.connect_time for lk in (m.get((a, b)), m.get((b, a))) if lk and lk.connect_time is not None]
    return min(times) if times else None


def start_registry(ml: MeshLab, disc: Node, *extra: str) -> str:
    """discovery-service on ``STUN_IPS[0]:DISC_PORT`` with STUN on both addresses; waits until it serves."""
    url = ml.start_discovery(
        disc,
        f"{STUN_IPS[0]}:{DISC_PORT}",
        *(a for ip in STUN_IPS for a in ("--stun-addr", f"{ip}:{STUN_PORT}")),
        *extra,
    )
    log = ml.lab.dir / f"discovery-{disc.name}.log"
    ml.wait("discovery-service serving", lambda: log.exists() and '"serving"' in log.read_text(), 30)
    return url


def build(
    lab: Lab,
    profiles: Mapping[str, str] | Iterable[str] = PROFILES,
    *,
    relays: Sequence[str] = (RELAY,),
    registry_flags: Sequence[str] = (),
    agent_flags: Sequence[str] = (),
    node_flags: Mapping[str, Sequence[str]] | None = None,
    cluster_id: str = "nat-matrix",
    start: bool = True,
) -> TraversalLab:
    """The registry (with STUN on two addresses), the public relay nodes (``relays``: by default one,
    named ``relay``; ``()`` for none) and one agent per profile (a mapping gives agent names; a list
    names each agent after its profile), all started with ``--stun-server`` for both responders and
    ``agent_flags`` (``node_flags``: more flags for the agents it names). Returns once discovery serves and every agent is started
    (not yet connected: see :meth:`TraversalLab.wait_settled`); with ``start=False`` the sites are built
    but no agent runs until :meth:`TraversalLab.start_agents`."""
    named = dict(profiles) if isinstance(profiles, Mapping) else {p: p for p in profiles}
    if clash := set(named) & set(relays):
        raise LabError(f"{sorted(clash)} named both as an agent and as a relay node")
    ml = MeshLab(lab, cluster_id=cluster_id)
    disc = lab.node("disc")
    lab.attach(disc, lab.internet(), [f"{ip}/24" for ip in STUN_IPS])
    url = start_registry(ml, disc, *registry_flags)
    order = dict.fromkeys(relays, "open") | named
    sites = {name: lab.site(name, prof) for name, prof in order.items()}
    if unknown := set(node_flags or ()) - set(order):
        raise LabError(f"node_flags for {sorted(unknown)}: no such agent")
    tl = TraversalLab(
        lab, ml, disc, url, sites, order, tuple(agent_flags), tuple(relays), dict(node_flags or {})
    )
    if start:
        tl.start_agents()
    return tl
