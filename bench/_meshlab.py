"""Shared plumbing for the mesh benchmarks (mesh_join, mesh_cold_start, mesh_failover, mesh_throughput).

Sampling must not perturb what it measures on a 2-core machine, so nothing here forks per sample:

* ``status(node)`` reads the agent's ``/status`` (the document ``kubespan status -o json`` prints) over a
  TCP socket created *inside* the node's network namespace by this process (``setns`` in a throwaway
  thread); the CLI costs ~0.6 s of CPU per call, this costs a few milliseconds.
* :class:`Pinger` sends ICMPv6 echo requests from raw sockets created the same way, any number of
  (source node, destination) pairs from one thread, and timestamps every request and reply with
  ``time.monotonic()``.

Everything runs inside namespaces a :class:`netns.lab.Lab` created; the lab removes them.
"""

from __future__ import annotations

import argparse
import calendar
import compileall
import contextlib
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubespan.constants import STEERINGS, MeshConfig
from netns.lab import Lab, LabError, Node
from netns.launcher import ForkedProcess
from netns.mesh import LAUNCHES, MeshLab, MeshNode
from netns.reflect import in_netns

HTTP_PORT = 51821
WG_PORT = 51820
DISC_PORT = 3000


def host_load() -> str:
    """The 1/5/15-minute load averages: other work on the same cores skews every figure here."""
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return f"load average {one} {five} {fifteen} on {os.cpu_count()} cores"


# --- sockets inside a node's network namespace (made by netns.reflect.in_netns) -------------------


