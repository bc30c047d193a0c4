"""Mesh demo (``make demo``): two clouds behind NAT routers, a node behind a symmetric NAT, one behind two
NATs in series, a public node, a public relay node and the discovery server.

Builds this lab in network namespaces (198.51.100.0/24 plays the public internet)::

    internet 198.51.100.0/24
      disc  .2 .3  discovery-service :3000, STUN responder on .2:3478 and .3:3478
      pub   .10  mesh node with a public address
      relay .13  public mesh node that relays (kubespan run --relay)
      nat-a .11  EIM NAT router ── cloud A 10.1.0.0/24: a1 .11, a2 .12
      nat-b .12  EIM NAT router ── cloud B 10.2.0.0/24: b1 .11, b2 .12
      h1    .21  behind a symmetric NAT (masquerade fully-random, a new port per destination)
      c1    .22  behind a home NAT behind a carrier NAT (CGNAT: two NATs in series)

starts ``kubespan run`` (real wireguard-go, nftables, policy routing; ``--stun-server`` for both
responders) in every node, shows the mesh converging, prints every node's ``kubespan status``, which pairs
are direct (LAN, or punched through the NATs) and which relayed, a ping matrix over the mesh addresses and
a check that traffic to a node's own (underlay) address is carried by the tunnel, then tears everything
down and checks that nothing is left. Exit status 0 only when every peer link came up, every pair took the
path nat.md §2 predicts and every ping passed. ``--keep`` leaves the lab up after the checks, forwards every
node's page (``/`` of ``kubespan run``) to the host's loopback and prints the URLs, serves the web dashboard
of the whole mesh from those pages (``spanctl dashboard --web --agent URL ...``, a process on the host) and
prints its URL and the command that serves the same from another shell; Ctrl-C tears it down.

Needs root, iproute2, nftables and wireguard-go (``make demo`` installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns.forward import Forward
from netns.lab import Lab, LabError, Node, list_netns, sh
from netns.mesh import MeshLab, MeshNode
from netns.natprofiles import direct_verdict
from netns.probe import ping

PY = sys.executable
INTERNET = "198.51.100"  # TEST-NET-2: "public" addresses, only inside the lab
DISC_IP = f"{INTERNET}.2"
STUN_IPS = (DISC_IP, f"{INTERNET}.3")  # two responders on two addresses: enough to tell EIM from EDM
STUN_PORT = 3478
DISC_PORT = 3000
CONVERGE_TIMEOUT = 90.0
# the agents' punch timings (kubespan.nat.punch.PunchTimings defaults; netns does not import kubespan):
# a pair that found no direct answer within the window is relayed, then retried direct this long after
PUNCH_WINDOW = 10.0
PUNCH_RETRY_INITIAL = 60.0
PUNCH_RETRY_MARGIN = 20.0  # beyond a missed punch's retry time: the retry's own lead and probes
AGENT_HTTP_PORT = 51821  # kubespan run's --http-addr default (127.0.0.1), inside each node
# the spanctl next to this interpreter (the venv's), else the one on PATH
SPANCTL = str(Path(PY).parent / "spanctl") if (Path(PY).parent / "spanctl").exists() else "spanctl"
STUN_FLAGS = tuple(a for ip in STUN_IPS for a in ("--stun-server", f"{ip}:{STUN_PORT}"))


@dataclass(frozen=True)
class Cloud:
    name: str
    lan: str  # first three octets of the /24
    nat: str
    router_ip: str  # outside address
    nodes: tuple[str, ...]


CLOUDS = (
    Cloud("a", "10.1.0", "eim", f"{INTERNET}.11", ("a1", "a2")),
    Cloud("b", "10.2.0", "eim", f"{INTERNET}.12", ("b1", "b2")),
)
PUBLIC_NODE = ("pub", f"{INTERNET}.10")
RELAY_NODE = ("relay", f"{INTERNET}.13")
# nodes behind the lab's NAT profiles (netns.natprofiles): name, profile, the site's public address
SITES = (
    ("h1", "hard", f"{INTERNET}.21", "symmetric NAT (masquerade fully-random, firewall)"),
    ("c1", "cgnat", f"{INTERNET}.22", "home NAT behind a carrier NAT (two EIM NATs in series, firewalls)"),
)

# One small stdlib process per node answers "give me /status" requests on stdin with one JSON line on
# stdout: cheaper and steadier than starting a process per sample (the full `kubespan status` CLI costs
# ~0.6 s of CPU per call, too much to sample every node every second).
_POLLER = """
import http.client, sys
for _ in sys.stdin:
    try:
        c = http.client.HTTPConnection("127.0.0.1", 51821, timeout=3)
        c.request("GET", "/status")
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        line = body if r.status == 200 else "null"
    except Exception:
        line = "null"
    sys.stdout.write(line.replace(chr(10), " ") + chr(10))
    sys.stdout.flush()
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say(f"\n== {text}")


