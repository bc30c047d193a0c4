"""Network-namespace labs: nodes, links, segments and processes, cleaned up even after a crash.

A ``Lab`` owns every namespace it creates; names carry the lab id and the
creating PID (``ks<pid>x<n>-<node>``), so ``cleanup_stale()`` can remove what a
killed test run left behind. Each node may give its processes a private
``/run/wireguard`` (a bind mount inside a private mount namespace), so several
wireguard-go instances with the same interface name can coexist on one host.

Needs root and iproute2. Traffic stays inside the namespaces the lab created.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

PREFIX = "ks"
_counter = itertools.count()


class LabError(RuntimeError):
    pass


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
    """Delete namespaces left by lab owners that are no longer running; return their names."""
    removed = []
    for ns in list_netns():
        if not ns.startswith(prefix):
            continue
        pid_part = ns[len(prefix) :].split("x", 1)[0]
        if pid_part.isdigit() and not _pid_alive(int(pid_part)):
            _kill_netns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def _kill_netns_pids(ns: str) -> None:
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for p in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(p), signal.SIGKILL)


@dataclass
class Node:
    """One host: a network namespace (plus, for its processes, an optional private /run/wireguard)."""

    lab: Lab
    name: str
    ns: str
    run_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

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

    def stop_processes(self) -> None:
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


class Lab:
    """A set of namespaces owned by this process; ``with Lab() as lab:`` removes them all."""

    def __init__(self, prefix: str = PREFIX) -> None:
        if os.geteuid() != 0:
            raise LabError("network-namespace labs need root")
        for tool in ("ip", "unshare"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: install iproute2 and util-linux")
        cleanup_stale(prefix)
        self.id = f"{prefix}{os.getpid()}x{next(_counter)}"
        self.nodes: dict[str, Node] = {}
        self._switches: list[str] = []
        self._veth = itertools.count()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        Path("/run/wireguard").mkdir(parents=True, exist_ok=True)

    def _ns(self, name: str) -> str:
        ns = f"{self.id}-{name}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def node(self, name: str, sysctls: Iterable[tuple[str, str]] = ()) -> Node:
        if name in self.nodes:
            raise LabError(f"node {name!r} exists")
        ns = self._ns(name)
        run_dir = self.dir / name
        (run_dir / "wireguard").mkdir(parents=True)
        node = Node(self, name, ns, run_dir)
        self.nodes[name] = node
        node.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", check=False)
        node.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", check=False)
        for k, v in sysctls:
            node.run("sysctl", "-qw", f"{k}={v}")
        return node

    def _veth_names(self) -> tuple[str, str]:
        n = next(self._veth)
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
        self, node: Node, segment: str, addrs: Sequence[str] = (), ifname: str = "eth0", mtu: int = 1500
    ) -> None:
        ta, tb = self._veth_names()
        sh("ip", "link", "add", ta, "mtu", str(mtu), "type", "veth", "peer", "name", tb, "mtu", str(mtu))
        sh("ip", "link", "set", ta, "netns", node.ns, "name", ifname)
        sh("ip", "link", "set", tb, "netns", segment)
        sh("ip", "-n", segment, "link", "set", tb, "master", "br0", "up")
        node.run("ip", "link", "set", ifname, "up")
        for cidr in addrs:
            node.addr(ifname, cidr)

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop_processes()
        for ns in [n.ns for n in self.nodes.values()] + self._switches:
            _kill_netns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
        self.nodes.clear()
        self._switches.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