def status(node: Node | MeshNode, timeout: float = 5) -> dict[str, Any]:
    """The agent's ``/status`` JSON; raises LabError when it does not answer 200."""
    n = node.node if isinstance(node, MeshNode) else node
    s = in_netns(n.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        s.settimeout(timeout)
        try:
            s.connect(("127.0.0.1", HTTP_PORT))
            s.sendall(b"GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            chunks = []
            while True:
                b = s.recv(1 << 16)
                if not b:
                    break
                chunks.append(b)
        except OSError as e:
            raise LabError(f"status of {n.name}: {e}") from None
    finally:
        s.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in line + " ":
        raise LabError(f"status of {n.name}: {line} {body[:200]!r}")
    return json.loads(body)


def peers(node: Node | MeshNode) -> dict[str, dict[str, Any]]:
    return {p["label"]: p for p in status(node)["peers"]}


def safe_peers(node: Node | MeshNode) -> dict[str, dict[str, Any]] | None:
    try:
        return peers(node)
    except (LabError, ValueError):
        return None


def full_mesh(nodes: Sequence[MeshNode]) -> bool:
    """Every node lists exactly the others, all ``up``."""
    names = {n.name for n in nodes}
    for mn in nodes:
        ps = safe_peers(mn)
        if ps is None or set(ps) != names - {mn.name} or any(p["state"] != "up" for p in ps.values()):
            return False
    return True


def wait_for(what: str, pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    """Poll ``pred`` until true; return the seconds it took; TimeoutError after ``timeout``."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not reached in {timeout:.0f} s")
        time.sleep(interval)


# --- building meshes -------------------------------------------------------------------------------


# The kernel's neighbour (ARP/ND) tables are shared by all network namespaces, and their limits
# (gc_thresh*, settable only in the initial namespace) count every namespace's entries: 50 nodes on one
# LAN hold ~2500 ARP entries, past the default hard limit of 1024, and sends to an unresolved
# neighbour then fail with ENOBUFS ("neighbour table overflow"): pairs of a 50-node mesh never
# handshake. A mesh lab raises the limits to at least these (never lowers them).
NEIGH_THRESH = {"gc_thresh1": 4096, "gc_thresh2": 16384, "gc_thresh3": 32768}


def ensure_neighbour_room() -> list[str]:
    """Raise the host's neighbour-table limits to :data:`NEIGH_THRESH` where lower; returns what changed."""
    changed = []
    for family in ("ipv4", "ipv6"):
        for key, want in NEIGH_THRESH.items():
            path = f"/proc/sys/net/{family}/neigh/default/{key}"
            try:
                with open(path) as f:
                    have = int(f.read())
                if have < want:
                    with open(path, "w") as f:
                        f.write(str(want))
                    changed.append(f"{family} {key} {have} -> {want}")
            except OSError:
                continue
    return changed


# The packages an agent (and the registry) imports from this checkout.
REPO = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = ("kubespan", "discovery", "spanutil", "spanapi")


def compile_bytecode(root: Path = REPO) -> None:
    """Bring the product's ``__pycache__`` up to date (only stale or missing files are written).

    An installed agent has its bytecode (pip compiles at install time). Agents run from a checkout under
    PYTHONDONTWRITEBYTECODE (set in this machine's sessions) instead compile every module edited since its
    ``.pyc`` was last written, each agent again: ~20 modules, ~40 ms of CPU per agent (issue 18). A lab
    calls this before any agent starts (not timed), so start-up figures are those of an installed agent.
    ``root``: the checkout holding :data:`PRODUCT_PACKAGES`. A file that does not compile is reported, not
    raised: the agent may never import it.
    """
    for pkg in PRODUCT_PACKAGES:
        if not compileall.compile_dir(root / pkg, quiet=1):  # the failing file is printed above
            print(f"  compiling {pkg} failed for some file: agents importing it will fail", flush=True)


@dataclass
class LanMesh:
    """Discovery server plus agents on one LAN segment (10.60.0.0/24)."""

    lab: Lab
    ml: MeshLab
    seg: str
    disc: Node
    nodes: list[MeshNode] = field(default_factory=list)
    env: dict[str, str] | None = None  # added to every agent's environment
    args: tuple[str, ...] = ()  # added to every agent's command line (say --steering routes)
    #: "fork": CPU seconds one agent's start-up takes that forked agents skip (see add_launch_flag);
    #: kept here: the figure is computed after the lab, and its launcher, are gone
    start_cpu: float = 0.0
    _next_ip: int = 11

    @classmethod
    def create(cls, lab: Lab, launch: str = "exec") -> LanMesh:
        """``launch``: how agents start (netns.mesh.LAUNCHES); "fork" starts the lab's launcher here,
        before anything is timed."""
        for change in ensure_neighbour_room():
            print(f"  host neighbour table: {change} (all namespaces share it)", flush=True)
        compile_bytecode()
        ml = MeshLab(lab, launch=launch)  # "fork": its launcher starts here
        start_cpu = float(lab.launcher().ready["start_cpu"]) if launch == "fork" else 0.0
        seg = lab.segment("lan")
        disc = lab.node("disc")
        lab.attach(disc, seg, ["10.60.0.2/24"])
        ml.start_discovery(disc, f"10.60.0.2:{DISC_PORT}")
        mesh = cls(lab, ml, seg, disc, start_cpu=start_cpu)
        wait_for("discovery listening", lambda: listening(disc, "10.60.0.2", DISC_PORT), timeout=30)
        return mesh

    def add_node(self, name: str) -> Node:
        """A namespace on the LAN, no agent yet."""
        if self._next_ip > 250:
            raise LabError("LanMesh: out of addresses")
        node = self.lab.node(name)
        self.lab.attach(node, self.seg, [f"10.60.0.{self._next_ip}/24"])
        self._next_ip += 1
        return node

    def start(self, node: Node) -> MeshNode:
        mn = self.ml.start_node(node, *self.args, env=self.env)
        self.nodes.append(mn)
        return mn

    def start_all(self, nodes: Sequence[Node]) -> list[MeshNode]:
        """Start agents in all of ``nodes`` back to back (forked ones in one batch)."""
        started = self.ml.start_nodes(nodes, *self.args, env=self.env)
        self.nodes.extend(started)
        return started

    def forget(self, mn: MeshNode) -> None:
        self.nodes.remove(mn)
        self.ml.nodes.pop(mn.name, None)


def listening(node: Node, addr: str, port: int) -> bool:
    """Does something accept TCP connections on ``addr:port`` as seen from ``node``?"""

    def probe() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((addr, port)) == 0

    return bool(in_netns(node.ns, probe))


def agent_proc(mn: MeshNode) -> subprocess.Popen[bytes] | ForkedProcess | None:
    for p in mn.node.procs:
        if p.poll() is None and "kubespan.cli" in " ".join(map(str, p.args)):
            return p
    return None


def stop_agent(mn: MeshNode, timeout: float = 15) -> int | None:
    """SIGTERM one agent (it leaves the mesh: deletes its discovery entry, removes its link)."""
    p = agent_proc(mn)
    if p is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        return p.wait(5)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds consumed so far by ``pids`` (and their reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17
        total += sum(int(x) for x in fields[11:15])
    return total / tick


def wg_pids(nodes: Iterable[MeshNode]) -> list[int]:
    return [pid for mn in nodes for pid in mn.node.pids("wireguard-go")]


# --- ICMPv6 echo from inside nodes ---------------------------------------------------------------

ECHO_REQUEST, ECHO_REPLY = 128, 129
ICMP6_FILTER = 1  # linux/icmpv6.h
_PAYLOAD = b"kubespan-bench-" + bytes(41)  # 56 bytes, like ping


@dataclass
class Pair:
    """One (source node, destination address) echo flow and everything observed on it."""

    key: Any
    src: str  # namespace
    dst: str
    ident: int
    until_first: bool
    active: bool = True
    sent: dict[int, float] = field(default_factory=dict)  # seq -> monotonic send time
    replies: dict[int, float] = field(default_factory=dict)  # seq -> monotonic receive time
    send_errors: int = 0
    _seq: int = 0

    def first_reply(self) -> float | None:
        return min(self.replies.values()) if self.replies else None

    def snapshot(self) -> tuple[dict[int, float], dict[int, float]]:
        return dict(self.sent), dict(self.replies)


class Pinger:
    """ICMPv6 echo requests every ``interval`` seconds for each pair, from one background thread.

    A pair with ``until_first`` stops after its first reply (join/cold-start latency); other pairs run
    until :meth:`stop`. Bounded: the thread ends after ``max_seconds`` regardless."""

    def __init__(self, interval: float = 0.1, max_seconds: float = 900) -> None:
        self.interval = interval
        self.max_seconds = max_seconds
        self.pairs: dict[Any, Pair] = {}
        self._socks: dict[str, socket.socket] = {}
        self._by_sock: dict[int, dict[int, Pair]] = {}  # fileno -> ident -> pair
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pinger", daemon=True)
        self._idents = random.sample(range(1, 65535), 4000)

    def __enter__(self) -> Pinger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _sock(self, ns: str) -> socket.socket:
        s = self._socks.get(ns)
        if s is None:
            s = in_netns(ns, lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
            # let only echo replies through (a set bit blocks that type)
            words = [0xFFFFFFFF] * 8
            words[ECHO_REPLY >> 5] &= ~(1 << (ECHO_REPLY & 31))
            s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))
            s.setblocking(False)
            self._socks[ns] = s
            self._by_sock[s.fileno()] = {}
        return s

    def add(self, key: Any, src: Node | MeshNode, dst: str, until_first: bool = False) -> Pair:
        n = src.node if isinstance(src, MeshNode) else src
        with self._lock:
            s = self._sock(n.ns)
            pair = Pair(key, n.ns, dst, self._idents.pop(), until_first)
            self.pairs[key] = pair
            self._by_sock[s.fileno()][pair.ident] = pair
        return pair

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for s in self._socks.values():
            s.close()
        self._socks.clear()

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        next_send = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < end:
            now = time.monotonic()
            if now >= next_send:
                self._send_all()
                next_send += self.interval
                if next_send < now:
                    next_send = now + self.interval
            with self._lock:
                socks = list(self._socks.values())
            timeout = max(0.0, min(next_send - time.monotonic(), 0.05))
            if not socks:
                time.sleep(timeout)
                continue
            try:
                readable, _, _ = select.select(socks, [], [], timeout)
            except (OSError, ValueError):
                continue
            for s in readable:
                self._drain(s)

    def _send_all(self) -> None:
        with self._lock:
            pairs = [p for p in self.pairs.values() if p.active]
            socks = dict(self._socks)
        for p in pairs:
            p._seq = (p._seq + 1) & 0xFFFF
            pkt = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, p.ident, p._seq) + _PAYLOAD
            t = time.monotonic()
            try:
                socks[p.src].sendto(pkt, (p.dst, 0))
            except OSError:
                p.send_errors += 1
                continue
            p.sent[p._seq] = t

    def _drain(self, s: socket.socket) -> None:
        table = self._by_sock.get(s.fileno(), {})
        while True:
            try:
                data, addr = s.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            t = time.monotonic()
            if len(data) < 8 or data[0] != ECHO_REPLY:
                continue
            _, _, _, ident, seq = struct.unpack("!BBHHH", data[:8])
            pair = table.get(ident)
            if pair is None or addr[0].split("%")[0] != pair.dst or seq not in pair.sent:
                continue
            pair.replies.setdefault(seq, t)
            if pair.until_first:
                pair.active = False


# --- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --- what the agents did, from their logs and /proc ------------------------------------------------


def agent_events(mn: MeshNode) -> list[dict[str, Any]]:
    """The agent's JSON log lines, each with ``t``: its wall-clock time (epoch seconds, ms resolution).
    Other lines (a traceback, wireguard-go's) are skipped."""
    out = []
    try:
        text = mn.log.read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        ev = parse_event(line)
        if ev is not None:
            out.append(ev)
    return out


def parse_event(line: str) -> dict[str, Any] | None:
    """One agent JSON log line with ``t`` (its wall-clock time, epoch seconds, ms resolution) added;
    None for other lines (a traceback, wireguard-go's)."""
    if not line.startswith("{"):
        return None
    try:
        ev = json.loads(line)
        ts = ev["ts"]
        base = time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")
        ev["t"] = calendar.timegm(base) + float("0" + ts[19:-1])
    except (ValueError, KeyError, TypeError):
        return None
    return ev


class UpWatch:
    """When each peer came ``up`` (to stay) after ``t0_wall``, read from agents' logs as they grow.

    The agent logs "peer state" in the pass that publishes the state, so the line's time is the
    moment its /status would show it. A peer that goes up, then down, then up again counts at its
    last transition to up. Reading the logs costs the agents nothing; sampling /status of 50 agents
    several times a second cost about a core of this 2-core machine (each answer is a whole status
    document), i.e. the measurement slowed what it measured. Each read takes only the bytes appended
    since the last one."""

    def __init__(self, nodes: Iterable[MeshNode], t0_wall: float) -> None:
        self.t0_wall = t0_wall
        self._nodes = {mn.name: mn for mn in nodes}
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, str] = {}
        self.ups: dict[str, dict[str, float]] = {name: {} for name in self._nodes}  # node -> peer -> s

    def skip_existing(self) -> None:
        """Start after what the logs hold now (a join: the nodes' earlier lines are not about it)."""
        for name, mn in self._nodes.items():
            with contextlib.suppress(FileNotFoundError):
                self._offsets[name] = mn.log.stat().st_size

    def read(self) -> None:
        for name, mn in self._nodes.items():
            try:
                with mn.log.open("rb") as f:
                    f.seek(self._offsets.get(name, 0))
                    chunk = f.read()
            except FileNotFoundError:
                continue
            self._offsets[name] = self._offsets.get(name, 0) + len(chunk)
            text = self._partial.pop(name, "") + chunk.decode(errors="replace")
            lines = text.split("\n")
            if lines[-1]:
                self._partial[name] = lines[-1]
            ups = self.ups[name]
            for line in lines[:-1]:
                if '"peer state"' not in line:
                    continue
                ev = parse_event(line)
                if ev is None or ev.get("msg") != "peer state":
                    continue
                peer = str(ev.get("peer"))
                if ev.get("state") != "up":
                    ups.pop(peer, None)
                elif peer not in ups:
                    ups[peer] = max(0.0, ev["t"] - self.t0_wall)

    def all_up(self, node: str, expect: Iterable[str]) -> float:
        """When ``node`` had every peer in ``expect`` up (inf: one is not up now, by its log)."""
        ups = self.ups[node]
        return max((ups.get(p, math.inf) for p in expect), default=math.inf)


# The milestones of an agent's start, by the first log line that marks each (see milestones()).
MILESTONES = (
    ("identity", "Python start-up, imports, wireguard-go and the engine's start"),
    ("hello", "first Hello answered"),
    ("snapshot", "first Watch snapshot"),
    ("first_up", "first peer up (a handshake)"),
    ("all_up", "every expected peer up"),
)


def milestones(
    events: Sequence[dict[str, Any]], t0_wall: float, expect: Iterable[str] = ()
) -> dict[str, float]:
    """Seconds from ``t0_wall`` to each milestone in one agent's log: ``identity`` ("mesh identity"),
    ``hello`` ("discovery hello"), ``snapshot`` ("discovery connected"), ``first_up`` (the first
    "peer state" up), ``all_up`` (every peer in ``expect`` has been up once; nan without ``expect``).
    A milestone not reached is inf."""
    want = set(expect)
    first: dict[str, float] = {}
    ups: dict[str, float] = {}
    for ev in events:
        msg, t = ev.get("msg"), ev["t"] - t0_wall
        if msg == "mesh identity":
            first.setdefault("identity", t)
        elif msg == "discovery hello":
            first.setdefault("hello", t)
        elif msg == "discovery connected":
            first.setdefault("snapshot", t)
        elif msg == "peer state" and ev.get("state") == "up":
            first.setdefault("first_up", t)
            ups.setdefault(str(ev.get("peer")), t)
    out = {k: first.get(k, math.inf) for k, _ in MILESTONES[:4]}
    out["all_up"] = math.nan if not want else (max(ups[p] for p in want) if want <= ups.keys() else math.inf)
    return out


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (nan when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def discovery_pid(mesh: LanMesh) -> int | None:
    """The discovery server's PID (the process the lab started in the ``disc`` node)."""
    for p in mesh.disc.procs:
        if p.poll() is None and "discovery.server.main" in " ".join(map(str, p.args)):
            return p.pid
    return None


WG_DEBUG_ENV = {"KUBESPAN_WIREGUARD_LOG_LEVEL": "debug"}  # kubespan.wiring.WG_LOG_LEVEL_ENV


def wg_log(mn: MeshNode) -> Path:
    """wireguard-go's log of the node (debug lines only with :data:`WG_DEBUG_ENV`)."""
    return mn.node.run_dir / "wireguard" / "kubespan.log"


def add_steering_flag(ap: argparse.ArgumentParser) -> None:
    """``--steering``: the agents' data-plane layout (default: theirs)."""
    ap.add_argument(
        "--steering", choices=STEERINGS, default=MeshConfig().steering, help="the agents' --steering"
    )


def add_launch_flag(ap: argparse.ArgumentParser) -> None:
    """``--launch``: fork (default) or exec the agents; see netns.launcher for why."""
    ap.add_argument(
        "--launch",
        choices=LAUNCHES,
        default="fork",
        help="fork: agents forked from the lab's launcher, which imported their modules once "
        "(netns.launcher); the figure adds one agent's start-up CPU (interpreter and imports), which a "
        "node pays on its own core. exec: `python -m kubespan.cli` per agent, their start-ups sharing "
        "this machine's cores (the figures before 2026-12-08)",
    )


def launch_note(mesh: LanMesh) -> str:
    """How the agents started, for a benchmark's output."""
    if mesh.ml.launch != "fork":
        return "agents exec'd (each imports its modules)"
    return (
        f"agents forked from the launcher (imports shared); + {mesh.start_cpu:.2f} s: one agent's "
        "start-up CPU, added to the figure"
    )


def add_log_flags(ap: argparse.ArgumentParser, keep_dir: str, kept_when: str) -> None:
    """``--wg-debug`` (wireguard-go's debug log) and ``--keep-dir`` (where the logs of a round that
    went wrong are kept: ``kept_when`` says which)."""
    ap.add_argument(
        "--wg-debug", action="store_true", help=f"wireguard-go at LOG_LEVEL=debug (kept {kept_when})"
    )
    ap.add_argument(
        "--keep-dir",
        type=Path,
        default=Path(keep_dir),
        help=f"the agent and wireguard-go logs of both sides are kept here {kept_when}",
    )


def keep_logs(dest: Path, nodes: Iterable[MeshNode]) -> Path:
    """Copy the nodes' agent and wireguard-go logs to ``dest`` (the lab's directory goes when it closes)."""
    dest.mkdir(parents=True, exist_ok=True)
    for mn in nodes:
        for src, name in ((mn.log, f"{mn.name}-agent.log"), (wg_log(mn), f"{mn.name}-wireguard-go.log")):
            with contextlib.suppress(OSError):
                shutil.copyfile(src, dest / name)
    return dest
