"""Network-namespace labs: nodes, links, segments, NAT routers, impairments and processes, cleaned up
even after a crash.

A ``Lab`` owns every namespace it creates; names carry the lab id and the
creating PID (``ks<pid>x<n>-<node>``), so ``cleanup_stale()`` (run by every new
lab) can remove what a killed test run left behind: namespaces, the processes in
them and the lab's temp directory. Each node may give its processes a private
``/run/wireguard`` (a bind mount inside a private mount namespace), so several
wireguard-go instances with the same interface name can coexist on one host.

``with Lab() as lab:`` and ``async with Lab() as lab:`` both work; the async form
adds supervised processes (``await node.spawn(...)``). Every process log is
kept for ``lab.report()``, and a lab left by an exception attaches that report
to the exception as a note. Inside ``with``/``async with``, SIGTERM (``timeout``,
a CI job's end) acts as Ctrl-C when nothing else handles it: the lab's cleanup runs
instead of the process dying with its namespaces left for the next lab.

Needs root and iproute2 (nftables for routers and impairments). Traffic stays
inside the namespaces the lab created.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from netns import impair
from netns.errors import LabError, NetemUnavailableError
from netns.launcher import ForkedProcess, Launcher
from netns.nat import FW_TABLE, NAT_TABLE, NAT_TYPES, PortForward
from netns.nat import ruleset as nat_ruleset
from netns.natprofiles import WG_PORT, NatProfile
from netns.natprofiles import profile as nat_profile

__all__ = [
    "PREFIX",
    "Lab",
    "LabError",
    "LabProcess",
    "NetemUnavailableError",
    "Node",
    "PortForward",
    "Router",
    "Site",
    "cleanup_stale",
    "list_netns",
    "sh",
]

PREFIX = "ks"
_CLONE_NEWNET = 0x40000000
_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


_counter = itertools.count()
_veth_counter = itertools.count()  # per process, so labs in one process never race for a host-side name


def sh(
    *args: str, check: bool = True, timeout: float = 30, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a host command; raise LabError with its stderr on failure."""
    proc = subprocess.run(list(args), capture_output=True, text=input is None, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(args)} failed ({proc.returncode}): {proc.stderr!s}".strip())
    return proc  # type: ignore[return-value]


def list_netns() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces (and the processes in them) and temp directories left by lab owners that are no
    longer running; return the namespace names."""
    removed = []
    for ns in list_netns():
        if not ns.startswith(prefix):
            continue
        pid_part = ns[len(prefix) :].split("x", 1)[0]
        if pid_part.isdigit() and not _pid_alive(int(pid_part)):
            _kill_netns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    owned = re.compile(rf"{re.escape(prefix)}(\d+)x\d+-")
    with contextlib.suppress(OSError):
        for entry in Path(tempfile.gettempdir()).iterdir():
            m = owned.match(entry.name)
            if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
    return removed


class _SigtermAsInterrupt:
    """SIGTERM raises KeyboardInterrupt while at least one lab is open, in the main thread, when
    the process left SIGTERM at its default (killed at once, with no cleanup). A handler someone
    installed (the demo's event loop) is left alone; the default comes back with the last lab."""

    def __init__(self) -> None:
        self.labs = 0
        self.installed = False

    def _raise(self, signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}: cleaning up the lab")

    def acquire(self) -> None:
        self.labs += 1
        if (
            self.labs == 1
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, self._raise)
            self.installed = True

    def release(self) -> None:
        self.labs = max(0, self.labs - 1)
        if self.labs or not self.installed:
            return
        self.installed = False
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == self._raise
        ):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def forked(self) -> None:
        """In a child forked without exec (pyroute2's netns helpers): SIGTERM kills it again.
        With the handler inherited, such a child unwinds Python code instead of dying, and the
        parent's asyncio subprocess waits were seen to stall until their timeout."""
        if self.installed:
            self.labs, self.installed = 0, False
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


_sigterm = _SigtermAsInterrupt()
os.register_at_fork(after_in_child=_sigterm.forked)


def _kill_netns_pids(ns: str) -> None:
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for p in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(p), signal.SIGKILL)