# --- talking to the nodes ------------------------------------------------------------------------------


async def run_in(node: Node, *args: str, limit: float = 20) -> tuple[int, str]:
    """Run a command inside ``node`` (its network namespace); return (exit status, stdout)."""
    proc = await asyncio.create_subprocess_exec(
        *node.argv(*args, private_run=False),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(limit):
            out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


class StatusPoller:
    """Reads one node's /status (the document ``kubespan status -o json`` prints) through ``_POLLER``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def get(self) -> dict[str, Any] | None:
        async with self.lock:
            try:
                if self.proc is None or self.proc.returncode is not None:
                    self.proc = await asyncio.create_subprocess_exec(
                        *self.node.argv(PY, "-I", "-S", "-c", _POLLER, private_run=False),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                assert self.proc.stdin is not None and self.proc.stdout is not None
                self.proc.stdin.write(b"\n")
                await self.proc.stdin.drain()
                async with asyncio.timeout(5):
                    line = await self.proc.stdout.readline()
                return json.loads(line) if line else None
            except (OSError, ValueError, TimeoutError):
                await self.close()
                return None

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self.proc = None


def links_up(st: dict[str, Any] | None, others: Sequence[str]) -> int:
    if st is None:
        return 0
    up = {p["label"] for p in st.get("peers", []) if p.get("state") == "up"}
    return sum(1 for o in others if o in up)


# --- the lab -------------------------------------------------------------------------------------------


@dataclass
class Demo:
    lab: Lab
    ml: MeshLab
    disc: Node
    routers: dict[str, Node]
    order: list[str]  # mesh node names, display order
    underlay: dict[str, str]  # mesh node -> its own address
    hosts: list[tuple[Node, int]]  # mesh node, WireGuard listen port
    profiles: dict[str, str]  # mesh node -> its NAT profile (netns.natprofiles)
    pollers: dict[str, StatusPoller] = field(default_factory=dict)

    @property
    def mesh(self) -> dict[str, MeshNode]:
        return self.ml.nodes

    def others(self, name: str) -> list[str]:
        return [o for o in self.order if o != name]

    def pairs(self) -> list[tuple[str, str]]:
        """Every unordered pair of mesh nodes, in display order."""
        return [(a, b) for i, a in enumerate(self.order) for b in self.order[i + 1 :]]

    async def status(self, name: str) -> dict[str, Any] | None:
        if name not in self.pollers:
            self.pollers[name] = StatusPoller(self.mesh[name].node)
        return await self.pollers[name].get()

    async def statuses(self) -> dict[str, dict[str, Any] | None]:
        got = await asyncio.gather(*(self.status(n) for n in self.order))
        return dict(zip(self.order, got, strict=True))

    async def close_pollers(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pollers.values()))


def build(lab: Lab, listen_ports: str) -> Demo:
    internet = lab.internet()
    ml = MeshLab(lab, cluster_id="kubespan-demo")
    disc = lab.node("disc")
    lab.attach(disc, internet, [f"{ip}/24" for ip in STUN_IPS])
    order: list[str] = []
    underlay: dict[str, str] = {}
    routers: dict[str, Node] = {}
    hosts: list[tuple[Node, int]] = []
    profiles: dict[str, str] = {}
    for name, ip in (PUBLIC_NODE, RELAY_NODE):
        node = lab.node(name)
        lab.attach(node, internet, [f"{ip}/24"])
        order.append(name)
        underlay[name] = ip
        hosts.append((node, 51820))
        profiles[name] = "open"
    for cloud in CLOUDS:
        seg = lab.segment(f"lan-{cloud.name}")
        routers[cloud.name] = lab.router(
            f"nat-{cloud.name}", seg, internet, f"{cloud.lan}.1/24", f"{cloud.router_ip}/24", nat=cloud.nat
        )
        for i, name in enumerate(cloud.nodes):
            node = lab.node(name)
            ip = f"{cloud.lan}.{11 + i}"
            lab.attach(node, seg, [f"{ip}/24"])
            order.append(name)
            underlay[name] = ip
            hosts.append((node, 51820 + i if listen_ports == "distinct" else 51820))
            profiles[name] = "easy-fw"  # masquerade (EIM, port-restricted) behind a firewall
    for name, prof, public, _ in SITES:
        site = lab.site(name, prof, f"{public}/24")
        routers[name] = site.routers[0]
        order.append(name)
        underlay[name] = site.lan_ip
        hosts.append((site.node, 51820))
        profiles[name] = prof
    stun = [a for ip in STUN_IPS for a in ("--stun-addr", f"{ip}:{STUN_PORT}")]
    ml.start_discovery(disc, f"{DISC_IP}:{DISC_PORT}", "--no-rpc-log", *stun)
    return Demo(lab, ml, disc, routers, order, underlay, hosts, profiles)


async def wait_discovery(demo: Demo, within: float = 20) -> None:
    probe = (
        "import socket, sys, time\n"
        f"end = time.monotonic() + {within}\n"
        "while True:\n"
        "    try:\n"
        f"        socket.create_connection(({DISC_IP!r}, {DISC_PORT}), timeout=1).close(); break\n"
        "    except OSError:\n"
        "        if time.monotonic() > end: sys.exit(1)\n"
        "        time.sleep(0.1)\n"
    )
    code, _ = await run_in(demo.disc, PY, "-I", "-S", "-c", probe, limit=within + 5)
    if code != 0:
        log = demo.lab.dir / f"discovery-{demo.disc.name}.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        raise LabError(
            f"discovery-service did not listen on {DISC_IP}:{DISC_PORT} within {within:.0f} s; log tail:\n{tail}"
        )


def start_agents(demo: Demo) -> None:
    for node, port in demo.hosts:
        extra = [] if port == 51820 else ["--listen-port", str(port)]
        if node.name == RELAY_NODE[0]:
            extra.append("--relay")
        demo.ml.start_node(node, *STUN_FLAGS, *extra)


async def converge(demo: Demo, within: float) -> tuple[bool, float, dict[str, dict[str, Any] | None]]:
    """One progress line per second until every node has every other node up, or ``within`` seconds."""
    total = len(demo.order) * (len(demo.order) - 1)
    t0 = time.monotonic()
    states: dict[str, dict[str, Any] | None] = {}
    tick = t0
    while True:
        states = await demo.statuses()
        per = {n: links_up(states[n], demo.others(n)) for n in demo.order}
        up = sum(per.values())
        elapsed = time.monotonic() - t0
        detail = "  ".join(
            f"{n} {per[n]}/{len(demo.others(n))}" if states[n] is not None else f"{n} starting"
            for n in demo.order
        )
        say(f"  [{tick - t0:3.0f}s] peer links up {up:2d}/{total}   {detail}")
        if up == total:
            return True, elapsed, states
        dead = [n for n in demo.order if not _agent_running(demo.mesh[n])]
        if dead:
            say(f"  agent exited on: {', '.join(dead)}")
            return False, elapsed, states
        if elapsed >= within:
            return False, elapsed, states
        tick += 1.0  # one line per second, on a fixed grid (a slow sample skips a slot)
        while tick <= time.monotonic():
            tick += 1.0
        await asyncio.sleep(tick - time.monotonic())


def _agent_running(mn: MeshNode) -> bool:
    return any(p.poll() is None for p in mn.node.procs if "kubespan.cli" in " ".join(map(str, p.args)))


# --- what the demo shows -------------------------------------------------------------------------------


async def show_status_tables(demo: Demo) -> None:
    async def one(name: str) -> str:
        code, out = await run_in(demo.mesh[name].node, PY, "-m", "kubespan.cli", "status", limit=30)
        return out.rstrip() if code == 0 else f"(kubespan status failed: {out.strip()})"

    outs = await asyncio.gather(*(one(n) for n in demo.order))
    for name, out in zip(demo.order, outs, strict=True):
        say(f"\n-- {name} ({demo.underlay[name]}): kubespan status")
        for line in out.splitlines():
            say(f"   {line}")


def show_paths(demo: Demo, states: dict[str, dict[str, Any] | None]) -> None:
    """How every link is reached: over the LAN, at the endpoint the peer published (its public IP as
    discovery saw it, with its listen port), or at a NAT mapping some node learned when the peer's packets
    arrived from there (WireGuard roaming) and published for it through discovery."""
    lan = {n: demo.underlay[n].rsplit(".", 1)[0] + "." for n in demo.order}
    counts = {"LAN": 0, "published": 0, "learned": 0, "relayed": 0}
    mapped: dict[tuple[str, str], tuple[list[str], list[str]]] = {}  # (peer, endpoint) -> users, learners
    for name in demo.order:
        for p in (states.get(name) or {}).get("peers", []):
            ep, peer = p.get("endpoint") or "", p["label"]
            published = (states.get(peer) or {}).get("endpoints", [])
            if p.get("path") == "relay":
                counts["relayed"] += 1
            elif ep.startswith(lan[name]) and not ep.startswith(INTERNET):
                counts["LAN"] += 1
            elif ep in published:
                counts["published"] += 1
            elif ep:
                counts["learned"] += 1
                users, learners = mapped.setdefault((peer, ep), ([], []))
                users.append(name)
                if ep in p.get("learned", ()):
                    learners.append(name)
    say(
        f"  links by endpoint: {counts['LAN']} over the LAN, {counts['published']} at the endpoint the peer "
        f"published, {counts['learned']} at a NAT mapping learned by roaming or punching, "
        f"{counts['relayed']} at a relay allocation"
    )
    for (peer, ep), (users, learners) in sorted(mapped.items()):
        public = [e for e in (states.get(peer) or {}).get("endpoints", []) if e.startswith(INTERNET)]
        why = ""
        if demo.profiles.get(peer) == "hard":
            why = f" (its symmetric NAT gives every destination another port, so {peer} publishes none)"
        elif public and public[0].rsplit(":", 1)[0] == ep.rsplit(":", 1)[0]:
            why = f" (a neighbour holds {public[0]}, the endpoint {peer} publishes, so its NAT picked another port)"
        who = " and ".join(learners) if learners else "a peer"
        say(
            f"    {peer} is reached at {ep}{why}: {who} learned it when {peer}'s packets came from there; "
            f"used by {', '.join(users)}"
        )


def expected_path(demo: Demo, a: str, b: str) -> tuple[str, str]:
    """The path nat.md §2 predicts for a pair, and why: ``lan`` inside one cloud, else ``direct`` or
    ``relay`` by the two NAT profiles (``netns.natprofiles.direct_verdict``)."""
    cloud = {n: c.name for c in CLOUDS for n in c.nodes}
    if a in cloud and cloud.get(a) == cloud.get(b):
        return "lan", "same LAN"
    v = direct_verdict(demo.profiles[a], demo.profiles[b])
    return ("direct" if v.possible else "relay"), v.reason


def _peer_rows(demo: Demo, states: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each node's status rows by peer label."""
    return {n: {p["label"]: p for p in (states.get(n) or {}).get("peers", [])} for n in demo.order}


def _pair(
    peers: dict[str, dict[str, dict[str, Any]]], a: str, b: str
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The two sides' status rows of a pair (empty when missing) and whether both report it up."""
    pa, pb = peers[a].get(b) or {}, peers[b].get(a) or {}
    return pa, pb, pa.get("state") == "up" and pb.get("state") == "up"


def _pair_names(pairs: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{a} ↔ {b}" for a, b in pairs)


def missed_punches(demo: Demo, states: dict[str, dict[str, Any] | None]) -> list[tuple[str, str]]:
    """Pairs up but relayed where nat.md §2 predicts a direct path: a punch that missed. Under load the
    side that published first can get the peer's intent back after the punch's start and send no
    openers (``PunchTimings``); the relay then carries the pair and the agents retry direct later."""
    peers = _peer_rows(demo, states)
    missed = []
    for a, b in demo.pairs():
        pa, pb, up = _pair(peers, a, b)
        if up and expected_path(demo, a, b)[0] == "direct" and "relay" in (pa.get("path"), pb.get("path")):
            missed.append((a, b))
    return missed


async def await_punch_retries(demo: Demo, states: dict[str, dict[str, Any] | None]) -> None:
    """After a missed punch, wait for the agents' retry (``PUNCH_RETRY_INITIAL`` after the punch
    window) instead of judging the pair on its relay."""
    missed = missed_punches(demo, states)
    if not missed:
        return
    limit = PUNCH_RETRY_INITIAL + PUNCH_WINDOW + PUNCH_RETRY_MARGIN
    say(
        f"  relayed where a direct path is predicted: {_pair_names(missed)} (a punch missed its start under load); the "
        f"agents retry direct {PUNCH_RETRY_INITIAL:g} s after the {PUNCH_WINDOW:g} s punch window: waiting up to {limit:.0f} s"
    )
    t0 = time.monotonic()
    while missed and time.monotonic() - t0 < limit:
        await asyncio.sleep(1.0)
        missed = missed_punches(demo, await demo.statuses())
    took = time.monotonic() - t0
    say(
        f"  after {took:.0f} s: "
        + (f"still relayed: {_pair_names(missed)}" if missed else "direct after the retry")
    )


def show_traversal(demo: Demo, states: dict[str, dict[str, Any] | None]) -> int:
    """Every pair: direct (over the LAN, or through the NATs: the public side's endpoint or a punched
    hole) or relayed, as each side's agent reports it (``path``, ``relay_via``, ``why_not_direct``,
    ``connect_time``); returns the number of pairs not up, or not on the path nat.md §2 predicts."""
    peers = _peer_rows(demo, states)
    width = max(len(n) for n in demo.order) * 2 + 5
    counts = {"lan": 0, "direct": 0, "relay": 0}
    bad = 0
    pairs = demo.pairs()
    for a, b in pairs:
        want, reason = expected_path(demo, a, b)
        pa, pb, up = _pair(peers, a, b)
        path_a, path_b = pa.get("path", "none"), pb.get("path", "none")
        got = path_a if path_a == path_b else f"{path_a}/{path_b}"
        ok = up and got == want
        bad += not ok
        if ok:
            counts[got] += 1
        text = {"lan": "direct, over the LAN", "direct": "direct"}.get(got, got)
        if got == "relay":
            text = f"relayed via {pa.get('relay_via') or pb.get('relay_via')} ({pa.get('why_not_direct') or reason})"
        times = [t for t in (pa.get("connect_time"), pb.get("connect_time")) if t is not None]
        ct = f", first handshake {min(times):.1f} s after both knew each other" if times else ""
        say(
            f"  {'✓' if ok else '✗'} {f'{a} ↔ {b}'.ljust(width)} {text}{ct}"
            + ("" if ok else f" (want {want})")
        )
    connected = len(pairs) - bad
    say(
        f"  {connected}/{len(pairs)} pairs connected ({100 * connected / len(pairs):.0f} %): "
        f"{counts['lan']} direct over a LAN, {counts['direct']} direct through the NATs, "
        f"{counts['relay']} relayed via {RELAY_NODE[0]}"
    )
    return bad


async def ping_matrix(demo: Demo, addrs: dict[str, str]) -> int:
    """Ping every ordered pair over the mesh addresses; print a matrix; return the number of failures."""
    pairs = [(a, b) for a in demo.order for b in demo.order if a != b]
    sem = asyncio.Semaphore(8)

    async def one(a: str, b: str) -> tuple[str, str, Any]:
        async with sem:
            r = await asyncio.to_thread(ping, demo.mesh[a], addrs[b], 3, 2, 0.2)
            return a, b, r

    results = {(a, b): r for a, b, r in await asyncio.gather(*(one(a, b) for a, b in pairs))}
    width = 11
    say("  " + "from \\ to".ljust(6) + "".join(n.rjust(width) for n in demo.order))
    failed = 0
    for a in demo.order:
        cells = []
        for b in demo.order:
            if a == b:
                cells.append("·".rjust(width))
                continue
            r = results[(a, b)]
            if r.ok:
                avg = sum(r.rtts) / len(r.rtts) if r.rtts else 0.0
                cells.append(f"✓ {avg:.2f}ms".rjust(width))
            else:
                failed += 1
                cells.append(f"✗ {r.received}/{r.sent}".rjust(width))
        say("  " + a.ljust(9) + "".join(cells))
    say(f"  {len(pairs) - failed}/{len(pairs)} ordered pairs answered (3 pings each, average RTT)")
    return failed


async def tunnel_check(demo: Demo, src: str, dst: str, note: str) -> bool:
    """Traffic from ``src`` to ``dst``'s own underlay address is marked by nftables, routed by table 180 into
    the tunnel and counted in ``src``'s WireGuard tx for peer ``dst``."""
    target = demo.underlay[dst]
    mn = demo.mesh[src]

    async def tx() -> int:
        st = await demo.status(src)
        return next((int(p["tx_bytes"]) for p in (st or {}).get("peers", []) if p["label"] == dst), -1)

    size, count = 1000, 5
    before = await tx()
    _, route = await run_in(mn.node, "ip", "route", "get", target, "mark", "0x40")
    _, out = await run_in(
        mn.node, "ping", "-4", "-n", "-c", str(count), "-i", "0.2", "-W", "2", "-s", str(size), target
    )
    m = re.search(r"(\d+) received", out)
    received = int(m.group(1)) if m else 0
    answered = received == count
    grew = 0
    for _ in range(30):  # the agent reads WireGuard's counters once a second
        grew = await tx() - before
        if grew >= count * size:
            break
        await asyncio.sleep(0.1)
    carried = answered and before >= 0 and grew >= count * size
    via = "dev kubespan table 180" if "dev kubespan" in route and "table 180" in route else route.strip()
    say(
        f"  {'✓' if carried else '✗'} {src} → {target} ({dst}'s own address{note}): "
        f"{received}/{count} pings of {size} B answered, {src}'s WireGuard tx "
        f"to peer {dst} +{grew} B; nftables mark 0x40 → {via}"
    )
    return carried


# --- teardown ------------------------------------------------------------------------------------------


async def stop_agents(demo: Demo, grace: float = 10) -> None:
    """SIGTERM every agent at once while discovery still runs (each says goodbye to discovery, then removes
    its link, routes, rules and nftables table); SIGKILL any still running after ``grace`` seconds."""
    procs = {
        name: p
        for name, mn in demo.mesh.items()
        for p in mn.node.procs
        if p.poll() is None and "kubespan.cli" in " ".join(map(str, p.args))
    }
    t0 = time.monotonic()
    for p in procs.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    while any(p.poll() is None for p in procs.values()) and time.monotonic() - t0 < grace:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    took = time.monotonic() - t0
    stuck = [n for n, p in procs.items() if p.poll() is None]
    for name in stuck:
        say(f"  ✗ {name}: agent still running {grace:.0f} s after SIGTERM; killing it. Its log tail:")
        for line in demo.mesh[name].log_tail(8).splitlines():
            say(f"      {line}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(procs[name].pid, signal.SIGKILL)
    codes = {n: p.poll() for n, p in procs.items() if n not in stuck}
    bad = {n: c for n, c in codes.items() if c != 0}
    if codes:
        say(
            f"  {len(codes)} agents left the mesh in {took:.1f} s"
            + (f" (exit codes {bad})" if bad else " (SIGTERM, exit 0)")
        )


def lab_pids(lab: Lab) -> set[int]:
    pids: set[int] = set()
    for node in lab.nodes.values():
        pids.update(node.pids())
        pids.update(p.pid for p in node.procs)
    return pids


def leftovers(lab_id: str, lab_dir: Path, pids: set[int]) -> list[str]:
    left = []
    ns = [n for n in list_netns() if n.startswith(f"{lab_id}-")]
    if ns:
        left.append(f"namespaces {ns}")
    alive = []
    for pid in sorted(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(pid)
    if alive:
        left.append(f"processes {alive}")
    if lab_dir.exists():
        left.append(f"directory {lab_dir}")
    veth = f"kv{os.getpid() % 100000}"
    host_links = [ln for ln in sh("ip", "-o", "link", check=False).stdout.splitlines() if f": {veth}" in ln]
    if host_links:
        left.append(f"{len(host_links)} host links")
    return left


async def report_failure(demo: Demo, took: float, states: dict[str, dict[str, Any] | None]) -> None:
    total = len(demo.order) * (len(demo.order) - 1)
    up = sum(links_up(states.get(n), demo.others(n)) for n in demo.order)
    say(f"\nFAILED: the mesh did not form: {up}/{total} peer links up after {took:.0f} s")
    missing = []
    for n in demo.order:
        st = states.get(n)
        peers = {p["label"]: p for p in (st or {}).get("peers", [])}
        for o in demo.others(n):
            p = peers.get(o)
            if p is None or p["state"] != "up":
                what = "not a peer" if p is None else f"{p['state']}, trying {p.get('endpoint') or '-'}"
                missing.append(f"{n}→{o} ({what})")
    say(f"  links not up: {', '.join(missing)}")
    heading("agent log tails")
    for name in demo.order:
        say(f"--- {name} ({demo.mesh[name].log})")
        for line in demo.mesh[name].log_tail(15).splitlines():
            say(f"    {line}")
    heading("peer status of every node (kubespan status)")
    await show_status_tables(demo)


async def show_mesh(demo: Demo) -> bool:
    """Status tables, how links are reached, ping matrix, underlay-through-tunnel check; True when all pass."""
    heading("peer status of every node (kubespan status)")
    await show_status_tables(demo)
    final = await demo.statuses()
    show_paths(demo, final)
    heading("which pairs are direct and which relayed (as nat.md §2 predicts)")
    off_path = show_traversal(demo, final)
    addrs = {n: (final[n] or {}).get("mesh_address", "") for n in demo.order}
    heading("ping matrix over the mesh addresses (fdXX:…::/64)")
    failed = await ping_matrix(demo, addrs)
    heading("traffic to a node's own (underlay) address goes through the tunnel too")
    same_lan = await tunnel_check(demo, "a1", "a2", ", same LAN: would go direct without the mesh")
    other_cloud = await tunnel_check(
        demo, "b1", "a1", ", private, in the other cloud: reachable only through the mesh"
    )
    return failed == 0 and same_lan and other_cloud and off_path == 0


# --- the whole demo ------------------------------------------------------------------------------------


async def run_demo(lab: Lab, ns: argparse.Namespace, holder: list[Demo]) -> int:
    """Build, start, wait, show; return the exit status. Teardown is the caller's (it must not be cancelled)."""
    heading(
        "building the lab: internet, two clouds behind NAT routers, a symmetric NAT, a CGNAT, public nodes"
    )
    demo = build(lab, ns.listen_ports)
    holder.append(demo)
    say(
        f"  internet {INTERNET}.0/24: discovery {DISC_IP}:{DISC_PORT} with STUN on "
        f"{' and '.join(f'{ip}:{STUN_PORT}' for ip in STUN_IPS)}, {PUBLIC_NODE[0]} {PUBLIC_NODE[1]}, "
        f"{RELAY_NODE[0]} {RELAY_NODE[1]} (relays for pairs that cannot connect directly)"
    )
    for cloud in CLOUDS:
        members = ", ".join(f"{n} {demo.underlay[n]}" for n in cloud.nodes)
        say(
            f"  cloud {cloud.name.upper()} {cloud.lan}.0/24 behind nat-{cloud.name} ({cloud.nat.upper()} NAT, "
            f"outside {cloud.router_ip}, firewall drops unsolicited inbound): {members}"
        )
    for name, _, public, what in SITES:
        say(f"  {name} {demo.underlay[name]} behind a {what}, public {public}")
    await wait_discovery(demo)
    heading(f"starting kubespan on {len(demo.order)} nodes (wireguard-go, nftables, table 180)")
    start_agents(demo)
    say(
        "  nodes in one cloud meet over their LAN; behind a NAT each agent learns its public mapping and NAT "
        "class from the two STUN responders, pairs behind NATs agree on a punch time through discovery "
        "(encrypted) and punch; where no hole can be punched (the symmetric NAT against port-restricted "
        "ones) the pair is relayed by the relay node after the 10 s punch window"
    )
    ok, took, states = await converge(demo, ns.timeout)
    if not ok:
        await report_failure(demo, took, states)
        return 1
    say(f"  mesh formed in {took:.1f} s")
    await await_punch_retries(demo, states)
    code = 0 if await show_mesh(demo) else 1
    if ns.keep:
        await keep_up(demo)
    return code


async def keep_up(demo: Demo) -> None:
    """``--keep``: forward every node's page to the host's loopback, say how to look at it, and wait
    for Ctrl-C (or SIGTERM), which ends the wait rather than the demo: the caller tears down."""
    heading("the lab stays up (--keep): every node's page (kubespan run's /), forwarded to this host")
    forwards: list[Forward] = []
    dashboard: asyncio.subprocess.Process | None = None
    try:
        urls: list[str] = []
        for name in demo.order:
            node = demo.mesh[name].node
            fwd = Forward(lambda node=node: node.connect_tcp("127.0.0.1", AGENT_HTTP_PORT))
            forwards.append(fwd)
            urls.append(f"http://127.0.0.1:{await fwd.start()}")
            say(f"  {name:6} {urls[-1]}/")
        first = demo.mesh[demo.order[0]].node
        say(
            f"  from a shell, inside a node: ip netns exec {first.ns} {PY} -m kubespan.cli status "
            f"(or curl -s http://127.0.0.1:{AGENT_HTTP_PORT}/status)"
        )
        dashboard, url = await start_dashboard(demo, urls)
        if url:
            say(f"  the web dashboard of the whole mesh (reads the pages above every second): {url}")
        else:
            say(f"  the web dashboard did not start (see {demo.lab.dir / 'dashboard.log'}); run it yourself:")
        agents = " ".join(f"--agent {u}" for u in urls)
        say(
            f"  {'the same from another shell' if url else 'from another shell'}: {SPANCTL} dashboard --web {agents}"
        )
        say(f"  Ctrl-C (or kill -INT {os.getpid()}) tears the lab down")
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass  # the signal handler's cancel: on to the teardown
    finally:
        if dashboard is not None:
            await stop_dashboard(dashboard)
        for fwd in forwards:
            await fwd.close()


async def start_dashboard(demo: Demo, urls: list[str]) -> tuple[asyncio.subprocess.Process | None, str]:
    """Start ``spanctl dashboard --web 127.0.0.1:0 --agent URL ...`` on the host (a process: the lab
    does not import the product); the process and its page's URL, or ``(None, "")`` when it did not
    start (the demo goes on: the printed command still works). Its stderr goes to the lab's
    ``dashboard.log`` (kept with ``--keep-logs``)."""
    argv = [PY, "-m", "machined.spanctl.main", "dashboard", "--web", "127.0.0.1:0"]
    argv += [a for u in urls for a in ("--agent", u)]
    with open(demo.lab.dir / "dashboard.log", "ab") as log:  # noqa: ASYNC230 - a local file, instant
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
    except TimeoutError:
        line = ""
    except asyncio.CancelledError:  # Ctrl-C while it starts: not left behind
        await stop_dashboard(proc)
        raise
    if m := re.match(r"dashboard: (http://\S+/)", line):
        return proc, m[1]
    await stop_dashboard(proc)
    return None, ""


async def stop_dashboard(proc: asyncio.subprocess.Process) -> None:
    """SIGINT (as Ctrl-C), then SIGKILL after 5 s; reaped either way."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def teardown(lab: Lab, demo: Demo | None, keep_logs: Path | None = None) -> int:
    """Stop everything and check that nothing is left; return 0 when clean. Never cancelled."""
    heading("tearing down")
    t0 = time.monotonic()
    pids = lab_pids(lab)
    lab_id, lab_dir = lab.id, lab.dir
    try:
        if demo is not None:
            await demo.close_pollers()
            await stop_agents(demo)  # all at once, while discovery still answers their goodbye
    finally:
        if keep_logs is not None:
            copy_logs(lab.dir, keep_logs)
        await lab.aclose()
        # namespaces a command interrupted half-way (e.g. by Ctrl-C) may not be registered with the lab
        stray = sweep(lab_id, lab_dir)
    left = leftovers(lab_id, lab_dir, pids)
    if left:
        say(f"  ✗ left behind: {'; '.join(left)}")
        return 1
    extra = f" (swept {len(stray)} half-made namespaces: {', '.join(stray)})" if stray else ""
    say(
        f"  ✓ nothing left ({time.monotonic() - t0:.1f} s): {len(pids)} processes gone, no {lab_id}-* "
        f"namespaces, no host links, no temp directory{extra}"
    )
    return 0


def copy_logs(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for log in src.glob("*.log"):
        shutil.copy(log, dest / log.name)
    say(f"  logs kept in {dest}")


def sweep(lab_id: str, lab_dir: Path) -> list[str]:
    stray = [n for n in list_netns() if n.startswith(f"{lab_id}-")]
    for n in stray:
        for pid in sh("ip", "netns", "pids", n, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", n, check=False)
    shutil.rmtree(lab_dir, ignore_errors=True)
    return stray


async def demo_main(ns: argparse.Namespace) -> int:
    t_start = time.monotonic()
    loop = asyncio.get_running_loop()
    work: asyncio.Task[int] | None = None
    interrupted: list[str] = []

    def on_signal(signame: str) -> None:
        if not interrupted:
            say(f"\n!! {signame}: stopping, tearing the lab down")
            if work is not None:
                work.cancel()
        else:
            say(f"!! {signame} again: still tearing down (bounded, a few seconds)")
        interrupted.append(signame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        lab = Lab()
    except LabError as e:
        say(f"FAILED: {e}")
        return 1
    holder: list[Demo] = []
    code = 1
    try:
        if not interrupted:
            work = asyncio.create_task(run_demo(lab, ns, holder))
            try:
                code = await work
            except asyncio.CancelledError:
                code = 130
            except Exception as e:
                await asyncio.sleep(0.1)  # a Ctrl-C also kills the command running: let its handler run first
                if interrupted:
                    code = 130
                else:
                    say(f"\nFAILED: {e}" if isinstance(e, LabError) else "\nFAILED: unexpected error")
                    if not isinstance(e, LabError):
                        traceback.print_exc()
                    code = 1
        else:
            code = 130
    finally:
        clean = await teardown(lab, holder[0] if holder else None, ns.keep_logs)
    code = code or (0 if clean == 0 else 1)
    verdict = {0: "demo finished", 130: "demo interrupted"}.get(code, "demo FAILED")
    say(f"\n== {verdict} in {time.monotonic() - t_start:.1f} s")
    if code == 0 and not ns.keep:
        say(
            "   to look at the mesh live: make demo DEMO_ARGS=--keep (python -m netns.demo --keep) keeps the "
            "lab up until Ctrl-C, prints each node's page URL and serves the web dashboard of the whole mesh "
            "(spanctl dashboard --web --agent URL ...)"
        )
    return code


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--timeout", type=float, default=CONVERGE_TIMEOUT, help="seconds to wait for the mesh to form"
    )
    ap.add_argument(
        "--listen-ports",
        choices=("same", "distinct"),
        default="same",
        help="WireGuard port of nodes behind one NAT: all 51820 (NAT remaps all but one), or 51820, 51821",
    )
    ap.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="copy the agents' and discovery's logs here"
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="after the checks, keep the lab up until Ctrl-C: every node's page forwarded to 127.0.0.1 and "
        "the web dashboard of the whole mesh served from them",
    )
    ns = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo builds network namespaces: run it as root (make demo)", file=sys.stderr)
        return 1
    # a command killed by the same Ctrl-C may be reaped before asyncio's child watcher sees it, which it
    # reports as a warning ("Unknown child process pid ..."): harmless here, so keep it off the screen
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    return asyncio.run(demo_main(ns))


if __name__ == "__main__":
    sys.exit(main())