def _tail(path: Path, n: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * n))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-n:])


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class LabProcess:
    """A process started with ``await node.spawn(...)``: its own session (signals reach the whole process
    group), output appended to ``log``; terminated and reaped when the lab closes."""

    def __init__(self, node: Node, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.node = node
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def wait(self) -> int:
        """Exit status, once the process has exited (bound it with ``asyncio.timeout``)."""
        return await self.proc.wait()

    def send_signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            _killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def terminate(self, grace: float = 5) -> int:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; return the exit status."""
        self.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                return await self.proc.wait()
        except TimeoutError:
            self.kill()
            return await self.proc.wait()

    def tail(self, n: int = 40) -> str:
        return _tail(self.log, n)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<LabProcess {self.node.name}/{self.name} pid={self.pid} {state}>"


@dataclass
class Node:
    """One host: a network namespace (plus, for its processes, an optional private /run/wireguard)."""

    lab: Lab
    name: str
    ns: str
    run_dir: Path
    procs: list[subprocess.Popen[bytes] | ForkedProcess] = field(default_factory=list)
    spawned: list[LabProcess] = field(default_factory=list)
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # ifname -> other end (netns, ifname)

    def argv(self, *args: str, private_run: bool = True) -> list[str]:
        """Command line that runs ``args`` inside this node."""
        inner = ["ip", "netns", "exec", self.ns, *args]
        if not private_run:
            return inner
        wg = self.run_dir / "wireguard"
        script = f"mount --bind {shlex.quote(str(wg))} /run/wireguard && exec {shlex.join(inner)}"
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def run(
        self, *args: str, check: bool = True, timeout: float = 30, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(*args, private_run=False), check=check, timeout=timeout, input=input)

    def popen(
        self, *args: str, log: Path | None = None, env: dict[str, str] | None = None, private_run: bool = True
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in this node; it is killed when the lab closes."""
        out: Any = subprocess.DEVNULL
        if log is not None:
            out = log.open("ab")
            self.lab._logs.setdefault(log, f"{self.name}: {log.stem}")
        proc = subprocess.Popen(
            self.argv(*args, private_run=private_run),
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        if log is not None:
            out.close()
        self.procs.append(proc)
        return proc

    def fork(
        self, module: str, *args: str, log: Path, env: dict[str, str] | None = None, private_run: bool = True
    ) -> ForkedProcess:
        """Start ``python -m MODULE ARGS`` in this node as :meth:`popen` would, but forked from the
        lab's launcher, which imported the agent's modules once (netns.launcher)."""
        self.lab._logs.setdefault(log, f"{self.name}: {log.stem}")
        wg = self.run_dir / "wireguard" if private_run else None
        proc = self.lab.launcher().spawn(
            module, args, ns=self.ns, log=log, env=dict(os.environ if env is None else env), wg_dir=wg
        )
        self.procs.append(proc)
        return proc

    async def spawn(
        self,
        *args: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
        private_run: bool = True,
    ) -> LabProcess:
        """Start a supervised process in this node (asyncio); its output goes to a log kept for
        ``lab.report()``; it is terminated when the lab closes."""
        name = name or Path(args[0]).name
        log = self.lab._log_path(self.name, name)
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(*args, private_run=private_run),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        lp = LabProcess(self, name, proc, log)
        self.spawned.append(lp)
        return lp

    def has_default_route(self, version: int = 4) -> bool:
        return bool(self.run("ip", f"-{version}", "route", "show", "default").stdout.strip())

    def addr(self, ifname: str, cidr: str) -> None:
        fam = "-6" if ipaddress.ip_interface(cidr).version == 6 else "-4"
        self.run("ip", fam, "addr", "add", cidr, "dev", ifname, *(["nodad"] if fam == "-6" else []))

    def route(self, *spec: str) -> None:
        self.run("ip", *(["-6"] if any(":" in s for s in spec) else []), "route", "add", *spec)

    def ping(self, target: str, count: int = 1, timeout: float = 2) -> bool:
        """One bounded ping to an address inside the lab."""
        fam = "-6" if ":" in target else "-4"
        r = self.run(
            "ping",
            fam,
            "-c",
            str(count),
            "-W",
            str(int(max(1, timeout))),
            "-i",
            "0.2",
            target,
            check=False,
            timeout=count * timeout + 5,
        )
        return r.returncode == 0

    def pids(self, comm: str | None = None) -> list[int]:
        """PIDs of processes in this node's network namespace, optionally only those named ``comm``."""
        out = []
        for text in sh("ip", "netns", "pids", self.ns, check=False).stdout.split():
            pid = int(text)
            if comm is not None:
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() != comm:
                        continue
                except OSError:
                    continue
            out.append(pid)
        return out

    def connect_tcp(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection made from inside this node (a socket keeps its namespace), without a subprocess."""
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
                try:
                    if _libc().setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.ns}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                result["sock"] = socket.create_connection((host, port), timeout)
            except BaseException as e:
                result["error"] = e

        t = threading.Thread(target=work, name=f"netns-{self.name}")
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result["sock"]

    def http_get(self, host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """A plain HTTP/1.0 GET from inside this node: ``(status, body)``."""
        with self.connect_tcp(host, port, timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        raw = b"".join(chunks)
        head, _, body = raw.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise LabError(f"bad HTTP response from {host}:{port} in {self.name}") from None
        return status, body

    def stop_processes(self) -> None:
        for lp in self.spawned:  # normally already reaped by Lab.aclose(); this is the sync fallback
            lp.kill()
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()


@dataclass
class Router(Node):
    """A node forwarding between an inside and an outside segment, NATing per ``nat`` (see netns.nat)."""

    nat: str | None = None
    inside_if: str = "lan0"
    outside_if: str = "wan0"
    inside_addrs: list[str] = field(default_factory=list)
    outside_addrs: list[str] = field(default_factory=list)
    firewall: bool = False

    @property
    def inside_ip(self) -> str:
        """The first inside address without its prefix (the gateway of the inside segment)."""
        return str(ipaddress.ip_interface(self.inside_addrs[0]).ip)

    @property
    def outside_ip(self) -> str:
        """The first outside address without its prefix (where NATed flows appear to come from)."""
        return str(ipaddress.ip_interface(self.outside_addrs[0]).ip)

    def forward(self, port: int, to: str, proto: str = "udp") -> impair.Handle:
        """Add a port forward at run time (``to`` is ``"ip:port"`` or ``"ip"``); ``.remove()`` undoes it."""
        pf = PortForward(port, to, proto)
        h = impair.Handle(self, f"forward {proto} {port} -> {pf.target()}")
        impair.add_rule(self.ns, "ip", NAT_TABLE, "prerouting", pf.rule(self.outside_if).split(), h)
        self.lab._handles.append(h)
        return h

    def unsolicited_dropped(self) -> int:
        """Packets the firewall dropped so far as new inbound connections on the outside interface."""
        out = self.run("nft", "list", "table", "inet", FW_TABLE, check=False).stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))


@dataclass(frozen=True)
class Site:
    """A node behind one of the lab's NAT profiles (``Lab.site``); unpacks as ``node, routers``.

    ``routers`` run from the node's gateway outwards (empty for ``open``); ``public_ip`` is where the
    internet sees the node's flows come from, ``lan_ip`` the node's own address. ``isp`` is the plain
    transit router between the outermost NAT router and the internet (None without one)."""

    node: Node
    routers: tuple[Router, ...]
    profile: NatProfile
    public_ip: str
    lan_ip: str
    isp: Router | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.node, self.routers))


_N = TypeVar("_N", bound=Node)


class Lab:
    """A set of namespaces owned by this process; ``with Lab() as lab:`` (or ``async with``) removes them all."""

    def __init__(self, prefix: str = PREFIX) -> None:
        if os.geteuid() != 0:
            raise LabError("network-namespace labs need root")
        for tool in ("ip", "unshare"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: install iproute2 and util-linux")
        cleanup_stale(prefix)
        self.id = f"{prefix}{os.getpid()}x{next(_counter)}"
        self.nodes: dict[str, Node] = {}
        self.internet_segment: str | None = None
        self._switches: list[str] = []
        self._created: list[str] = []
        self._members: dict[str, list[tuple[Node, list[str]]]] = {}  # segment -> attached nodes, addrs
        self._gateways: dict[str, list[str]] = {}  # segment -> routers' inside IPs
        self._handles: list[impair.Handle] = []
        self._logs: dict[Path, str] = {}  # log file -> label, for report()
        self._log_ids = itertools.count()
        self._sites = itertools.count(1)
        self._launcher: Launcher | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        Path("/run/wireguard").mkdir(parents=True, exist_ok=True)

    def _ns(self, name: str) -> str:
        ns = f"{self.id}-{name}"
        sh("ip", "netns", "add", ns)
        self._created.append(ns)  # owned from here on, even if the next steps fail
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def node(self, name: str, sysctls: Iterable[tuple[str, str]] = ()) -> Node:
        return self._add_node(Node, name, sysctls)

    def _add_node(self, cls: type[_N], name: str, sysctls: Iterable[tuple[str, str]], **kw: Any) -> _N:
        if name in self.nodes:
            raise LabError(f"node {name!r} exists")
        ns = self._ns(name)
        run_dir = self.dir / name
        (run_dir / "wireguard").mkdir(parents=True)
        node = cls(self, name, ns, run_dir, **kw)
        self.nodes[name] = node
        node.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", check=False)
        node.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", check=False)
        for k, v in sysctls:
            node.run("sysctl", "-qw", f"{k}={v}")
        return node

    def _veth_names(self) -> tuple[str, str]:
        n = next(_veth_counter)
        return f"kv{os.getpid() % 100000}a{n}", f"kv{os.getpid() % 100000}b{n}"

    def link(
        self,
        a: Node,
        b: Node,
        a_addrs: Sequence[str] = (),
        b_addrs: Sequence[str] = (),
        a_if: str = "eth0",
        b_if: str = "eth0",
        mtu: int = 1500,
    ) -> None:
        """A point-to-point veth between two nodes."""
        ta, tb = self._veth_names()
        sh("ip", "link", "add", ta, "mtu", str(mtu), "type", "veth", "peer", "name", tb, "mtu", str(mtu))
        sh("ip", "link", "set", ta, "netns", a.ns, "name", a_if)
        sh("ip", "link", "set", tb, "netns", b.ns, "name", b_if)
        a.links[a_if], b.links[b_if] = (b.ns, b_if), (a.ns, a_if)
        for node, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            node.run("ip", "link", "set", ifname, "up")
            for cidr in addrs:
                node.addr(ifname, cidr)

    def segment(self, name: str) -> str:
        """A switched L2 segment (a bridge in its own namespace); attach nodes with ``attach``."""
        ns = self._ns(f"sw-{name}")
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        self._switches.append(ns)
        return ns

    def attach(
        self,
        node: Node,
        segment: str,
        addrs: Sequence[str] = (),
        ifname: str = "eth0",
        mtu: int = 1500,
        default_route: bool = True,
    ) -> None:
        """Plug ``node`` into ``segment``. If a router serves the segment (``router()``), the node gets a
        default route via it for each address family it has an address in, unless it has one already
        or ``default_route`` is false."""
        ta, tb = self._veth_names()
        sh("ip", "link", "add", ta, "mtu", str(mtu), "type", "veth", "peer", "name", tb, "mtu", str(mtu))
        sh("ip", "link", "set", ta, "netns", node.ns, "name", ifname)
        sh("ip", "link", "set", tb, "netns", segment)
        node.links[ifname] = (segment, tb)
        sh("ip", "-n", segment, "link", "set", tb, "master", "br0", "up")
        node.run("ip", "link", "set", ifname, "up")
        for cidr in addrs:
            node.addr(ifname, cidr)
        self._members.setdefault(segment, []).append((node, list(addrs)))
        if default_route:
            self._route_via_gateways(node, segment, addrs)

    def _route_via_gateways(self, node: Node, segment: str, addrs: Sequence[str]) -> None:
        versions = {ipaddress.ip_interface(a).version for a in addrs}
        own = {str(ipaddress.ip_interface(a).ip) for a in addrs}
        for gw in self._gateways.get(segment, []):
            v = ipaddress.ip_address(gw).version
            if gw not in own and v in versions and not node.has_default_route(v):
                node.run("ip", f"-{v}", "route", "add", "default", "via", gw)

    # -- the internet and routers ---------------------------------------------------------------------

    def internet(self, name: str = "internet") -> str:
        """The lab's one "internet" segment (created on first use): public hosts, routers' outside legs."""
        if self.internet_segment is None:
            self.internet_segment = self.segment(name)
        return self.internet_segment

    def router(
        self,
        name: str,
        inside_segment: str,
        outside_segment: str,
        inside_addr: str | Sequence[str],
        outside_addr: str | Sequence[str],
        nat: str | None = "eim",
        port_forward: PortForward | Sequence[PortForward] | None = None,
        *,
        firewall: bool | None = None,
        udp_timeout: int | None = None,
        inside_if: str = "lan0",
        outside_if: str = "wan0",
    ) -> Router:
        """A router namespace between two segments, forwarding, with NAT per ``nat``:

        * ``"eim"``: ``masquerade`` (endpoint-independent mapping, port kept when free);
        * ``"symmetric"``: ``masquerade fully-random`` (a random port per destination);
        * ``None``: plain routing.

        ``firewall`` (default: on when there is NAT) drops new inbound connections on the outside
        interface, to the router and through it, except ``port_forward`` targets (nat.md: without it a
        stray packet makes the NAT pick a random port). ``udp_timeout`` sets the conntrack UDP timeouts
        (netns.sh uses 2 s). Nodes on ``inside_segment``, already attached or attached later, get a
        default route via ``inside_addr``; if ``outside_segment`` is itself behind a router (CGNAT),
        this router gets a default route via that one.
        """
        if nat not in NAT_TYPES:
            raise LabError(f"nat must be one of {NAT_TYPES}, not {nat!r}")
        ins = [inside_addr] if isinstance(inside_addr, str) else list(inside_addr)
        outs = [outside_addr] if isinstance(outside_addr, str) else list(outside_addr)
        if isinstance(port_forward, PortForward):
            forwards = [port_forward]
        else:
            forwards = list(port_forward or ())
        fw = nat is not None if firewall is None else firewall
        try:  # validate before anything is created
            rules = nat_ruleset(nat, outside_if, forwards, fw)
        except ValueError as e:
            raise LabError(str(e)) from e
        sysctls = [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
        ]
        r = self._add_node(
            Router,
            name,
            sysctls,
            nat=nat,
            inside_if=inside_if,
            outside_if=outside_if,
            inside_addrs=ins,
            outside_addrs=outs,
            firewall=fw,
        )
        self.attach(r, outside_segment, outs, ifname=outside_if)
        self.attach(r, inside_segment, ins, ifname=inside_if, default_route=False)
        r.run("nft", "-f", "-", input=rules.encode())
        if udp_timeout is not None:
            r.run("sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={udp_timeout}")
            r.run("sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout_stream={udp_timeout}")
        self._gateways.setdefault(inside_segment, []).extend(str(ipaddress.ip_interface(a).ip) for a in ins)
        for member, addrs in self._members.get(inside_segment, []):
            if member is not r:
                self._route_via_gateways(member, inside_segment, addrs)
        return r

    def site(
        self, name: str, profile: str | NatProfile, public: str | None = None, *, transit: bool = True
    ) -> Site:
        """Node ``name`` behind NAT profile ``profile`` (``netns.natprofiles``), attached to the internet.

        ``public`` is the site's internet address with its prefix (the node's own for ``open``, else the
        outermost router's); default ``203.0.113.(100+k)/24`` for the lab's k-th site. Inside, the k-th
        site uses 10.200.k.0/24 (node .10, gateway .1) and, behind a carrier, 100.64.k.0/24 (carrier .1,
        CPE .2; a further carrier 100.65.k.0/24, and so on). A forwarding router sends udp ``WG_PORT``
        to the node.

        With ``transit`` (the default) a site with NAT reaches the internet through its own plain router
        ``{name}-isp`` (``Site.isp``: routing only, no NAT, no firewall), as a real NAT reaches the
        internet through its provider's router: between two sites' NAT routers there are then two routed
        hops (ISP A, ISP B), so a datagram a node sends with TTL 3 passes its own NAT and expires at the
        peer's ISP, never reaching the peer's NAT (nat.md §2's openers; with a single NAT layer, TTL 4 is
        the least that arrives). The public address stays on the internet's subnet: the ISP answers ARP
        for it on the internet segment (proxy ARP) and routes it to the NAT's outside leg, which holds it
        as a /32 with a default route via the ISP (transit link ``198.18.k.1``; the ISP's internet leg is
        ``198.19.0.k/24`` and reaches every internet host on-link). ``transit=False`` attaches the
        outermost NAT router straight to the internet segment (NATs of different sites are then
        neighbours). ``open`` sites are always attached directly: the node holds the public address and
        stays a neighbour of the internet hosts."""
        prof = nat_profile(profile)
        k = next(self._sites)
        if k > 254:
            raise LabError("a lab holds at most 254 sites")
        public = public or f"203.0.113.{100 + k}/24"
        internet = self.internet()
        node = self.node(name)
        if not prof.routers:
            self.attach(node, internet, [public])
            ip = str(ipaddress.ip_interface(public).ip)
            return Site(node, (), prof, ip, ip)
        isp: Router | None = None
        outside_seg, outside_addr = internet, public
        if transit:
            isp, outside_seg = self._isp(name, k, public)
            outside_addr = f"{ipaddress.ip_interface(public).ip}/32"
        lan_ip = f"10.200.{k}.10"
        # outermost first; each inner segment is the next router's outside
        routers: list[Router] = []
        for depth, spec in reversed(list(enumerate(prof.routers))):
            inner = depth == 0
            seg = self.segment(f"{name}-lan" if inner else f"{name}-isp{depth}")
            inside_addr = f"10.200.{k}.1/24" if inner else f"100.{63 + depth}.{k}.1/24"
            forwards = [PortForward(WG_PORT, lan_ip)] if spec.forward_wg_port else []
            r = self.router(
                f"{name}-nat" if inner else f"{name}-cgn{depth}",
                seg,
                outside_seg,
                inside_addr,
                outside_addr,
                nat=spec.nat,
                port_forward=forwards,
                firewall=spec.firewall,
            )
            if isp is not None and not routers:  # the outermost: its only way out is the ISP
                r.run(
                    "ip", "-4", "route", "add", "default", "via", isp.inside_ip, "dev", r.outside_if, "onlink"
                )
            routers.insert(0, r)
            outside_seg, outside_addr = seg, f"100.{63 + depth}.{k}.2/24"
        self.attach(node, outside_seg, [f"{lan_ip}/24"])
        return Site(node, tuple(routers), prof, routers[-1].outside_ip, lan_ip, isp)

    def _isp(self, name: str, k: int, public: str) -> tuple[Router, str]:
        """Site ``k``'s transit router ``{name}-isp`` on the internet, serving ``public`` (an IPv4 address)
        on a new segment; returns the router and that segment (see ``site``)."""
        ip = ipaddress.ip_interface(public).ip
        if ip.version != 4:
            raise LabError(f"a transit router serves an IPv4 public address, not {public}; use transit=False")
        seg = self.segment(f"{name}-up")
        sysctls = [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
        ]
        isp = self._add_node(
            Router,
            f"{name}-isp",
            sysctls,
            nat=None,
            inside_addrs=[f"198.18.{k}.1/32"],
            outside_addrs=[f"198.19.0.{k}/24"],
        )
        self.attach(isp, self.internet(), isp.outside_addrs, ifname=isp.outside_if, default_route=False)
        self.attach(isp, seg, isp.inside_addrs, ifname=isp.inside_if, default_route=False)
        isp.run("ip", "-4", "route", "add", "default", "dev", isp.outside_if)  # every internet host on-link
        isp.run("ip", "-4", "route", "add", f"{ip}/32", "dev", isp.inside_if)
        isp.run("ip", "-4", "neigh", "add", "proxy", str(ip), "dev", isp.outside_if)
        return isp, seg

    # -- impairments ------------------------------------------------------------------------------------

    def loss(
        self,
        node: Node,
        percent: float,
        *,
        dst: str | None = None,
        ifname: str | None = None,
        port: int | None = None,
        proto: str = "udp",
        direction: str = "out",
    ) -> impair.Handle:
        """Lose ``percent`` % (whole) of ``node``'s packets like a bad wire (``numgen random mod 100 < N
        drop``; senders get no error), on ``ifname`` (default: the interface towards ``dst``, else all the
        lab made) and/or only to ``dst`` (an address, a network, or an ``ip:port`` / ``[v6]:port``
        endpoint). ``direction``: ``"out"`` (default; includes packets the node forwards), ``"in"`` or
        ``"both"``. See netns.impair for where the drops happen."""
        return impair.nft_drop(
            node,
            percent=percent,
            dst=dst,
            ifname=ifname,
            port=port,
            proto=proto,
            direction=direction,
            what=f"loss {percent}%",
        )

    def blackhole(
        self,
        node: Node,
        dst: str | None = None,
        *,
        ifname: str | None = None,
        port: int | None = None,
        proto: str = "udp",
        direction: str = "both",
    ) -> impair.Handle:
        """Drop everything between ``node`` and ``dst`` (both ways by default); same selectors as ``loss``."""
        return impair.nft_drop(
            node,
            percent=100,
            dst=dst,
            ifname=ifname,
            port=port,
            proto=proto,
            direction=direction,
            what="blackhole",
        )

    def delay(self, node: Node, ms: float, *, jitter_ms: float = 0, ifname: str = "eth0") -> impair.Handle:
        """Delay ``node``'s egress on ``ifname`` with tc netem; raises ``NetemUnavailableError`` (a
        LabError, message ``"netem not available: ..."``) where the kernel has no sch_netem."""
        return impair.netem_delay(node, ms, jitter_ms, ifname)

    # -- logs and teardown ------------------------------------------------------------------------------

    def _log_path(self, node: str, name: str) -> Path:
        d = self.dir / "logs"
        d.mkdir(exist_ok=True)
        path = d / f"{node}-{name}-{next(self._log_ids)}.log"
        self._logs[path] = f"{node}: {name}"
        return path

    def report(self, lines: int = 40) -> str:
        """The last ``lines`` lines of every process log in this lab (spawned, and popen with a log)."""
        state = {lp.log: lp for n in self.nodes.values() for lp in n.spawned}
        parts = []
        for path, label in self._logs.items():
            lp = state.get(path)
            status = "" if lp is None else (" [running]" if lp.running else f" [exit {lp.returncode}]")
            parts.append(f"--- {label}{status} ({path.name})\n{_tail(path, lines)}".rstrip())
        return "\n".join(parts)

    def _note(self, e: BaseException | None) -> None:
        if isinstance(e, Exception):
            with contextlib.suppress(Exception):
                if rep := self.report(lines=20):
                    e.add_note(f"lab {self.id} process logs (tail):\n{rep}")

    async def aclose(self) -> None:
        """Terminate (SIGTERM, then SIGKILL) and reap spawned processes, then ``close()``."""
        try:
            running = [lp for n in self.nodes.values() for lp in n.spawned if lp.running]
            await asyncio.gather(*(lp.terminate(grace=5) for lp in running), return_exceptions=True)
        finally:
            await asyncio.to_thread(self.close)

    def launcher(self, preload: Sequence[str] = ()) -> Launcher:
        """The lab's fork server for agents, started on first use with ``preload`` imported (see
        netns.launcher); later calls return it as it is."""
        if self._launcher is None:
            self._launcher = Launcher(self.dir / "launcher.log", preload)
        return self._launcher

    def close(self) -> None:
        for h in list(self._handles):
            with contextlib.suppress(LabError, subprocess.SubprocessError):
                h.remove()
        self._handles.clear()
        # newest first: agents stop before the services they report to (e.g. a discovery server)
        for node in reversed(self.nodes.values()):
            node.stop_processes()
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        for ns in dict.fromkeys([n.ns for n in self.nodes.values()] + self._switches + self._created):
            _kill_netns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
        self.nodes.clear()
        self._switches.clear()
        self._created.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        _sigterm.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._note(e)
            self.close()
        finally:
            _sigterm.release()

    async def __aenter__(self) -> Self:
        _sigterm.acquire()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._note(e)
            await self.aclose()
        finally:
            _sigterm.release()
